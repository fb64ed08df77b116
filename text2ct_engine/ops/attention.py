"""``attention(q, k, v, key_padding_mask)``: non-causal multi-head attention, scale D**-0.5.

q (B, H, Nq, D), k/v (B, H, Nk, D); ``key_padding_mask`` (B, Nk) bool, True = attend. A query whose keys
are all masked returns zeros. Same result as ``F.scaled_dot_product_attention``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import requested_backend


def validate_attention(q, k, v, key_padding_mask) -> None:
    """Raise one clear ``ValueError`` for a call no backend can serve."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"attention: {name} must be a float tensor of shape (B, H, N, D)")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, heads or head size")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(f"attention: key_padding_mask must be bool of shape (B, Nk) = "
                             f"({k.shape[0]}, {k.shape[2]}), got {key_padding_mask.dtype} "
                             f"{tuple(key_padding_mask.shape)}")


def attention_torch(q, k, v, key_padding_mask=None):
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    empty = ~key_padding_mask.any(dim=1)  # batches whose every key is masked: softmax would give NaN
    mask = key_padding_mask | empty[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    return out.masked_fill(empty[:, None, None, None], 0.0)


def choose_attention_backend(q: torch.Tensor) -> tuple[str, str]:
    """(backend, reason) that ``attention`` uses for this tensor right now."""
    asked = requested_backend()
    if asked == "auto":
        return "torch", "auto: torch scaled_dot_product_attention"
    return asked, f"forced ({asked})"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax(q k^T / sqrt(D)) v over the keys that ``key_padding_mask`` keeps."""
    validate_attention(q, k, v, key_padding_mask)
    name, _ = choose_attention_backend(q)
    if name in ("torch", "cpp"):
        return attention_torch(q, k, v, key_padding_mask)
    raise NotImplementedError(f"attention backend {name!r} is not built yet")
