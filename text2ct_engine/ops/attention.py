"""``attention(q, k, v, key_padding_mask)``: non-causal multi-head attention, scale D**-0.5.

q (B, H, Nq, D), k/v (B, H, Nk, D); ``key_padding_mask`` (B, Nk) bool, True = attend. A query whose keys
are all masked returns zeros (and gets zero gradients). Same result as ``F.scaled_dot_product_attention``.

Backends (see ``choose_attention_backend``):
  * ``triton``: the fused FlashAttention-2-style kernels of ``text2ct_engine.kernels.attention``, wrapped as
    the custom ops ``torch.ops.text2ct.attention_fwd`` / ``attention_bwd`` (fake impls, autograd), so the
    call traces under ``torch.compile`` and runs on fake CUDA tensors in ``FakeTensorMode``. Head sizes
    16/32/64/128, fp16/bf16/fp32. On CPU tensors it needs ``TRITON_INTERPRET=1``.
  * ``torch``: ``F.scaled_dot_product_attention`` (PyTorch picks flash/efficient/cuDNN/math itself).
  * ``xformers``: ``xformers.ops.memory_efficient_attention``, CUDA only, optional, only without a mask.

Choice, first match wins: ``with ops.backend(name)`` > ``TEXT2CT_ATTENTION`` (auto|triton|torch=sdpa|xformers,
attention only) > ``TEXT2CT_BACKEND`` > auto. ``cpp`` means torch here. ``auto`` on CUDA tensors: Triton
when it can serve the call, else xformers when installed and no mask is given, else torch; an unsupported
head size or dtype, or more than 65535 (batch, head) pairs (one program each on the grid's y axis), falls
back with a one-time notice. On CPU tensors auto is torch. A forced backend that
cannot serve the call makes ``attention`` raise ``ValueError`` (forced ``xformers`` with a mask falls back to
torch with a notice); ``choose_attention_backend`` only reports it.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from . import backend as _backend
from .backend import constant_result, requested_backend, triton_usable, xformers_available
from .library import custom_op

TRITON_HEAD_DIMS = (16, 32, 64, 128)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ATTENTION_CHOICES = ("auto", "triton", "torch", "xformers")
_noticed: set[str] = set()
MAX_GRID_Y = 65535  # CUDA's limit on a launch grid's y and z axes


def validate_attention(q, k, v, key_padding_mask) -> None:
    """Raise one clear ``ValueError`` for a call no backend can serve."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"attention: {name} must be a float tensor of shape (B, H, N, D)")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, heads or head size")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if key_padding_mask is not None:
        if (not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool
                or tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2])):
            got = (f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
                   if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask).__name__)
            raise ValueError(f"attention: key_padding_mask must be bool of shape (B, Nk) = "
                             f"({k.shape[0]}, {k.shape[2]}), got {got}")
        if key_padding_mask.device != k.device:
            raise ValueError(f"attention: key_padding_mask is on {key_padding_mask.device}, k on {k.device}")


# ----------------------------------------------------------------------------------------- torch path

def attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """Reference path: ``F.scaled_dot_product_attention``; query rows with no key to attend set to zero."""
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    mask = key_padding_mask[:, None, :]  # (B, 1 or Nq, Nk)
    if is_causal:
        mask = mask & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    empty = ~mask.any(dim=-1, keepdim=True)  # rows whose every key is masked: softmax would give NaN
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=(mask | empty)[:, None])
    return out.masked_fill(empty[:, None], 0.0)


def attention_xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """xformers' memory-efficient attention (no mask); it wants (B, N, H, D), so transpose views."""
    import xformers.ops as xops

    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


# --------------------------------------------------------------------------- triton path (custom ops)

@custom_op("text2ct::attention_fwd")
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   key_padding_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: (O (B, H, Nq, D), LSE (B, H, Nq) fp32)."""
    from text2ct_engine.kernels.attention import attention_forward

    return attention_forward(q, k, v, key_padding_mask)


@_attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, key_padding_mask):
    B, H, Nq, D = q.shape
    return q.new_empty((B, H, Nq, D)), q.new_empty((B, H, Nq), dtype=torch.float32)


@custom_op("text2ct::attention_bwd", differentiable=False)
def _attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward: (dQ, dK, dV) from dO and the forward's O and LSE."""
    from text2ct_engine.kernels.attention import attention_backward

    return attention_backward(grad_out, q, k, v, out, lse, key_padding_mask)


@_attention_bwd.register_fake
def _attention_bwd_fake(grad_out, q, k, v, out, lse, key_padding_mask):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fwd_setup_context(ctx, inputs, output) -> None:
    q, k, v, key_padding_mask = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.mark_non_differentiable(lse)


def _fwd_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = torch.ops.text2ct.attention_bwd(grad_out, q, k, v, out, lse, key_padding_mask)
    return dq, dk, dv, None


