"""Exact slab-wise VAE decoding: the same volume as ``vae.decode``, in a fraction of the memory.

The decoder is a chain of local operators (3x3x3 / 1x1x1 convs, trilinear x2 upsampling, SiLU, residual
adds) and one global one, GroupNorm, whose statistics span the whole volume. Every activation is therefore a
*node* whose rows lo:hi (along the first spatial axis) can be produced on demand on the compute device:

* a conv's output rows a:b read rows a-r:b+r of its input (fewer only at the volume's true borders, where
  the conv pads with zeros as it does untiled), so every output voxel sees exactly its untiled inputs;
* trilinear x2 upsampling of rows reads one extra input row each side, so interior cuts interpolate between
  real neighbours, never clamp;
* a GroupNorm needs its input's per-(sample, group) mean and variance first: per-channel sums (float64) are
  taken while a tensor is stored, or in a *sweep* over all slabs of a computed one; the norm, with SiLU, is
  then applied on the fly to the rows the next conv reads.

A node is either *stored* (the whole activation kept on ``storage``, by default the CPU when computing on
CUDA) or *computed* from the nodes it reads, recursively down to stored ones; sweeping a computed node
recomputes its inputs, with their halos, slab by slab. The compute device holds one slab (plus halo) of
each node on that path at a time. A ResBlock's output is written over a stored tensor of its shape that
dies with the block (its inner activation, or its input when the shortcut is the identity); the new rows
that would land on the two original rows the next slab's halo still reads are held back until then. No
approximation is made anywhere: unlike overlapping-window blending, the result equals the untiled decode
up to float rounding.

What to store trades host memory against compute (``host_memory``); for Text2CT's 512x512x128 output,
whose full-resolution level has C = 64 channels and is fed by 2C = 128 upsampled ones:

* ``"fast"`` stores every conv output: each conv runs once (plus one-row halos). The first full-resolution
  ResBlock holds the upsampled 2C-channel tensor and its C-channel inner activation (overwritten by the
  block's output): 2C + C channels at full resolution, 12 GiB in bf16.
* ``"low"`` (default) does not store upsampled tensors: the upsample conv is recomputed from the
  half-resolution input in each sweep that reads it (3 times: its norm's statistics, the inner
  activation's, the output), and a ResBlock with an identity shortcut recomputes its inner activation
  instead of storing it (its first conv runs twice). The full-resolution level then holds the
  half-resolution input (2C channels at 1/8 of the voxels) and one C-channel tensor, 1/4 + 1 = 1.25 units
  of C full-resolution channels against 3 (5 GiB in bf16). A level is streamed this way only where storing
  all of it would hold more bytes than the streamed decode holds at its peak (shape-only dry runs decide),
  so the lower-resolution levels, whose tensors are smaller, still run every conv once.

Where the stored activations live (``storage``): the host by default when computing on a GPU, since that is
what lets an 8 GB card decode 512x512x128. But every slab then crosses PCIe: 54 GiB per decode in ``low``
mode at that size (counted in benchmarks/RESULTS.md), seconds at 12-25 GB/s, against 1-2 s of convs. With
``storage="auto"`` the decoder stores on the compute device when the stored bytes (from the shape-only dry
run) plus a slab's working set fit in its free memory, and on the host otherwise; if the device runs out
of memory anyway, the decode is run again with host storage (same result: the storage only holds values).

Attention blocks in the decoder (not in Text2CT's VAE) have no exact slab form and are refused.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models.layers import GroupNorm, MaisiConv
from .models.vae import AutoencoderKL, ResBlock, Upsample

HOST_MEMORY = ("low", "fast")
STORAGE = ("auto", "host", "device")
# A slab's working set on the compute device, in (slab + halo) rows of the widest *stored* activation. Counted
# on fake tensors at 512x512x128 bf16: 5.7-6.1 such rows in "low" mode (whose widest tensors, the upsampled
# ones, are recomputed rather than stored) and 1.9 in "fast"; 8 leaves room for both.
WORKING_TENSORS = 8
FREE_MARGIN = 0.9  # of the free device memory, for the allocator's rounding and fragmentation
CARRY = 2  # rows below a slab that a ResBlock still reads of the input it overwrites (its two 3x3x3 convs)
Stats = tuple[torch.Tensor, torch.Tensor]  # per-(sample, group) mean and 1/std
Affine = tuple[torch.Tensor, torch.Tensor]  # per-(sample, channel) scale and shift, (N, C, 1, 1, 1) each
DIMS = (2, 3, 4)  # the spatial axes
WORK_BYTES = 64 * 2 ** 20  # float working copy of rows normalised a block of channels at a time


def _conv3d(module: nn.Module) -> nn.Conv3d:
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


# ------------------------------------------------------------------------------------------ bookkeeping
@dataclass
class Ledger:
    """Bytes of whole activations held on storage: now, at the peak, and the peak within each level.

    A stored node's bytes count from its creation until the node is garbage (a weakref finalizer)."""
    live: int = 0
    peak: int = 0
    level_peaks: list[int] = field(default_factory=list)
    widest_row: int = 0  # bytes of one row (along the slab axis) of the widest stored activation

    def hold(self, owner: Stored, nbytes: int) -> None:
        self.widest_row = max(self.widest_row, nbytes // max(owner.length, 1))
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        if self.level_peaks:
            self.level_peaks[-1] = max(self.level_peaks[-1], self.live)
        weakref.finalize(owner, self.drop, nbytes)

    def drop(self, nbytes: int) -> None:
        self.live -= nbytes

    def new_level(self) -> None:
        self.level_peaks.append(self.live)


def decoder_levels(blocks: Sequence[nn.Module]) -> list[list[nn.Module]]:
    """The decoder's blocks cut into resolution levels: a new level starts at each Upsample."""
    levels: list[list[nn.Module]] = [[]]
    for block in blocks:
        if isinstance(block, Upsample):
            levels.append([])
        levels[-1].append(block)
    return levels


# ------------------------------------------------------------------------------------------ the decoder
class SlabDecoder:
    """Run ``vae.decode`` slab by slab; see the module docstring for why the result is exact and what
    ``host_memory`` keeps. After a call, ``peak_stored_bytes`` is the most bytes of whole activations that
    were held on storage at once, and ``streamed`` says which resolution levels were recomputed."""

    def __init__(self, vae: AutoencoderKL, slab: int = 32, storage: torch.device | str | None = None,
                 host_memory: str = "low") -> None:
        if slab < 1:
            raise ValueError(f"slab must be at least 1 row, got {slab}")
        if host_memory not in HOST_MEMORY:
            raise ValueError(f"host_memory must be one of {', '.join(HOST_MEMORY)}, got {host_memory!r}")
        self.vae, self.slab, self.host_memory = vae, int(slab), host_memory
        if isinstance(storage, str) and storage not in STORAGE:
            try:
                storage = torch.device(storage)
            except RuntimeError:
                raise ValueError(f"storage must be a device or one of {', '.join(STORAGE)}, got {storage!r}") from None
        self.compute = next(vae.parameters()).device
        self.host = torch.device("cpu") if self.compute.type == "cuda" else self.compute
        if storage is None or storage == "host":
            storage = self.host
        elif storage == "device":
            storage = self.compute
        self.auto_storage = storage == "auto"
        self.storage = self.host if self.auto_storage else torch.device(storage)
        for block in vae.decoder.blocks:
            if not isinstance(block, (MaisiConv, ResBlock, Upsample, GroupNorm)):
                raise ValueError(f"tiled decoding has no exact form for {type(block).__name__} blocks: "
                                 f"decode this VAE without tiling")
            if isinstance(block, Upsample) and block.transposed:
                raise ValueError("tiled decoding does not support use_convtranspose VAEs: decode without tiling")
        self.levels = decoder_levels(vae.decoder.blocks)
        self.dtype = torch.float32
        self.dry = False
        self.ledger = Ledger()
        self.peak_stored_bytes = 0
        self.streamed: list[bool] = []

    # ---------------------------------------------------------------- storing and statistics
    def slabs(self, length: int) -> list[tuple[int, int]]:
        return [(a, min(length, a + self.slab)) for a in range(0, length, self.slab)]

    def keep(self, tensor: torch.Tensor | None, shape: Sequence[int]) -> Stored:
        """A stored node for ``tensor`` (None: a dry run's placeholder), its bytes entered in the ledger."""
        node = Stored(tensor, shape, self.compute)
        self.ledger.hold(node, math.prod(shape) * self.dtype.itemsize)
        return node

    def allocate(self, shape: Sequence[int]) -> Stored:
        """A new stored tensor of ``shape`` (a placeholder in a dry run)."""
        return self.keep(None if self.dry else torch.empty(shape, dtype=self.dtype, device=self.storage), shape)

    def materialize(self, node: Node, into: Stored | None = None) -> Stored:
        """Sweep ``node`` slab by slab into a new tensor on storage, or over ``into`` (a stored tensor of the
        same shape that dies with this node, which may read it), taking its per-channel moments."""
        target = into if into is not None else self.allocate(node.shape)
        if self.dry:
            return target
        moments = Moments(*node.shape[:2], self.compute)
        for a, b in self.slabs(node.length):
            y = node.rows(a, b)
            moments.add(y)
            if into is None:
                target.tensor[:, :, a:b].copy_(y)
            else:
                target.overwrite(a, b, y)
        return target.finish(moments)

    def stats(self, node: Node, norm: GroupNorm) -> Stats | None:
        """``norm``'s statistics of ``node``: from its moments when stored, else from a sweep over it."""
        if self.dry:
            return None
        moments = node.moments if isinstance(node, Stored) else None
        if moments is None:
            moments = Moments(*node.shape[:2], self.compute)
            for a, b in self.slabs(node.length):
                moments.add(node.rows(a, b))
        work = torch.float64 if self.dtype == torch.float64 else torch.float32
        return moments.stats(norm, math.prod(node.shape[2:]), work)

    def normed(self, node: Node, norm: GroupNorm, act: bool) -> Normed:
        stats = self.stats(node, norm)
        return Normed(node, None if stats is None else affine(norm, *stats), act)

    # ---------------------------------------------------------------- the decoder walk
    def res_block(self, block: ResBlock, x: Node, stream: bool) -> Stored:
        """A ResBlock, stored over its inner activation h, or over its input x when x is stored and the
        shortcut is the identity. Streaming, h is then recomputed in the output sweep instead of stored."""
        identity = isinstance(block.nin_shortcut, nn.Identity)
        if not isinstance(x, Stored):
            x = Memo(x)
        h: Node = Conv(self.normed(x, block.norm1, act=True), _conv3d(block.conv1))
        if not (stream and identity and isinstance(x, Stored)):
            h = self.materialize(h)
        out = Conv(self.normed(h, block.norm2, act=True), _conv3d(block.conv2), residual=x,
                   shortcut=None if identity else block.nin_shortcut)
        return self.materialize(out, into=h if isinstance(h, Stored) else x)

    def conv_block(self, block: MaisiConv | Upsample, x: Node, pending: GroupNorm | None) -> Conv:
        """An Upsample (trilinear x2, conv) or a conv, after the tail norm (without SiLU) if one is pending."""
        source = Upsampled(x) if isinstance(block, Upsample) else x
        if pending is not None:
            source = self.normed(source, pending, act=False)
        return Conv(source, _conv3d(block))

    def walk(self, latent: torch.Tensor | None, shape: Sequence[int], streams: Sequence[bool],
             dry: bool = False) -> Stored:
        """The decoder from the stored post-quant latent, level by level; ``dry`` only enters the bytes of
        what would be stored in a fresh ledger. A streamed level stores upsampled and conv outputs only as
        its result. Each node is dropped as soon as the next one exists."""
        self.dry, self.ledger = dry, Ledger()
        x: Node = self.keep(latent, shape)
        del latent
        for blocks, stream in zip(self.levels, streams):
            self.ledger.new_level()
            pending = None
            for i, block in enumerate(blocks):
                if isinstance(block, GroupNorm):  # the tail norm: applied (without SiLU) by the next conv
                    pending = block
                elif isinstance(block, ResBlock):
                    x = self.res_block(block, x, stream)
                else:
                    x, pending = self.conv_block(block, x, pending), None
                    if not stream or i == len(blocks) - 1:
                        x = self.materialize(x)
        return x

    def plan_streams(self, shape: Sequence[int]) -> list[bool]:
        """Which levels to stream: ``low`` streams a level only if storing all of it would hold more bytes
        than the decode with every level streamed holds at its peak. Shape-only dry runs, no compute."""
        n = len(self.levels)
        if self.host_memory == "fast":
            return [False] * n
        self.walk(None, shape, [True] * n, dry=True)
        budget = max(self.ledger.level_peaks)
        self.walk(None, shape, [False] * n, dry=True)
        return [peak > budget for peak in self.ledger.level_peaks]

    def device_need(self, shape: Sequence[int]) -> int:
        """Bytes the compute device would hold storing there: the stored activations at their peak (a dry
        run of the planned streams) plus a slab's working set (WORKING_TENSORS of the widest rows)."""
        self.walk(None, shape, self.streamed, dry=True)
        return self.ledger.peak + WORKING_TENSORS * (self.slab + 2 * CARRY) * self.ledger.widest_row

    def storage_candidates(self, shape: Sequence[int]) -> list[torch.device]:
        """Where to store, in the order to try: the compute device first when ``storage="auto"`` and the
        dry run's stored bytes plus a slab's working set fit its free memory; the host always last."""
        if not self.auto_storage or self.compute.type != "cuda":
            return [self.storage]
        need = self.device_need(shape)
        free, _ = torch.cuda.mem_get_info(self.compute)
        free += torch.cuda.memory_reserved(self.compute) - torch.cuda.memory_allocated(self.compute)
        return fits_first(need, free, self.compute, self.host)

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        latent = self.vae.post_quant_conv(z.to(self.compute))
        self.dtype, shape = latent.dtype, tuple(latent.shape)
        self.streamed = self.plan_streams(shape)

        def decode(storage: torch.device) -> torch.Tensor:
            self.storage = storage
            return self.walk(latent.to(storage), shape, self.streamed).tensor
        out = first_that_fits(self.storage_candidates(shape), decode)
        self.peak_stored_bytes = self.ledger.peak
        return out


def fits_first(need: int, free: int, device: torch.device, host: torch.device) -> list[torch.device]:
    """[device, host] when ``need`` bytes fit in FREE_MARGIN of ``free``, else [host]."""
    return [device, host] if need <= FREE_MARGIN * free else [host]


def first_that_fits(storages: Sequence[torch.device], decode) -> torch.Tensor:
    """``decode(storage)`` for the first storage that does not run out of memory (the last one's error
    propagates). The retry starts outside the ``except`` block, so the failed attempt's tensors are free."""
    for i, storage in enumerate(storages):
        try:
            return decode(storage)
        except RuntimeError as err:  # torch.cuda.OutOfMemoryError is one
            if i == len(storages) - 1 or not out_of_memory(err):
                raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    raise ValueError("no storage to decode with")


def out_of_memory(err: BaseException) -> bool:
    """An allocation failure on the device: torch's own error, or cuDNN's/cuBLAS's when their workspace
    could not be allocated."""
    text = str(err)
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


def tiled_decode(vae: AutoencoderKL, z: torch.Tensor, slab: int = 32, storage: torch.device | str | None = None,
                 host_memory: str = "low") -> torch.Tensor:
    """``vae.decode(z)`` computed exactly in slabs of ``slab`` rows (see :class:`SlabDecoder`). ``storage``:
    a device, "host" (the default: the CPU when computing on CUDA), "device" or "auto"."""
    return SlabDecoder(vae, slab, storage, host_memory)(z)
