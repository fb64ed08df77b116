"""The engine's custom ops, registered with ``torch.library.Library`` directly.

``torch.library.custom_op`` wraps every implementation in a guard whose first call imports ``torch._dynamo``
(about 2.5 s on a 2-core CPU, paid by every process: each ``sample``, ``train`` or cache command). The ops
defined here are the same operators to torch, a schema inferred from the type hints, a fake impl for
``FakeTensorMode`` / ``torch.compile``, torch's ``pt2_compliant_tag`` and an autograd formula (or, for the
backward ops, a clear error when differentiated: double backward is not supported), registered without
that guard. Like ``custom_op`` they are functional: an implementation returns new tensors, never its inputs
or their views.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.library import Library

try:
    from torch.library import infer_schema
except ImportError:  # torch 2.4
    from torch._library.infer_schema import infer_schema

NAMESPACE = "text2ct"
_LIB = Library(NAMESPACE, "FRAGMENT")
_DISPATCH_KEYS = {None: "CompositeExplicitAutograd", "cpu": "CPU", "cuda": "CUDA"}


class CustomOp:
    """``text2ct::<name>``: call it like the function it was made from."""

    def __init__(self, fn: Callable, name: str, device_types: str | None, differentiable: bool) -> None:
        if device_types not in _DISPATCH_KEYS:
            raise ValueError(f"device_types must be one of {list(_DISPATCH_KEYS)}, got {device_types!r}")
        _LIB.define(name + infer_schema(fn, mutates_args=()), tags=(torch.Tag.pt2_compliant_tag,))
        _LIB.impl(name, fn, _DISPATCH_KEYS[device_types])
        self.qualname = f"{NAMESPACE}::{name}"
        self.overload = getattr(getattr(torch.ops, NAMESPACE), name).default
        self.__doc__, self.__wrapped__ = fn.__doc__, fn
        if not differentiable:  # without an autograd kernel torch would return zero gradients, with a warning
            self.register_autograd(self._no_derivative, setup_context=lambda ctx, inputs, output: None)

    def _no_derivative(self, ctx, *grads):
        raise RuntimeError(f"{self.qualname} has no derivative: differentiating the engine's backward "
                           f"(double backward, create_graph=True through it) is not supported")

    def __call__(self, *args):
        return self.overload(*args)

    def register_fake(self, fn: Callable) -> Callable:
        """The shapes-only implementation (also the op's Meta kernel); usable as a decorator."""
        torch.library.register_fake(self.qualname, fn, lib=_LIB)
        return fn

    def register_autograd(self, backward: Callable, setup_context: Callable) -> None:
        torch.library.register_autograd(self.qualname, backward, setup_context=setup_context, lib=_LIB)


def custom_op(qualname: str, device_types: str | None = None, differentiable: bool = True
              ) -> Callable[[Callable], CustomOp]:
    """Decorator: ``@custom_op("text2ct::name")`` defines the functional op ``text2ct::name`` from a typed
    function (for every device, or only ``device_types`` "cpu" or "cuda"). A ``differentiable`` op gets its
    formula from :meth:`CustomOp.register_autograd`; one that is not raises when differentiated."""
    namespace, _, name = qualname.partition("::")
    if namespace != NAMESPACE or not name:
        raise ValueError(f"op names are {NAMESPACE}::<name>, got {qualname!r}")
    return lambda fn: CustomOp(fn, name, device_types, differentiable)
