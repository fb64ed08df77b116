"""Host-side helpers every kernel wrapper shares: is the interpreter on, and launch on the inputs' GPU."""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_input_device(fn: F) -> F:
    """Run ``fn`` with the current CUDA device set to that of its first tensor argument.

    Triton launches on the *current* device and its stream; a tensor on ``cuda:1`` while ``cuda:0`` is
    current would be read through the wrong context. CPU tensors (the interpreter) are left alone.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        guard = torch.cuda.device(first.device) if first is not None and first.is_cuda else contextlib.nullcontext()
        with guard:
            return fn(*args, **kwargs)
    return wrapper  # type: ignore[return-value]
