"""Building blocks shared by the VAE and the UNet.

Parameter names follow MONAI's MAISI networks so their ``state_dict`` loads with ``strict=True``: a MONAI
``Convolution`` keeps its conv under ``.conv``, a ``MaisiConvolution`` one level deeper (``.conv.conv``).
Every GroupNorm and attention goes through :mod:`text2ct_engine.ops`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import ops


def conv_nd(spatial_dims: int, *args, transposed: bool = False, **kwargs) -> nn.Module:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if transposed:
        return (nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d)(*args, **kwargs)
    return (nn.Conv2d if spatial_dims == 2 else nn.Conv3d)(*args, **kwargs)


class Conv(nn.Module):
    """A convolution stored as ``.conv`` (the key layout of MONAI's ``Convolution(conv_only=True)``)."""

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, transposed: bool = False) -> None:
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding
        extra = {"output_padding": stride - 1} if transposed else {}
        self.conv = conv_nd(spatial_dims, in_ch, out_ch, kernel_size, stride=stride, padding=padding,
                            transposed=transposed, **extra)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class MaisiConv(nn.Module):
    """A :class:`Conv` one level deeper (``.conv.conv``), as MAISI's ``MaisiConvolution`` stores it.

    MAISI splits these convolutions along one axis to save memory; here the math is the plain convolution
    and memory is the engine's job (tiled decoding, checkpointing), not each layer's.
    """

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, transposed: bool = False) -> None:
        super().__init__()
        self.conv = Conv(spatial_dims, in_ch, out_ch, kernel_size, stride, padding, transposed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` parameters, computed by :func:`ops.group_norm` with an optional fused SiLU / add."""

    def forward(self, x: torch.Tensor, act: str | None = None, add: torch.Tensor | None = None) -> torch.Tensor:
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, act=act, add=add)


def to_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*D) -> (B, H, N, D)."""
    b, n, _ = x.shape
    return x.reshape(b, n, heads, -1).transpose(1, 2)


def from_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B, N, H*D)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, upcast: bool) -> torch.Tensor:
    """``ops.attention`` on (B, H, N, D) tensors, in fp32 when ``upcast`` (MONAI's ``upcast_attention``)."""
    if upcast and q.dtype in (torch.float16, torch.bfloat16):
        return ops.attention(q.float(), k.float(), v.float()).to(v.dtype)
    return ops.attention(q, k, v)


class SelfAttention(nn.Module):
    """Multi-head self-attention over (B, N, C) tokens; MONAI ``SABlock`` parameter names.

    ``use_combined_linear`` keeps one ``qkv`` projection laid out as (3, heads, head_dim); ``include_fc``
    adds the output projection ``out_proj``.
    """

    def __init__(self, channels: int, heads: int, head_dim: int, qkv_bias: bool, include_fc: bool,
                 use_combined_linear: bool, dropout: float = 0.0, upcast: bool = False) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads, self.upcast, self.combined = heads, upcast, use_combined_linear
        self.out_proj = nn.Linear(inner, channels) if include_fc else nn.Identity()
        if use_combined_linear:
            self.qkv = nn.Linear(channels, 3 * inner, bias=qkv_bias)
            self.to_q = self.to_k = self.to_v = nn.Identity()
        else:
            self.to_q = nn.Linear(channels, inner, bias=qkv_bias)
            self.to_k = nn.Linear(channels, inner, bias=qkv_bias)
            self.to_v = nn.Linear(channels, inner, bias=qkv_bias)
            self.qkv = nn.Identity()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.combined:
            b, n, _ = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = (to_heads(p(x), self.heads) for p in (self.to_q, self.to_k, self.to_v))
        return self.drop(self.out_proj(from_heads(attend(q, k, v, self.upcast))))


class CrossAttention(nn.Module):
    """Multi-head attention from (B, N, C) tokens to a (B, M, Cctx) context; MONAI ``CrossAttentionBlock``.

    Without a context it attends to its own tokens, as MONAI's block does.
    """

    def __init__(self, channels: int, context_dim: int | None, heads: int, head_dim: int,
                 dropout: float = 0.0, upcast: bool = False) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(channels, inner, bias=False)
        self.to_k = nn.Linear(context_dim or channels, inner, bias=False)
        self.to_v = nn.Linear(context_dim or channels, inner, bias=False)
        self.out_proj = nn.Linear(inner, channels)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        kv = x if context is None else context
        q = to_heads(self.to_q(x), self.heads)
        k, v = to_heads(self.to_k(kv), self.heads), to_heads(self.to_v(kv), self.heads)
        return self.drop(self.out_proj(from_heads(attend(q, k, v, self.upcast))))


class SpatialAttention(nn.Module):
    """GroupNorm, then self-attention over every voxel, plus the input; MONAI ``SpatialAttentionBlock``."""

    def __init__(self, channels: int, head_channels: int | None, groups: int, eps: float,
                 include_fc: bool, use_combined_linear: bool) -> None:
        super().__init__()
        if head_channels and channels % head_channels:
            raise ValueError(f"{channels} channels are not divisible by num_head_channels={head_channels}")
        heads = channels // head_channels if head_channels else 1
        self.norm = GroupNorm(groups, channels, eps)
        self.attn = SelfAttention(channels, heads, channels // heads, qkv_bias=True, include_fc=include_fc,
                                  use_combined_linear=use_combined_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        h = self.norm(x).reshape(b, c, -1).transpose(1, 2)
        h = self.attn(h).transpose(1, 2).reshape(x.shape)
        return x + h


class GEGLUMLP(nn.Module):
    """Linear to 2x width, value * gelu(gate), linear back; MONAI ``MLPBlock(act="GEGLU")``."""

    def __init__(self, channels: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(channels, channels * mult * 2)
        self.linear2 = nn.Linear(channels * mult, channels)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.linear1(x).chunk(2, dim=-1)
        return self.drop(self.linear2(self.drop(value * F.gelu(gate))))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and GEGLU MLP; MONAI ``DiffusionUNetTransformerBlock``."""

    def __init__(self, channels: int, heads: int, head_dim: int, context_dim: int | None, dropout: float,
                 upcast: bool, include_fc: bool, use_combined_linear: bool) -> None:
        super().__init__()
        self.attn1 = SelfAttention(channels, heads, head_dim, qkv_bias=False, include_fc=include_fc,
                                   use_combined_linear=use_combined_linear, dropout=dropout, upcast=upcast)
        self.ff = GEGLUMLP(channels, dropout=dropout)
        self.attn2 = CrossAttention(channels, context_dim, heads, head_dim, dropout=dropout, upcast=upcast)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(channels), nn.LayerNorm(channels), nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context=context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, 1x1 conv in, transformer blocks over voxels, 1x1 conv out, plus the input."""

    def __init__(self, spatial_dims: int, channels: int, heads: int, head_dim: int, layers: int, groups: int,
                 eps: float, context_dim: int | None, dropout: float, upcast: bool, include_fc: bool,
                 use_combined_linear: bool) -> None:
        super().__init__()
        inner = heads * head_dim
        self.norm = GroupNorm(groups, channels, eps)
        self.proj_in = Conv(spatial_dims, channels, inner, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner, heads, head_dim, context_dim, dropout, upcast, include_fc, use_combined_linear)
            for _ in range(layers))
        self.proj_out = Conv(spatial_dims, inner, channels, kernel_size=1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]
        h = self.proj_in(self.norm(x))
        inner, spatial = h.shape[1], h.shape[2:]
        h = h.flatten(2).transpose(1, 2)  # (B, voxels, C): channels last, voxels in C order
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.transpose(1, 2).reshape(b, inner, *spatial)
        return x + self.proj_out(h)


def maybe_checkpoint(module: nn.Module, enabled: bool, *args):
    """Run ``module(*args)``, recomputing it in backward instead of storing activations when ``enabled``."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)
