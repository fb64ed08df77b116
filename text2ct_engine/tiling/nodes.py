"""Row nodes of the exact slab-wise VAE passes: activations whose rows lo:hi (along the first spatial axis)
are produced on demand on the compute device, and the whole-volume GroupNorm statistics they need.
See :mod:`text2ct_engine.tiling` for why the result equals the untiled pass."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.layers import GroupNorm

CARRY = 2  # rows below a slab that a ResBlock still reads of the input it overwrites (its two 3x3x3 convs)
Stats = tuple[torch.Tensor, torch.Tensor]  # per-(sample, group) mean and 1/std
Affine = tuple[torch.Tensor, torch.Tensor]  # per-(sample, channel) scale and shift, (N, C, 1, 1, 1) each
DIMS = (2, 3, 4)  # the spatial axes
WORK_BYTES = 64 * 2 ** 20  # float working copy of rows normalised a block of channels at a time


def conv3d_of(module: nn.Module) -> nn.Conv3d:
    """The nn.Conv3d inside a MAISI conv wrapper (or the module itself)."""
    while not isinstance(module, nn.Conv3d):
        module = module.conv
    return module


# ------------------------------------------------------------------------------------------ statistics
class Moments:
    """Per-(sample, channel) sums of x and x^2 over the rows added so far, accumulated in float64.

    A reduction asked to widen bf16 to float64 first makes a float64 copy of its whole input (on CUDA as
    on CPU; only half -> float32 is widened inside the kernel): 2 GiB for the widest slab at 512x512x128,
    as much as the rest of the tiled decode. So rows are widened a block of channels at a time, the copy
    kept within ``WORK_BYTES`` (and visible to the memory planner, which a kernel's internal copy is not)."""

    def __init__(self, n: int, c: int, device: torch.device) -> None:
        self.sum = torch.zeros(n, c, dtype=torch.float64, device=device)
        self.sq = torch.zeros_like(self.sum)

    def add(self, rows: torch.Tensor) -> None:
        c = rows.shape[1]
        step = c if rows.dtype == torch.float64 else max(1, WORK_BYTES * c // max(rows.numel() * 8, 1))
        for c0 in range(0, c, step):
            block = rows[:, c0:c0 + step].to(torch.float64)
            self.sum[:, c0:c0 + step] += block.sum(DIMS)
            self.sq[:, c0:c0 + step] += torch.linalg.vector_norm(block, dim=DIMS).square()

    def stats(self, norm: GroupNorm, voxels: int, work: torch.dtype) -> Stats:
        """Mean and 1/std per (sample, group) of ``norm``'s groups, over ``voxels`` positions per channel."""
        n, g = self.sum.shape[0], norm.num_groups
        count = voxels * self.sum.shape[1] / g
        mean = self.sum.view(n, g, -1).sum(-1) / count
        var = (self.sq.view(n, g, -1).sum(-1) / count - mean.square()).clamp_min(0)
        return mean.to(work), torch.rsqrt(var + norm.eps).to(work)


def affine(norm: GroupNorm, mean: torch.Tensor, rstd: torch.Tensor) -> Affine:
    """GroupNorm with given statistics as ``x * scale + shift`` per (sample, channel): scale = rstd * weight,
    shift = bias - mean * scale (the form of torch's own GroupNorm kernels), in the statistics' dtype."""
    (n, g), c = mean.shape, norm.num_channels
    scale = (rstd[:, :, None] * norm.weight.to(rstd.dtype).view(g, -1)).reshape(n, c, 1, 1, 1)
    mean = mean.repeat_interleave(c // g, 1).view(n, c, 1, 1, 1)
    return scale, norm.bias.to(rstd.dtype).view(1, c, 1, 1, 1) - mean * scale


def normalize(chunk: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, act: bool = False) -> torch.Tensor:
    """``chunk * scale + shift`` (then SiLU when ``act``) computed in the dtype of ``scale`` (float32,
    float64 for float64 rows) and rounded to the rows' dtype. One fused pass into a new tensor (``chunk``
    may be a view of a stored tensor); rows in a narrower dtype are widened a block of channels at a time,
    so the float working copies stay within ``WORK_BYTES``."""
    if chunk.dtype == scale.dtype:
        out = torch.addcmul(shift, chunk, scale)
    else:
        c = chunk.shape[1]
        out = torch.empty(chunk.shape, dtype=chunk.dtype, device=chunk.device)
        step = max(1, WORK_BYTES * c // (chunk.numel() * scale.dtype.itemsize))
        for c0 in range(0, c, step):
            c1 = min(c, c0 + step)
            out[:, c0:c1] = torch.addcmul(shift[:, c0:c1], chunk[:, c0:c1].to(scale.dtype), scale[:, c0:c1])
    return F.silu(out, inplace=True) if act else out


# ------------------------------------------------------------------------------------------ row nodes
class Node:
    """An activation (N, C, L, H, W) whose rows lo:hi are produced on demand on the compute device."""

    shape: tuple[int, ...]

    @property
    def length(self) -> int:
        return self.shape[2]

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        raise NotImplementedError


class Stored(Node):
    """A whole activation on the storage device (``tensor`` None in a shape-only dry run), with the
    per-channel ``moments`` taken while it was written.

    It can be overwritten in place, slab by slab (:meth:`overwrite`), by a node that reads it: the new rows
    that would land on the ``CARRY`` original rows the next slab's halo still reads are held back (on the
    compute device) until then, so every read sees original rows and needs no copy."""

    def __init__(self, tensor: torch.Tensor | None, shape: Sequence[int], compute: torch.device) -> None:
        self.tensor, self.shape, self.compute = tensor, tuple(shape), compute
        self.moments: Moments | None = None
        self.written = 0  # rows below hold new content while overwriting
        self.held: list[tuple[int, torch.Tensor]] = []  # new rows not written yet: (first row, rows)

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        if lo < self.written:
            raise RuntimeError(f"rows {lo}:{hi} read after rows below {self.written} were overwritten")
        return self.tensor[:, :, lo:hi].to(self.compute, non_blocking=True)

    def overwrite(self, a: int, b: int, new: torch.Tensor | None) -> None:
        """Take new rows a:b (slabs in order; None flushes): write those below b - CARRY, hold the rest."""
        if new is not None:
            self.held.append((a, new))
        cut = b - CARRY if new is not None else self.length
        held = []
        for lo, rows in self.held:
            hi = lo + rows.shape[2]
            if lo < cut:
                self.tensor[:, :, lo:min(hi, cut)].copy_(rows[:, :, :min(hi, cut) - lo])
            if hi > cut:
                held.append((max(lo, cut), rows[:, :, max(lo, cut) - lo:].clone()))
        self.held, self.written = held, max(self.written, cut)

    def finish(self, moments: Moments | None) -> "Stored":
        """End a write: flush held rows; the content is now what was written, with these moments."""
        self.overwrite(0, self.length, None)
        self.written, self.moments = 0, moments
        return self


class Conv(Node):
    """``conv(src) [+ shortcut(residual)]`` for a stride-1 conv with 'same' padding.

    Output rows a:b read src rows a-r:b+r clipped to the volume; where a border clips them the conv pads
    r zero rows on both sides of that axis and the surplus output rows are sliced off (no padded copy).
    The conv branch is computed before the residual is read, so a :class:`Memo` input serves both.
    """

    def __init__(self, src: Node, conv: nn.Conv3d, residual: Node | None = None,
                 shortcut: nn.Module | None = None) -> None:
        self.src, self.conv, self.residual, self.shortcut = src, conv, residual, shortcut
        self.shape = (src.shape[0], conv.out_channels, *src.shape[2:])

    def rows(self, a: int, b: int) -> torch.Tensor:
        r = self.conv.kernel_size[0] // 2
        lo, hi = max(0, a - r), min(self.length, b + r)
        pad = r if (a - lo < r or hi - b < r) else 0
        y = F.conv3d(self.src.rows(lo, hi), self.conv.weight, self.conv.bias, padding=(pad, r, r))
        start = a - (lo + r - pad)  # output row i is centred on input row lo + r - pad + i
        y = y[:, :, start:start + b - a]
        if self.residual is not None:
            res = self.residual.rows(a, b)
            y += self.shortcut(res) if self.shortcut is not None else res
        return y


class Upsampled(Node):
    """Trilinear x2 upsampling (align_corners=False) of every spatial axis of ``src``."""

    def __init__(self, src: Node) -> None:
        self.src = src
        self.shape = (*src.shape[:2], *(2 * s for s in src.shape[2:]))

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        in_lo, in_hi = max(0, lo // 2 - 1), min(self.src.length, (hi + 1) // 2 + 1)
        up = F.interpolate(self.src.rows(in_lo, in_hi), scale_factor=2.0, mode="trilinear")
        return up[:, :, lo - 2 * in_lo:hi - 2 * in_lo]


class Downsampled(Node):
    """MAISI's Downsample: one zero row padded at the high end of every spatial axis, then a stride-2 3x3x3
    conv without padding. Output row i reads input rows 2i..2i+2; only the volume's last output row can
    reach the padded row (at most one, for an even length), so a slab pads it only there."""

    def __init__(self, src: Node, conv: nn.Conv3d) -> None:
        self.src, self.conv = src, conv
        self.shape = (src.shape[0], conv.out_channels, *((s - 2) // 2 + 1 for s in src.shape[2:]))

    def rows(self, a: int, b: int) -> torch.Tensor:
        lo, hi = 2 * a, 2 * b + 1
        end = min(hi, self.src.length)
        x = F.pad(self.src.rows(lo, end), (0, 1, 0, 1, 0, hi - end))
        return F.conv3d(x, self.conv.weight, self.conv.bias, stride=self.conv.stride)


class Normed(Node):
    """GroupNorm of ``src`` with whole-volume statistics (as an :func:`affine` map), then SiLU when ``act``."""

    def __init__(self, src: Node, coefficients: Affine | None, act: bool) -> None:
        self.src, self.coefficients, self.act = src, coefficients, act
        self.shape = src.shape

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        return normalize(self.src.rows(lo, hi), *self.coefficients, act=self.act)


class Memo(Node):
    """A computed ResBlock input, read twice per output slab (by the conv branch with a halo, then by the
    shortcut): it keeps the last rows it produced, so the second read is a slice, not a recomputation.
    The kept rows are dropped before the next ones are computed."""

    def __init__(self, src: Node) -> None:
        self.src, self.shape = src, src.shape
        self.kept: tuple[int, int, torch.Tensor] | None = None

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        if self.kept is not None and self.kept[0] <= lo and hi <= self.kept[1]:
            k_lo, _, t = self.kept
            return t[:, :, lo - k_lo:hi - k_lo]
        self.kept = None
        t = self.src.rows(lo, hi)
        self.kept = (lo, hi, t)
        return t

