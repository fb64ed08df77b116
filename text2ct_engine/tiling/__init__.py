"""Exact slab-wise VAE decoding and encoding: the same result as ``vae.decode`` / ``vae.encode``, in a
fraction of the memory.

Decoder and encoder are chains of local operators (3x3x3 / 1x1x1 convs, trilinear x2 upsampling or padded
stride-2 downsampling, SiLU, residual adds) and one global one, GroupNorm, whose statistics span the whole
volume. Every activation is therefore a *node* (:mod:`.nodes`) whose rows lo:hi (along the first spatial
axis) can be produced on demand on the compute device:

* a conv's output rows a:b read rows a-r:b+r of its input (fewer only at the volume's true borders, where
  the conv pads with zeros as it does untiled), so every output voxel sees exactly its untiled inputs;
* trilinear x2 upsampling of rows reads one extra input row each side, so interior cuts interpolate between
  real neighbours, never clamp; a downsampling conv's output rows a:b read input rows 2a:2b+1, with the
  zero row MAISI pads at the high end added only where the volume ends;
* a GroupNorm needs its input's per-(sample, group) mean and variance first: per-channel sums (float64) are
  taken while a tensor is stored, or in a *sweep* over all slabs of a computed one; the norm, with SiLU, is
  then applied on the fly to the rows the next conv reads.

A node is either *stored* (the whole activation kept on ``storage``, by default the CPU when computing on
CUDA) or *computed* from the nodes it reads, recursively down to stored ones; sweeping a computed node
recomputes its inputs, with their halos, slab by slab. The compute device holds one slab (plus halo) of
each node on that path at a time. A ResBlock's output is written over a stored tensor of its shape that
dies with the block (its inner activation, or its input when the shortcut is the identity); the new rows
that would land on the two original rows the next slab's halo still reads are held back until then. No
approximation is made anywhere: unlike overlapping-window blending, the result equals the untiled pass
up to float rounding.

What to store trades host memory against compute (``host_memory``). Decoding Text2CT's 512x512x128
output, whose full-resolution level has C = 64 channels and is fed by 2C = 128 upsampled ones:

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

Encoding the same volume, the full-resolution level is fed by the 1-channel image (held throughout: it is
the caller's): ``"low"`` streams that level, recomputing the first conv from the image in each sweep that
reads it (cheap: one input channel) and the second ResBlock's inner activation (identity shortcut: its
C-channel first conv runs twice, the 17 % of extra conv work), and holds the image, one C-channel tensor
and at the level's end its downsampled result, 4.6 GiB in bf16, against the image and two C-channel
tensors (8.1 GiB) in ``"fast"``. The latent cache's encode of 512x512x128 then peaks at 1.2 GiB on the GPU
with host storage instead of 16.1 (``python -m text2ct_engine.memory --what cache``, fake tensors).

Where the stored activations live (``storage``): the host by default when computing on a GPU, since that is
what lets an 8 GB card decode 512x512x128. But every slab then crosses PCIe: 54 GiB per decode in ``low``
mode at that size (counted in benchmarks/RESULTS.md), seconds at 12-25 GB/s, against 1-2 s of convs. With
``storage="auto"`` a pass stores on the compute device when the stored bytes (from the shape-only dry run)
plus a slab's working set fit in its free memory, and on the host otherwise; if the device runs out of
memory anyway, the pass is run again with host storage (same result: the storage only holds values).

Attention blocks (not in Text2CT's VAE) and transposed-conv upsampling have no exact slab form here and are
refused.
"""
from .nodes import CARRY, WORK_BYTES, Memo, Moments, Stored, affine, normalize
from .slabs import (FREE_MARGIN, HOST_MEMORY, STORAGE, WORKING_TENSORS, SlabDecoder, SlabEncoder, SlabWalk,
                    auto_slab, first_that_fits, fits_first, out_of_memory, tiled_decode, tiled_encode)

__all__ = ["CARRY", "FREE_MARGIN", "HOST_MEMORY", "STORAGE", "WORKING_TENSORS", "WORK_BYTES", "Memo", "Moments",
           "SlabDecoder", "SlabEncoder", "SlabWalk", "Stored", "affine", "auto_slab", "first_that_fits",
           "fits_first", "normalize", "out_of_memory", "tiled_decode", "tiled_encode"]
