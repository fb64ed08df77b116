"""The slab walk over one half of the VAE, level by level: what to store, where, and in which order.
See :mod:`text2ct_engine.tiling` for the method and its memory modes."""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..models.layers import GroupNorm, MaisiConv
from ..models.vae import AutoencoderKL, Downsample, ResBlock, Upsample
from .nodes import (CARRY, Conv, Downsampled, Memo, Moments, Node, Normed, Stats, Stored, Upsampled, affine,
                    conv3d_of)

HOST_MEMORY = ("low", "fast")
STORAGE = ("auto", "host", "device")
# A slab's working set on the compute device, in (slab + halo) rows of the widest *stored* activation. Counted
# on fake tensors at 512x512x128 bf16: 5.7-6.1 such rows in "low" mode (whose widest tensors, the upsampled
# ones, are recomputed rather than stored) and 1.9 in "fast"; 8 leaves room for both.
WORKING_TENSORS = 8
FREE_MARGIN = 0.9  # of the free device memory, for the allocator's rounding and fragmentation
AUTO_SLAB = 32  # rows per slab where tiling is chosen automatically
AUTO_TILE_BYTES = 256 * 2 ** 20  # ... which it is for volumes whose widest activation exceeds this


def auto_slab(volume: Sequence[int], channels: int, itemsize: int) -> int | None:
    """Slab rows for an exact tiled pass over ``volume`` (spatial sizes at full resolution) whose widest
    activation has ``channels`` channels of ``itemsize`` bytes, or None when it is small enough untiled."""
    return AUTO_SLAB if math.prod(volume) * channels * itemsize > AUTO_TILE_BYTES else None