_attention_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The fused Triton kernels through the ``text2ct::attention_fwd`` custom op (autograd included)."""
    return torch.ops.text2ct.attention_fwd(q, k, v, key_padding_mask)[0]


# ---------------------------------------------------------------------------------- backend choice

def _notice(key: str, message: str) -> None:
    if key not in _noticed:
        _noticed.add(key)
        warnings.warn(message, stacklevel=3)


@constant_result
def _attention_request() -> tuple[str, str]:
    """(requested name, where it came from) before resolving ``auto``.

    Dynamo cannot trace ``ContextVar.get``; under ``torch.compile`` this runs once at trace time and
    its answer is baked into the graph (recompile after changing the backend).
    """
    scoped = _backend._override.get()
    if scoped is not None:
        return scoped, "ops.backend()"
    env = os.environ.get("TEXT2CT_ATTENTION", "").strip().lower()
    if env and env != "auto":
        env = "torch" if env == "sdpa" else env
        if env not in ATTENTION_CHOICES:
            raise ValueError(f"unknown TEXT2CT_ATTENTION={env!r}: choose one of {', '.join(ATTENTION_CHOICES)}")
        return env, "TEXT2CT_ATTENTION"
    return requested_backend(), "TEXT2CT_BACKEND" if os.environ.get("TEXT2CT_BACKEND") else "default"


def _triton_blocker(q: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot serve q (None when they can)."""
    ok, why = triton_usable(q.device.type)
    if not ok:
        return why
    if q.dim() == 4 and q.shape[-1] not in TRITON_HEAD_DIMS:
        return f"head size {q.shape[-1]} is not one of the Triton kernel's {TRITON_HEAD_DIMS}"
    if q.dtype not in TRITON_DTYPES:
        return f"dtype {q.dtype} is not one of the Triton kernel's fp16/bf16/fp32"
    if q.dim() == 4 and q.shape[0] * q.shape[1] > MAX_GRID_Y:
        return (f"batch x heads = {q.shape[0] * q.shape[1]} exceeds the {MAX_GRID_Y} programs of a CUDA grid's "
                f"second axis, which the Triton kernels give one (batch, head) each")
    return None


def _choose(q: torch.Tensor, key_padding_mask: torch.Tensor | None) -> tuple[str, str, str]:
    """(backend, reason, status); status is "ok", "fallback" (a wanted backend could not serve the call,
    worth a notice) or "error" (a forced backend cannot run it: ``attention`` raises ``ValueError``)."""
    asked, source = _attention_request()
    if asked == "cpp":
        return "torch", f"forced cpp by {source}: attention's CPU path is torch scaled_dot_product_attention", "ok"
    if asked == "torch":
        return "torch", f"forced torch by {source}", "ok"
    if asked == "triton":
        blocker = _triton_blocker(q)
        if blocker is not None:
            return "triton", f"triton was forced by {source} but cannot run this call: {blocker}", "error"
        return "triton", f"forced triton by {source}", "ok"
    if asked == "xformers":
        if not xformers_available():
            return "xformers", f"xformers was forced by {source} but is not installed", "error"
        if q.device.type != "cuda":
            return "xformers", f"xformers was forced by {source} but needs CUDA tensors, got {q.device}", "error"
        if key_padding_mask is not None:
            return "torch", "xformers path takes no key_padding_mask: torch scaled_dot_product_attention", "fallback"
        return "xformers", f"forced xformers by {source}", "ok"
    if q.device.type != "cuda":
        return "torch", "auto: torch scaled_dot_product_attention on non-CUDA tensors", "ok"
    blocker = _triton_blocker(q)
    if blocker is None:
        return "triton", "auto: fused Triton attention on CUDA tensors", "ok"
    if xformers_available() and key_padding_mask is None:
        return "xformers", f"auto: xformers memory_efficient_attention because {blocker}", "fallback"
    return "torch", f"auto: torch scaled_dot_product_attention because {blocker}", "fallback"


def choose_attention_backend(q: torch.Tensor, key_padding_mask: torch.Tensor | None = None
                             ) -> tuple[str, str]:
    """(backend, reason) that ``attention`` uses for this tensor right now: triton, torch or xformers.

    Never raises for a forced backend that cannot run (the reason says so; ``attention`` raises then).
    """
    name, reason, _ = _choose(q, key_padding_mask)
    return name, reason


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """Softmax(q k^T / sqrt(D)) v over the keys that ``key_padding_mask`` keeps.

    ``is_causal``: query i attends to keys 0..i only (the CLIP text tower). The fused kernels are
    non-causal, so causal calls, short text sequences, always take torch's scaled_dot_product_attention.
    """
    validate_attention(q, k, v, key_padding_mask)
    if is_causal:
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"attention: is_causal needs as many queries as keys, got {q.shape[2]} and {k.shape[2]}")
        return attention_torch(q, k, v, key_padding_mask, is_causal=True)
    name, reason, status = _choose(q, key_padding_mask)
    if status == "error":
        raise ValueError(f"attention: {reason}")
    if status == "fallback":
        _notice(reason, f"text2ct attention: {reason} (shown once)")
    if name == "triton":
        return attention_triton(q, k, v, key_padding_mask)
    if name == "xformers":
        return attention_xformers(q, k, v)
    return attention_torch(q, k, v, key_padding_mask)
