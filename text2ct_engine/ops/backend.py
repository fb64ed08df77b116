"""Backend choice for every op: ``auto`` | ``triton`` | ``torch`` | ``cpp``.

Precedence: the innermost ``with backend(name):`` block, else the ``TEXT2CT_BACKEND`` environment variable,
else ``auto``. ``auto`` means Triton for CUDA tensors and the CPU default (torch or C++, per op) otherwise.
``triton`` on CPU tensors only works under ``TRITON_INTERPRET=1`` (set before triton is first imported).
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import sys
from typing import Callable, Iterator, TypeVar

import torch

BACKENDS = ("auto", "triton", "torch", "cpp")
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("text2ct_backend", default=None)


F = TypeVar("F", bound=Callable)


def constant_result(fn: F) -> F:
    """``torch.compiler.assume_constant_result`` without importing dynamo at start-up (1.5 s of every
    command's start): where dynamo is not loaded yet, the same mark is set directly (the attribute is the
    one torch's decorator sets; tests/test_group_norm.py checks that it still is)."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


def _check(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} from {source}: choose one of {', '.join(BACKENDS)}")
    return name


@constant_result
def requested_backend() -> str:
    """The backend asked for right now (before ``auto`` is resolved for a tensor).

    Dynamo cannot trace ``ContextVar.get``: under ``torch.compile`` this runs once at trace time and its
    answer is baked into the graph (recompile after switching backends).
    """
    name = _override.get()
    if name is not None:
        return name
    return _check(os.environ.get("TEXT2CT_BACKEND", "auto").strip().lower() or "auto", "TEXT2CT_BACKEND")


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block (thread- and task-local)."""
    token = _override.set(_check(name.strip().lower(), "ops.backend()"))
    try:
        yield
    finally:
        _override.reset(token)


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_XFORMERS_INSTALLED = importlib.util.find_spec("xformers") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device_type: str) -> tuple[bool, str]:
    """Can Triton kernels run on tensors of this device type here? (answer, reason)"""
    if not triton_available():
        return False, "triton is not installed"
    if device_type == "cuda":
        return True, "CUDA tensor and triton installed"
    if device_type == "cpu" and triton_interpreting():
        return True, "CPU tensor under TRITON_INTERPRET=1 (interpreter: correct but slow)"
    if device_type == "meta":
        return True, "meta/fake tensor: shapes only"
    return False, f"{device_type} tensors need TRITON_INTERPRET=1 for triton"


def xformers_available() -> bool:
    return _XFORMERS_INSTALLED
