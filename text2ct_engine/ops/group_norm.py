"""``group_norm(x, num_groups, weight, bias, eps, act)``: GroupNorm (+ optional SiLU) over (N, C, *spatial).

Backends: ``torch`` (``F.group_norm`` then ``F.silu``) is the reference and the CPU default for now.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import requested_backend

ACTIVATIONS = (None, "silu")


def validate_group_norm(x: torch.Tensor, num_groups: int, weight, bias, act, add=None) -> None:
    """Raise one clear ``ValueError`` for a call no backend can serve."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        kind = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"group_norm needs a floating-point tensor, got {kind}: cast the input with .float()")
    if x.dim() < 2:
        raise ValueError(f"group_norm needs input of shape (N, C, *spatial), got {tuple(x.shape)}")
    c = x.shape[1]
    if not isinstance(num_groups, int) or num_groups <= 0 or c % num_groups:
        raise ValueError(f"group_norm: {c} channels are not divisible into {num_groups} groups; "
                         f"pick num_groups dividing C")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (c,):
            raise ValueError(f"group_norm: {name} must have shape ({c},) to match C, got {tuple(p.shape)}")
    if add is not None and tuple(add.shape) != (x.shape[0], c):
        raise ValueError(f"group_norm: add must have shape (N, C) = ({x.shape[0]}, {c}), got {tuple(add.shape)}")
    if act not in ACTIVATIONS:
        raise ValueError(f"group_norm: unknown activation {act!r}; use None or 'silu'")


def group_norm_torch(x, num_groups, weight=None, bias=None, eps=1e-6, act=None, add=None):
    if add is not None:
        x = x + add.reshape(*add.shape, *([1] * (x.dim() - 2)))
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if act == "silu" else y


def choose_group_norm_backend(x: torch.Tensor) -> tuple[str, str]:
    """(backend, reason) that ``group_norm`` uses for this tensor right now."""
    asked = requested_backend()
    if asked == "auto":
        return "torch", "auto: torch reference path"
    return asked, f"forced ({asked})"


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-6, act: str | None = None,
               add: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm over ``num_groups`` groups of (N, C, *spatial) ``x``, then ``act`` (None or "silu").

    ``add`` (N, C), if given, is broadcast-added to ``x`` first (the ResBlock's time embedding), so the
    sum never has to be written to memory by the caller.
    """
    validate_group_norm(x, num_groups, weight, bias, act, add)
    name, _ = choose_group_norm_backend(x)
    if name == "torch":
        return group_norm_torch(x, num_groups, weight, bias, eps, act, add)
    raise NotImplementedError(f"group_norm backend {name!r} is not built yet")
