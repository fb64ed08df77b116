"""Exact slab-wise VAE decoding: the same volume as ``vae.decode``, in a fraction of the device memory.

The decoder is a chain of local operators (3x3x3 / 1x1x1 convs, trilinear x2 upsampling, SiLU, residual
adds) and one global one, GroupNorm, whose statistics span the whole volume. So each layer is run in slabs
along the first spatial axis:

* a GroupNorm's per-(sample, group) mean and variance are accumulated over all slabs first (float64 sums),
  then applied, with SiLU, on the fly to each slab the next conv reads, so normalised tensors never exist;
* a conv's output slab reads its input slab plus a one-row halo on each side (zero rows only at the
  volume's true borders), so every output voxel sees exactly the inputs it would see untiled;
* trilinear x2 upsampling of a slab reads one extra input row each side, so interior cuts interpolate
  between real neighbours, never clamp.

Whole activations live on ``storage`` (the CPU by default when computing on CUDA); the compute device
holds one slab and its halo at a time. No approximation is made: unlike overlapping-window blending the
result equals the untiled decode up to float rounding. Attention blocks in the decoder (not in Text2CT's
VAE) have no exact slab form and are refused.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models.layers import GroupNorm, MaisiConv
from .models.vae import AutoencoderKL, ResBlock, Upsample

RowSource = Callable[[int, int], torch.Tensor]  # (lo, hi) -> rows lo:hi of a tensor, on the compute device


def _conv3d(module: nn.Module) -> nn.Conv3d:
    while not isinstance(module, nn.Conv3d):
        module = module.conv
    return module


class SlabDecoder:
    """Run ``vae.decode`` slab by slab; see the module docstring for why the result is exact."""

    def __init__(self, vae: AutoencoderKL, slab: int = 32, storage: torch.device | str | None = None) -> None:
        if slab < 1:
            raise ValueError(f"slab must be at least 1 row, got {slab}")
        self.vae, self.slab = vae, int(slab)
        self.compute = next(vae.parameters()).device
        if storage is None:
            storage = "cpu" if self.compute.type == "cuda" else self.compute
        self.storage = torch.device(storage)
        for block in vae.decoder.blocks:
            if not isinstance(block, (MaisiConv, ResBlock, Upsample, GroupNorm)):
                raise ValueError(f"tiled decoding has no exact form for {type(block).__name__} blocks: "
                                 f"decode this VAE without tiling")
            if isinstance(block, Upsample) and block.transposed:
                raise ValueError("tiled decoding does not support use_convtranspose VAEs: decode without tiling")

    # ---------------------------------------------------------------- row sources
    def stored_rows(self, x: torch.Tensor, norm: GroupNorm | None = None,
                    stats: tuple[torch.Tensor, torch.Tensor] | None = None, act: bool = False) -> RowSource:
        """Rows of a stored tensor, normalised with precomputed statistics (and SiLU) on the way in."""
        def rows(lo: int, hi: int) -> torch.Tensor:
            chunk = x[:, :, lo:hi].to(self.compute, non_blocking=True)
            if norm is not None:
                chunk = self.normalize(chunk, norm, *stats)
            return F.silu(chunk) if act else chunk
        return rows

    def upsampled_rows(self, source: RowSource, length: int) -> RowSource:
        """Rows of the trilinear x2 upsampling of a source with ``length`` rows."""
        def rows(lo: int, hi: int) -> torch.Tensor:
            in_lo, in_hi = max(0, lo // 2 - 1), min(length, (hi + 1) // 2 + 1)
            up = F.interpolate(source(in_lo, in_hi), scale_factor=2.0, mode="trilinear")
            return up[:, :, lo - 2 * in_lo:hi - 2 * in_lo]
        return rows

    # ---------------------------------------------------------------- GroupNorm in two passes
    def group_stats(self, x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-(sample, group) mean and 1/std of a stored tensor, summed slab by slab in float64."""
        n, length = x.shape[0], x.shape[2]
        total = torch.zeros(n, groups, dtype=torch.float64, device=self.compute)
        total_sq = torch.zeros_like(total)
        for lo in range(0, length, self.slab):
            chunk = x[:, :, lo:lo + self.slab].to(self.compute, non_blocking=True).reshape(n, groups, -1)
            total += chunk.sum(-1, dtype=torch.float64)  # accumulate in float64 without a float64 copy
            total_sq += torch.linalg.vector_norm(chunk, dim=-1, dtype=torch.float64).square()
        count = x[0].numel() / groups
        mean = total / count
        var = (total_sq / count - mean.square()).clamp_min(0)
        return mean.float(), torch.rsqrt(var + eps).float()

    @staticmethod
    def normalize(chunk: torch.Tensor, norm: GroupNorm, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
        n, c = chunk.shape[:2]
        g = norm.num_groups
        # one float32 working copy, normalised in place (the chunk may be a view of the stored tensor)
        y = chunk.to(torch.float32, copy=True)
        grouped = y.view(n, g, c // g, -1)
        grouped.sub_(mean[:, :, None, None]).mul_(rstd[:, :, None, None])
        y.mul_(norm.weight.float().reshape(1, c, 1, 1, 1)).add_(norm.bias.float().reshape(1, c, 1, 1, 1))
        return y.to(chunk.dtype)

    def stats_for(self, x: torch.Tensor, norm: GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
        return self.group_stats(x, norm.num_groups, norm.eps)

    # ---------------------------------------------------------------- slab-wise conv
    def conv(self, source: RowSource, shape: tuple[int, ...], conv: nn.Conv3d, dtype: torch.dtype,
             residual: torch.Tensor | None = None, shortcut: nn.Module | None = None) -> torch.Tensor:
        """conv(source) [+ shortcut(residual)] over a source of ``shape`` (N, C, L, H, W), computed ``slab``
        output rows at a time and stored on ``storage``."""
        r = conv.kernel_size[0] // 2
        n, length, spatial = shape[0], shape[2], shape[3:]
        out = torch.empty((n, conv.out_channels, length, *spatial), dtype=dtype, device=self.storage)
        for a in range(0, length, self.slab):
            b = min(length, a + self.slab)
            lo, hi = max(0, a - r), min(length, b + r)
            chunk = source(lo, hi)
            if r:
                chunk = F.pad(chunk, (0, 0, 0, 0, r - (a - lo), r - (hi - b)))  # zeros at true borders only
            y = F.conv3d(chunk, conv.weight, conv.bias, stride=1, padding=(0, r, r))
            if residual is not None:
                res = residual[:, :, a:b].to(self.compute, non_blocking=True)
                y = y + (shortcut(res) if shortcut is not None else res)
            out[:, :, a:b] = y.to(self.storage, non_blocking=True)
        return out

    # ---------------------------------------------------------------- the decoder walk
    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        x = self.vae.post_quant_conv(z.to(self.compute)).to(self.storage)
        pending_norm: GroupNorm | None = None
        for block in self.vae.decoder.blocks:
            if isinstance(block, GroupNorm):  # the tail norm: applied (without SiLU) by the next conv
                pending_norm = block
            elif isinstance(block, MaisiConv):
                stats = self.stats_for(x, pending_norm) if pending_norm is not None else None
                x = self.conv(self.stored_rows(x, pending_norm, stats), x.shape, _conv3d(block), x.dtype)
                pending_norm = None
            elif isinstance(block, ResBlock):
                h = self.conv(self.stored_rows(x, block.norm1, self.stats_for(x, block.norm1), act=True),
                              x.shape, _conv3d(block.conv1), x.dtype)
                shortcut = None if isinstance(block.nin_shortcut, nn.Identity) else block.nin_shortcut
                x = self.conv(self.stored_rows(h, block.norm2, self.stats_for(h, block.norm2), act=True),
                              h.shape, _conv3d(block.conv2), h.dtype, residual=x, shortcut=shortcut)
                del h
            else:  # Upsample: trilinear x2 then conv, both slab-wise
                up_shape = (*x.shape[:2], *(2 * s for s in x.shape[2:]))
                x = self.conv(self.upsampled_rows(self.stored_rows(x), x.shape[2]), up_shape,
                              _conv3d(block), x.dtype)
        return x


def tiled_decode(vae: AutoencoderKL, z: torch.Tensor, slab: int = 32,
                 storage: torch.device | str | None = None) -> torch.Tensor:
    """``vae.decode(z)`` computed exactly in slabs of ``slab`` rows (see :class:`SlabDecoder`)."""
    return SlabDecoder(vae, slab, storage)(z)