# ------------------------------------------------------------------------------------------ bookkeeping
@dataclass
class Ledger:
    """Bytes of whole activations held on storage: now, at the peak, and the peak within each level.

    A stored node's bytes count from its creation until the node is garbage (a weakref finalizer), or to
    the end of the walk for a tensor the caller holds anyway (``for_good``)."""
    live: int = 0
    peak: int = 0
    level_peaks: list[int] = field(default_factory=list)
    widest_row: int = 0  # bytes of one row (along the slab axis) of the widest stored activation

    def hold(self, owner: Stored, nbytes: int, for_good: bool = False) -> None:
        self.widest_row = max(self.widest_row, nbytes // max(owner.length, 1))
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        if self.level_peaks:
            self.level_peaks[-1] = max(self.level_peaks[-1], self.live)
        if not for_good:
            weakref.finalize(owner, self.drop, nbytes)

    def drop(self, nbytes: int) -> None:
        self.live -= nbytes

    def new_level(self) -> None:
        self.level_peaks.append(self.live)


def resolution_levels(blocks: Sequence[nn.Module]) -> list[list[nn.Module]]:
    """Blocks cut into resolution levels: a level starts at each Upsample (decoder) and ends after each
    Downsample (encoder), so a level's resampling block is the one computed across two resolutions."""
    levels: list[list[nn.Module]] = [[]]
    for block in blocks:
        if isinstance(block, Upsample) and levels[-1]:
            levels.append([])
        levels[-1].append(block)
        if isinstance(block, Downsample):
            levels.append([])
    return [level for level in levels if level]


# ------------------------------------------------------------------------------------------ the walk
class SlabWalk:
    """Run a chain of VAE blocks slab by slab (the decoder's or the encoder's); see the package docstring
    for why the result is exact and what ``host_memory`` keeps. After a call, ``peak_stored_bytes`` is the
    most bytes of whole activations that were held on storage at once, and ``streamed`` says which
    resolution levels were recomputed rather than stored."""

    what = "tiled pass"  # for messages: "tiled decoding", "tiled encoding"
    input_lives = False  # the input is the caller's tensor, alive for the whole walk (else freed once read)
    untiled = "run this VAE without tiling"
    supported: tuple[type, ...] = (MaisiConv, ResBlock, GroupNorm)

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
        refusal = self.refusal(vae)
        if refusal:
            raise ValueError(refusal)
        self.levels = resolution_levels(self.blocks_of(vae))
        self.dtype = torch.float32
        self.dry = False
        self.ledger = Ledger()
        self.peak_stored_bytes = 0
        self.streamed: list[bool] = []

    @classmethod
    def blocks_of(cls, vae: AutoencoderKL) -> Sequence[nn.Module]:
        """The chain of blocks this pass walks."""
        raise NotImplementedError

    @classmethod
    def refusal(cls, vae: AutoencoderKL) -> str | None:
        """Why this VAE has no exact slab form here (a block type), or None when it has one."""
        for block in cls.blocks_of(vae):
            if not isinstance(block, cls.supported):
                return f"{cls.what} has no exact form for {type(block).__name__} blocks: {cls.untiled}"
        return None

    # ---------------------------------------------------------------- storing and statistics
    def slabs(self, length: int) -> list[tuple[int, int]]:
        return [(a, min(length, a + self.slab)) for a in range(0, length, self.slab)]

    def keep(self, tensor: torch.Tensor | None, shape: Sequence[int], for_good: bool = False) -> Stored:
        """A stored node for ``tensor`` (None: a dry run's placeholder), its bytes entered in the ledger."""
        node = Stored(tensor, shape, self.compute)
        self.ledger.hold(node, math.prod(shape) * self.dtype.itemsize, for_good)
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

    # ---------------------------------------------------------------- the block walk
    def res_block(self, block: ResBlock, x: Node, stream: bool) -> Stored:
        """A ResBlock, stored over its inner activation h, or over its input x when x is stored and the
        shortcut is the identity. Streaming, h is then recomputed in the output sweep instead of stored."""
        identity = isinstance(block.nin_shortcut, nn.Identity)
        if not isinstance(x, Stored):
            x = Memo(x)
        h: Node = Conv(self.normed(x, block.norm1, act=True), conv3d_of(block.conv1))
        if not (stream and identity and isinstance(x, Stored)):
            h = self.materialize(h)
        out = Conv(self.normed(h, block.norm2, act=True), conv3d_of(block.conv2), residual=x,
                   shortcut=None if identity else block.nin_shortcut)
        return self.materialize(out, into=h if isinstance(h, Stored) else x)

    def conv_block(self, block: nn.Module, x: Node, pending: GroupNorm | None) -> Node:
        """A conv, an Upsample (trilinear x2, conv) or a Downsample (pad, stride-2 conv), after the tail
        norm (without SiLU) if one is pending."""
        if pending is not None:
            x = self.normed(x, pending, act=False)
        conv = conv3d_of(block)
        if isinstance(block, Downsample):
            return Downsampled(x, conv)
        return Conv(Upsampled(x) if isinstance(block, Upsample) else x, conv)

    def walk(self, first: torch.Tensor | None, shape: Sequence[int], streams: Sequence[bool],
             dry: bool = False) -> Stored:
        """The blocks from the stored input ``first``, level by level; ``dry`` only enters the bytes of what
        would be stored in a fresh ledger. A streamed level stores resampled and conv outputs only as its
        result. Each node is dropped as soon as the next one exists."""
        self.dry, self.ledger = dry, Ledger()
        x: Node = self.keep(first, shape, for_good=self.input_lives)
        del first
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
        than the walk with every level streamed holds at its peak. Shape-only dry runs, no compute."""
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

    def run(self, first: torch.Tensor) -> torch.Tensor:
        """The walk from ``first`` (the blocks' input, on any device; its dtype is the walk's), stored where
        it first fits; returns the last block's output on that storage."""
        self.dtype, shape = first.dtype, tuple(first.shape)
        self.streamed = self.plan_streams(shape)

        def attempt(storage: torch.device) -> torch.Tensor:
            self.storage = storage
            return self.walk(first.to(storage), shape, self.streamed).tensor
        out = first_that_fits(self.storage_candidates(shape), attempt)
        self.peak_stored_bytes = self.ledger.peak
        return out


class SlabDecoder(SlabWalk):
    """``vae.decode`` slab by slab (the image on the storage device)."""

    what, untiled = "tiled decoding", "decode this VAE without tiling"
    supported = (*SlabWalk.supported, Upsample)

    @classmethod
    def blocks_of(cls, vae: AutoencoderKL) -> Sequence[nn.Module]:
        return vae.decoder.blocks

    @classmethod
    def refusal(cls, vae: AutoencoderKL) -> str | None:
        if any(isinstance(b, Upsample) and b.transposed for b in vae.decoder.blocks):
            return "tiled decoding does not support use_convtranspose VAEs: decode without tiling"
        return super().refusal(vae)

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.run(self.vae.post_quant_conv(z.to(self.compute)))


class SlabEncoder(SlabWalk):
    """``vae.encode`` slab by slab: the image (which may stay on the host) -> latent mean and standard
    deviation on the compute device, computed in the weights' dtype."""

    what, untiled = "tiled encoding", "encode this VAE without tiling"
    supported = (*SlabWalk.supported, Downsample)
    input_lives = True

    @classmethod
    def blocks_of(cls, vae: AutoencoderKL) -> Sequence[nn.Module]:
        return vae.encoder.blocks

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.run(x.to(next(self.vae.parameters()).dtype))
        return self.vae.posterior(h.to(self.compute))


def fits_first(need: int, free: int, device: torch.device, host: torch.device) -> list[torch.device]:
    """[device, host] when ``need`` bytes fit in FREE_MARGIN of ``free``, else [host]."""
    return [device, host] if need <= FREE_MARGIN * free else [host]


def first_that_fits(storages: Sequence[torch.device], attempt: Callable[[torch.device], torch.Tensor]
                    ) -> torch.Tensor:
    """``attempt(storage)`` for the first storage that does not run out of memory (the last one's error
    propagates). The retry starts outside the ``except`` block, so the failed attempt's tensors are free."""
    for i, storage in enumerate(storages):
        try:
            return attempt(storage)
        except RuntimeError as err:  # torch.cuda.OutOfMemoryError is one
            if i == len(storages) - 1 or not out_of_memory(err):
                raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    raise ValueError("no storage to run on")


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


def tiled_encode(vae: AutoencoderKL, x: torch.Tensor, slab: int = 32, storage: torch.device | str | None = None,
                 host_memory: str = "low") -> tuple[torch.Tensor, torch.Tensor]:
    """``vae.encode(x)`` (latent mean and standard deviation) computed exactly in slabs of ``slab`` rows
    (see :class:`SlabEncoder`); ``x`` may stay on the host. ``storage`` as for :func:`tiled_decode`."""
    return SlabEncoder(vae, slab, storage, host_memory)(x)
