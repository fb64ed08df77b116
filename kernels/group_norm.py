"""GroupNorm (+ per-channel add, + SiLU) forward and backward in Triton, for big 3D groups.
=====================================================================================

The problem
-----------
x is (N, C, *spatial). GroupNorm splits the C channels into G groups of Cg = C / G channels and normalises
each (n, g) slab of M = Cg * S elements (S = prod(spatial)) by its own mean and variance, then applies a
per-channel affine and, in the networks, a SiLU:

    u    = x + add[n, c]                           (optional: the ResBlock time embedding)
    xhat = (u - mean[n, g]) * rstd[n, g]           rstd = 1 / sqrt(var + eps)
    z    = xhat * w[c] + b[c]
    y    = silu(z) = z * sigmoid(z)                (optional)

torch's kernel gives one block to each (n, g). In the MAISI VAE decoder at 512x512x128 a group holds
Cg * S = 2 * 33.5M elements, so N * G = 32 blocks stream 8.6 GB between them: a handful of SMs do all the
work. Here every pass is split over the spatial axis into many programs instead.

Layout: every tensor is seen as (N, C, S) with strides (sn, sc, ss). That one view covers contiguous
(ss = 1, sc = S) and channels_last(_3d) (sc = 1, ss = C) input, 4D and 5D alike. A program owns a tile of
BLOCK_C channels x BLOCK_S spatial positions; the host picks the tile's shape so that its fast axis is
the one with unit stride (coalesced loads in both layouts).

Forward: three launches, 2 reads + 1 write of x in all
------------------------------------------------------
1. ``_gn_fwd_stats_kernel``  grid (splits, C-blocks, N). Each program reads TILES tiles of its channels
   (one read of x overall) and writes, per channel, the (mean, M2) of its CHUNK = TILES * BLOCK_S
   positions: 8 bytes per channel per chunk, i.e. < 1% of the bytes of x. Within a tile the moments are
   two-pass (mean first, then the centred sum of squares, both from registers), and tiles are merged with
   Chan's parallel formula, so no catastrophic cancellation even when |mean| >> std.
2. ``_gn_fwd_finalize_kernel`` grid (G, N). Merges the chunk partials of the group's channels (Chan again),
   shifts each channel's mean by add[n, c] (an add moves a channel's mean but not its M2, so the add never
   needs a pass over x), and writes mean[n, g] (of x + add) and rstd[n, g] in fp32. Tiny.
3. ``_gn_fwd_apply_kernel`` grid (splits, C-blocks, N). Second read of x, one write of y:
   y = act((x - mu_c) * (rstd * w_c) + b_c) with mu_c = mean - add[n, c], output in x's dtype.

Backward: three launches, 2 reads of (x, dy) + 1 write of dx
-------------------------------------------------------------
With dz = dy * silu'(z) (or dy), the gradients are

    dw[c] = sum_{n,s} dz * xhat       db[c] = sum_{n,s} dz
    dx    = rstd * (w_c * dz - c1 - xhat * c2),   c1 = mean_group(w_c dz), c2 = mean_group(w_c dz xhat)
    dadd[n, c] = sum_s dx = rstd * (w_c * ds[n,c] - S * c1 - c2 * sum_s xhat)

so the only reductions over the volume are three per-(n, c) sums: ds = sum dz, dd = sum dz * xhat and
(with add) sum xhat. ``_gn_bwd_stats_kernel`` computes them per chunk (one read of x and dy),
``_gn_bwd_finalize_kernel`` folds chunks and channels into c1, c2 per (n, g), ds/dd per (n, c) (dw and db
are their sums over n) and dadd, and ``_gn_bwd_apply_kernel`` re-reads x and dy and writes dx. z and xhat
are recomputed from x and the saved (mean, rstd): nothing of size x is saved by the forward.

Small groups: one launch each way
---------------------------------
At the UNet's deepest levels a group holds 16K-64K elements (N * G = 64 groups at batch 2): the data is
a few MiB and three launches, plus the partials' trip through memory, cost more than moving it. For groups
of at most ``ONE_PASS_MAX`` elements ``_gn_fwd_group_kernel`` and ``_gn_bwd_group_kernel`` give each
(n, g) one program that sweeps the group twice (moments, then apply; the second read of so small a group
comes from L1/L2) with the same tile arithmetic as the split passes (shared ``@triton.jit`` helpers).

All statistics and arithmetic are fp32 whatever the input dtype; loads convert, stores round once.
The split passes' loop trip counts are compile-time constants (TILES, P_ITERS): the interpreter of some
triton versions (3.6 with numpy >= 2.4) fails on runtime loop bounds. The one-program-per-group kernels
loop to the runtime S (a constant trip count would compile once per volume size); under such an
interpreter use numpy < 2.4.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .launch import interpreting, on_input_device


# ------------------------------------------------------------------------------------------------------
# shared helpers: a program's channels, their row pointers and per-channel constants
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _split_program(C, BLOCK_C: tl.constexpr):
    """A split launch's program: grid (chunks, channel blocks, N) -> chunk sp, sample n, its channels c."""
    sp = tl.program_id(0)
    n = tl.program_id(2)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return sp, n, c, c < C


@triton.jit
def _channel_rows(P, n, c, stride_n, stride_c):
    """(BLOCK_C, 1) pointers to position 0 of channels c of sample n (int64: tensors past 2**31 elements)."""
    return P + n.to(tl.int64) * stride_n + c.to(tl.int64)[:, None] * stride_c


@triton.jit
def _load_tile(row, s, stride_s, mask):
    """Tile (channels, positions s) of a tensor whose channel rows start at ``row``, in fp32 (0 where masked)."""
    return tl.load(row + s[None, :] * stride_s, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _affine_constants(c, cmask, W, B, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """w, b of channels c in fp32 (1 and 0 without affine; 0 for masked-off channels with affine)."""
    if HAS_W:
        w = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        w = tl.full(c.shape, 1.0, tl.float32)
    if HAS_B:
        b = tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros(c.shape, tl.float32)
    return w, b


@triton.jit
def _channel_constants(n, c, cmask, MEAN, RSTD, W, B, ADD, C, G, Cg,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr):
    """mu (mean of the group minus the channel's add), rstd, w, b for channels c of sample n (fp32)."""
    g = c // Cg
    mu = tl.load(MEAN + n * G + g, mask=cmask, other=0.0)
    rstd = tl.load(RSTD + n * G + g, mask=cmask, other=0.0)
    if HAS_ADD:
        mu = mu - tl.load(ADD + n * C + c, mask=cmask, other=0.0).to(tl.float32)
    w, b = _affine_constants(c, cmask, W, B, HAS_W, HAS_B)
    return mu, rstd, w, b


@triton.jit
def _merge_tile_moments(mean, m2, x, mask, n_a, n_b):
    """Fold one tile (BLOCK_C x BLOCK_S, n_b valid positions per channel) into the running per-channel
    (mean, M2) of n_a positions: two-pass moments within the tile, Chan et al.'s formula across tiles."""
    mean_b = tl.sum(x, axis=1) / tl.maximum(n_b, 1.0)
    d = tl.where(mask, x - mean_b[:, None], 0.0)
    m2_b = tl.sum(d * d, axis=1)
    frac = n_b / tl.maximum(n_a + n_b, 1.0)
    delta = mean_b - mean
    return mean + delta * frac, m2 + m2_b + delta * delta * n_a * frac


@triton.jit
def _group_moments(mean, m2, cmask, S, Cg, inv_count, eps):
    """Mean and rstd of a group from its channels' (mean, M2) over S positions each."""
    mean_g = tl.sum(tl.where(cmask, mean, 0.0), axis=0) / Cg  # equal counts: the channels' plain mean
    dm = tl.where(cmask, mean - mean_g, 0.0)
    m2_g = tl.sum(tl.where(cmask, m2, 0.0), axis=0) + (S * 1.0) * tl.sum(dm * dm, axis=0)
    var = tl.maximum(m2_g * inv_count, 0.0)
    return mean_g, 1.0 / tl.sqrt(var + eps)


@triton.jit
def _apply_tile(x, mu, scale, b, SILU: tl.constexpr):
    """act((x - mu) * scale + b) for a tile, fp32, with per-channel (column-broadcast) constants."""
    z = (x - mu) * scale + b
    if SILU:
        z = z * tl.sigmoid(z)
    return z


# ------------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _gn_fwd_stats_kernel(X, PMEAN, PM2, C, S, stride_xn, stride_xc, stride_xs, NUM_SPLITS,
                         BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, TILES: tl.constexpr):
    """Per-channel (mean, M2) of one chunk of TILES * BLOCK_S positions: reads the chunk once."""
    sp, n, c, cmask = _split_program(C, BLOCK_C)
    row = _channel_rows(X, n, c, stride_xn, stride_xc)
    s_start = sp.to(tl.int64) * (BLOCK_S * TILES)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for t in range(TILES):
        t0 = s_start + t * BLOCK_S
        s = t0 + tl.arange(0, BLOCK_S)
        mask = cmask[:, None] & (s < S)[None, :]
        x = _load_tile(row, s, stride_xs, mask)
        # this tile's count, and the count merged so far (both known without a loop-carried scalar)
        n_b = tl.minimum(tl.maximum(S - t0, 0), BLOCK_S).to(tl.float32)
        n_a = tl.minimum(tl.maximum(S - s_start, 0), t * BLOCK_S).to(tl.float32)
        mean, m2 = _merge_tile_moments(mean, m2, x, mask, n_a, n_b)
    out = (n * C + c).to(tl.int64) * NUM_SPLITS + sp
    tl.store(PMEAN + out, mean, mask=cmask)
    tl.store(PM2 + out, m2, mask=cmask)


@triton.jit
def _gn_fwd_finalize_kernel(PMEAN, PM2, ADD, MEAN, RSTD, C, S, G, Cg, NUM_SPLITS, CHUNK, inv_count, eps,
                            HAS_ADD: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_P: tl.constexpr,
                            P_ITERS: tl.constexpr):
    """Fold the chunk partials of group (n, g) into mean and rstd of x + add."""
    g = tl.program_id(0)
    n = tl.program_id(1)
    cg = tl.arange(0, BLOCK_CG)
    cmask = cg < Cg
    c = g * Cg + cg
    row = (n * C + c).to(tl.int64) * NUM_SPLITS
    mean = tl.zeros([BLOCK_CG], tl.float32)
    m2 = tl.zeros([BLOCK_CG], tl.float32)
    for i in range(P_ITERS):
        p = i * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = p < NUM_SPLITS
        mask = cmask[:, None] & pmask[None, :]
        pmean = tl.load(PMEAN + row[:, None] + p[None, :], mask=mask, other=0.0)
        pm2 = tl.load(PM2 + row[:, None] + p[None, :], mask=mask, other=0.0)
        # chunk p holds min(CHUNK, S - p * CHUNK) positions (0 past the end)
        cnt = tl.minimum(tl.maximum(S - p.to(tl.int64) * CHUNK, 0), CHUNK).to(tl.float32)
        n_b = tl.sum(cnt, axis=0)
        mean_b = tl.sum(pmean * cnt[None, :], axis=1) / tl.maximum(n_b, 1.0)
        d = tl.where(mask, pmean - mean_b[:, None], 0.0)
        m2_b = tl.sum(pm2, axis=1) + tl.sum(cnt[None, :] * d * d, axis=1)
        n_a = tl.minimum(i * BLOCK_P * CHUNK, S) * 1.0  # positions merged so far
        frac = n_b / tl.maximum(n_a + n_b, 1.0)
        delta = mean_b - mean
        mean = mean + delta * frac
        m2 = m2 + m2_b + delta * delta * n_a * frac
    if HAS_ADD:  # the add shifts each channel's mean and leaves its M2 alone
        mean = mean + tl.load(ADD + n * C + c, mask=cmask, other=0.0).to(tl.float32)
    mean_g, rstd = _group_moments(mean, m2, cmask, S, Cg, inv_count, eps)
    tl.store(MEAN + n * G + g, mean_g)
    tl.store(RSTD + n * G + g, rstd)


@triton.jit
def _gn_fwd_apply_kernel(X, Y, MEAN, RSTD, W, B, ADD, C, S, G, Cg,
                         stride_xn, stride_xc, stride_xs, stride_yn, stride_yc, stride_ys,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, SILU: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, TILES: tl.constexpr):
    """y = act((x - mu_c) * rstd * w_c + b_c): one read of x and one write of y per element."""
    sp, n, c, cmask = _split_program(C, BLOCK_C)
    mu, rstd, w, b = _channel_constants(n, c, cmask, MEAN, RSTD, W, B, ADD, C, G, Cg, HAS_W, HAS_B, HAS_ADD)
    scale = (rstd * w)[:, None]
    mu = mu[:, None]
    b = b[:, None]
    xrow = _channel_rows(X, n, c, stride_xn, stride_xc)
    yrow = _channel_rows(Y, n, c, stride_yn, stride_yc)
    s_start = sp.to(tl.int64) * (BLOCK_S * TILES)
    for t in range(TILES):
        s = s_start + t * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = cmask[:, None] & (s < S)[None, :]
        x = _load_tile(xrow, s, stride_xs, mask)
        z = _apply_tile(x, mu, scale, b, SILU)
        tl.store(yrow + s[None, :] * stride_ys, z.to(Y.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _dz_xhat(x, dy, mu, rstd, w, b, SILU: tl.constexpr):
    """xhat and dL/dz for a tile (recomputed from x: the forward saves only mean and rstd)."""
    xhat = (x - mu) * rstd
    if SILU:
        z = xhat * w + b
        sig = tl.sigmoid(z)
        dz = dy * sig * (1.0 + z * (1.0 - sig))
    else:
        dz = dy
    return xhat, dz


@triton.jit
def _group_weights(c, cmask, W, HAS_W: tl.constexpr):
    """w of a group's channels in fp32, 0 for the masked-off lanes (so they drop out of c1 and c2)."""
    if HAS_W:
        return tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
    return tl.where(cmask, 1.0, 0.0)


@triton.jit
def _bwd_coefficients(ds, dd, w, inv_count):
    """c1 = mean over the group of w * dz, c2 = mean of w * dz * xhat, from per-channel sums ds, dd."""
    return tl.sum(w * ds, axis=0) * inv_count, tl.sum(w * dd, axis=0) * inv_count


@triton.jit
def _dadd(ds, sx, w, rstd, c1, c2, S):
    """dL/d add[n, c] = sum over the channel's positions of dx (sx = sum of xhat)."""
    return rstd * (w * ds - (S * 1.0) * c1 - c2 * sx)


@triton.jit
def _dx_tile(x, dy, mu, rstd, w, b, c1, c2, SILU: tl.constexpr):
    """dx = rstd * (w * dz - c1 - xhat * c2) for a tile (constants broadcast per channel)."""
    xhat, dz = _dz_xhat(x, dy, mu, rstd, w, b, SILU)
    return rstd * (w * dz - c1 - xhat * c2)


@triton.jit
def _accumulate_bwd_tile(acc_ds, acc_dd, acc_sx, xrow, drow, s, cmask, S, stride_xs, stride_ds, mu, rstd, w, b,
                         SILU: tl.constexpr, HAS_ADD: tl.constexpr):
    """Add one tile's dz, dz * xhat (and xhat) to the running (BLOCK_C, BLOCK_S) sums: reads x and dy."""
    mask = cmask[:, None] & (s < S)[None, :]
    x = _load_tile(xrow, s, stride_xs, mask)
    dy = _load_tile(drow, s, stride_ds, mask)
    xhat, dz = _dz_xhat(x, dy, mu, rstd, w, b, SILU)
    xhat = tl.where(mask, xhat, 0.0)
    acc_ds += dz
    acc_dd += dz * xhat
    if HAS_ADD:
        acc_sx += xhat
    return acc_ds, acc_dd, acc_sx


@triton.jit
def _gn_bwd_stats_kernel(X, DY, MEAN, RSTD, W, B, ADD, PDS, PDD, PSX, C, S, G, Cg,
                         stride_xn, stride_xc, stride_xs, stride_dn, stride_dc, stride_ds, NUM_SPLITS,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, SILU: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, TILES: tl.constexpr):
    """Per-channel sums over one chunk of dz, dz * xhat and (with add) xhat: one read of x and dy."""
    sp, n, c, cmask = _split_program(C, BLOCK_C)
    mu, rstd, w, b = _channel_constants(n, c, cmask, MEAN, RSTD, W, B, ADD, C, G, Cg, HAS_W, HAS_B, HAS_ADD)
    mu = mu[:, None]
    rstd = rstd[:, None]
    w = w[:, None]
    b = b[:, None]
    xrow = _channel_rows(X, n, c, stride_xn, stride_xc)
    drow = _channel_rows(DY, n, c, stride_dn, stride_dc)
    s_start = sp.to(tl.int64) * (BLOCK_S * TILES)
    acc_ds = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc_dd = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc_sx = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    for t in range(TILES):
        s = s_start + t * BLOCK_S + tl.arange(0, BLOCK_S)
        acc_ds, acc_dd, acc_sx = _accumulate_bwd_tile(acc_ds, acc_dd, acc_sx, xrow, drow, s, cmask, S,
                                                      stride_xs, stride_ds, mu, rstd, w, b, SILU, HAS_ADD)
    out = (n * C + c).to(tl.int64) * NUM_SPLITS + sp
    tl.store(PDS + out, tl.sum(acc_ds, axis=1), mask=cmask)
    tl.store(PDD + out, tl.sum(acc_dd, axis=1), mask=cmask)
    if HAS_ADD:
        tl.store(PSX + out, tl.sum(acc_sx, axis=1), mask=cmask)


@triton.jit
def _gn_bwd_finalize_kernel(PDS, PDD, PSX, W, RSTD, DS, DD, C1, C2, DADD, C, S, G, Cg, NUM_SPLITS, inv_count,
                            HAS_W: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK_CG: tl.constexpr,
                            BLOCK_P: tl.constexpr, P_ITERS: tl.constexpr):
    """Fold chunk sums of group (n, g): ds, dd per channel; c1, c2 per group; dadd per channel."""
    g = tl.program_id(0)
    n = tl.program_id(1)
    cg = tl.arange(0, BLOCK_CG)
    cmask = cg < Cg
    c = g * Cg + cg
    row = (n * C + c).to(tl.int64) * NUM_SPLITS
    acc_ds = tl.zeros([BLOCK_CG, BLOCK_P], tl.float32)
    acc_dd = tl.zeros([BLOCK_CG, BLOCK_P], tl.float32)
    acc_sx = tl.zeros([BLOCK_CG, BLOCK_P], tl.float32)
    for i in range(P_ITERS):
        p = i * BLOCK_P + tl.arange(0, BLOCK_P)
        mask = cmask[:, None] & (p < NUM_SPLITS)[None, :]
        acc_ds += tl.load(PDS + row[:, None] + p[None, :], mask=mask, other=0.0)
        acc_dd += tl.load(PDD + row[:, None] + p[None, :], mask=mask, other=0.0)
        if HAS_ADD:
            acc_sx += tl.load(PSX + row[:, None] + p[None, :], mask=mask, other=0.0)
    ds = tl.sum(acc_ds, axis=1)
    dd = tl.sum(acc_dd, axis=1)
    w = _group_weights(c, cmask, W, HAS_W)
    c1, c2 = _bwd_coefficients(ds, dd, w, inv_count)
    tl.store(DS + n * C + c, ds, mask=cmask)
    tl.store(DD + n * C + c, dd, mask=cmask)
    tl.store(C1 + n * G + g, c1)
    tl.store(C2 + n * G + g, c2)
    if HAS_ADD:
        rstd = tl.load(RSTD + n * G + g)
        tl.store(DADD + n * C + c, _dadd(ds, tl.sum(acc_sx, axis=1), w, rstd, c1, c2, S), mask=cmask)


@triton.jit
def _gn_bwd_apply_kernel(X, DY, DX, MEAN, RSTD, C1, C2, W, B, ADD, C, S, G, Cg,
                         stride_xn, stride_xc, stride_xs, stride_dn, stride_dc, stride_ds,
                         stride_on, stride_oc, stride_os,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, SILU: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, TILES: tl.constexpr):
    """dx = rstd * (w_c * dz - c1 - xhat * c2): one read of x and dy, one write of dx."""
    sp, n, c, cmask = _split_program(C, BLOCK_C)
    mu, rstd, w, b = _channel_constants(n, c, cmask, MEAN, RSTD, W, B, ADD, C, G, Cg, HAS_W, HAS_B, HAS_ADD)
    c1 = tl.load(C1 + n * G + c // Cg, mask=cmask, other=0.0)
    c2 = tl.load(C2 + n * G + c // Cg, mask=cmask, other=0.0)
    mu = mu[:, None]
    rstd = rstd[:, None]
    w = w[:, None]
    b = b[:, None]
    c1 = c1[:, None]
    c2 = c2[:, None]
    xrow = _channel_rows(X, n, c, stride_xn, stride_xc)
    drow = _channel_rows(DY, n, c, stride_dn, stride_dc)
    orow = _channel_rows(DX, n, c, stride_on, stride_oc)
    s_start = sp.to(tl.int64) * (BLOCK_S * TILES)
    for t in range(TILES):
        s = s_start + t * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = cmask[:, None] & (s < S)[None, :]
        x = _load_tile(xrow, s, stride_xs, mask)
        dy = _load_tile(drow, s, stride_ds, mask)
        dx = _dx_tile(x, dy, mu, rstd, w, b, c1, c2, SILU)
        tl.store(orow + s[None, :] * stride_os, dx.to(DX.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------------
# small groups: one program per (n, g), one launch for the forward and one for the backward
# ------------------------------------------------------------------------------------------------------
@triton.jit
def _gn_fwd_group_kernel(X, Y, MEAN, RSTD, W, B, ADD, C, S, G, Cg, inv_count, eps,
                         stride_xn, stride_xc, stride_xs, stride_yn, stride_yc, stride_ys,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, SILU: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Grid (G, N): the whole forward of group (n, g) in one program. Sweep 1 reads the group's tiles for
    the moments, sweep 2 reads them again (from L1/L2: the group is small) and writes y. Same arithmetic as
    the three split launches; what it saves is two launches and the partials' round trip through memory,
    which is what a small group costs (the UNet's deep levels hold 16K-64K elements per group)."""
    g = tl.program_id(0)
    n = tl.program_id(1)
    cg = tl.arange(0, BLOCK_C)
    cmask = cg < Cg
    c = g * Cg + cg
    xrow = _channel_rows(X, n, c, stride_xn, stride_xc)
    yrow = _channel_rows(Y, n, c, stride_yn, stride_yc)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = cmask[:, None] & (s < S)[None, :]
        x = _load_tile(xrow, s, stride_xs, mask)
        n_b = tl.minimum(S - s0, BLOCK_S).to(tl.float32)
        mean, m2 = _merge_tile_moments(mean, m2, x, mask, s0 * 1.0, n_b)
    if HAS_ADD:  # as in the split finalize: the add moves each channel's mean, not its M2
        add = tl.load(ADD + n * C + c, mask=cmask, other=0.0).to(tl.float32)
        mean = mean + add
    mean_g, rstd = _group_moments(mean, m2, cmask, S, Cg, inv_count, eps)
    tl.store(MEAN + n * G + g, mean_g)
    tl.store(RSTD + n * G + g, rstd)
    w, b = _affine_constants(c, cmask, W, B, HAS_W, HAS_B)
    mu = tl.zeros([BLOCK_C], tl.float32) + mean_g
    if HAS_ADD:
        mu = mu - add
    mu = mu[:, None]
    scale = (rstd * w)[:, None]
    b = b[:, None]
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = cmask[:, None] & (s < S)[None, :]
        x = _load_tile(xrow, s, stride_xs, mask)
        z = _apply_tile(x, mu, scale, b, SILU)
        tl.store(yrow + s[None, :] * stride_ys, z.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gn_bwd_group_kernel(X, DY, DX, MEAN, RSTD, W, B, ADD, DS, DD, DADD, C, S, G, Cg, inv_count,
                         stride_xn, stride_xc, stride_xs, stride_dn, stride_dc, stride_ds,
                         stride_on, stride_oc, stride_os,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_ADD: tl.constexpr, SILU: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Grid (G, N): the whole backward of group (n, g) in one program. Sweep 1 sums dz, dz * xhat (and
    xhat) per channel, which give c1, c2 (and dadd); sweep 2 re-reads x and dy and writes dx. The per-(n, c)
    sums ds, dd are written for dweight and dbias (summed over n on the host)."""
    g = tl.program_id(0)
    n = tl.program_id(1)
    cg = tl.arange(0, BLOCK_C)
    cmask = cg < Cg
    c = g * Cg + cg
    mu, rstd, w, b = _channel_constants(n, c, cmask, MEAN, RSTD, W, B, ADD, C, G, Cg, HAS_W, HAS_B, HAS_ADD)
    mu = mu[:, None]
    rstd_c = rstd[:, None]
    w2 = w[:, None]
    b = b[:, None]
    xrow = _channel_rows(X, n, c, stride_xn, stride_xc)
    drow = _channel_rows(DY, n, c, stride_dn, stride_dc)
    orow = _channel_rows(DX, n, c, stride_on, stride_oc)
    acc_ds = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc_dd = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc_sx = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        acc_ds, acc_dd, acc_sx = _accumulate_bwd_tile(acc_ds, acc_dd, acc_sx, xrow, drow, s, cmask, S,
                                                      stride_xs, stride_ds, mu, rstd_c, w2, b, SILU, HAS_ADD)
    ds = tl.sum(acc_ds, axis=1)
    dd = tl.sum(acc_dd, axis=1)
    c1, c2 = _bwd_coefficients(ds, dd, _group_weights(c, cmask, W, HAS_W), inv_count)
    tl.store(DS + n * C + c, ds, mask=cmask)
    tl.store(DD + n * C + c, dd, mask=cmask)
    if HAS_ADD:
        tl.store(DADD + n * C + c, _dadd(ds, tl.sum(acc_sx, axis=1), w, rstd, c1, c2, S), mask=cmask)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = cmask[:, None] & (s < S)[None, :]
        x = _load_tile(xrow, s, stride_xs, mask)
        dy = _load_tile(drow, s, stride_ds, mask)
        dx = _dx_tile(x, dy, mu, rstd_c, w2, b, c1, c2, SILU)
        tl.store(orow + s[None, :] * stride_os, dx.to(DX.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------------
# host side
# ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GroupNormConfig:
    """Tile of the volume passes (BLOCK_C channels x BLOCK_S positions, TILES tiles per program) and of
    the finalize passes (BLOCK_P chunk partials per step). Powers of two. ``one_pass``: one program per
    group sweeps it in BLOCK_S-position tiles of all its channels (block_c, tiles, block_p unused)."""
    block_c: int
    block_s: int
    tiles: int = 1
    block_p: int | None = None
    num_warps: int = 4
    one_pass: bool = False


# Groups of at most this many elements take the one-launch path (``_gn_*_group_kernel``): the UNet's two
# deepest levels at a 4x128x128x32 latent (16K and 64K elements per group, N * G = 64 programs), where three
# launches and a round trip of the partials cost more than the data. Larger groups need the split passes to
# spread over the GPU. A first guess from that arithmetic, to be set from the GPU session's gn-unet rows
# (bench_group_norm.py times both paths where this one applies).
ONE_PASS_MAX = 1 << 16


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _tile_elems() -> int:
    return 16384 if interpreting() else 4096  # the interpreter pays per program, the GPU per register


def one_pass_config(cg: int, s: int) -> GroupNormConfig:
    """Tile of the one-program-per-group path: all Cg channels x as many positions as fit the tile."""
    block_c = _pow2(cg)
    block_s = max(1, min(_pow2(s), _tile_elems() // block_c))
    return GroupNormConfig(block_c, block_s, num_warps=8 if block_c * block_s >= 4096 else 4, one_pass=True)


def default_config(n: int, c: int, s: int, stride_c: int, stride_s: int, groups: int | None = None
                   ) -> GroupNormConfig:
    """Tile for an (n, c, s) view: unit-stride axis fast; many programs per group on big volumes, one
    program per group when ``groups`` is given and a group holds at most ONE_PASS_MAX elements (and at
    most 1024 channels, so that a tile of all of them still fits)."""
    if groups is not None and (c // groups) * s <= ONE_PASS_MAX and c // groups <= 1024:
        return one_pass_config(c // groups, s)
    elems = _tile_elems()
    if stride_c == 1 and stride_s != 1:  # channels_last: a tile is BLOCK_S rows of all channels
        block_c = min(_pow2(c), 512)
        block_s = max(1, min(_pow2(s), elems // block_c))
    else:  # contiguous: a tile is BLOCK_S positions of a few channels
        block_s = min(_pow2(s), elems)
        block_c = max(1, min(_pow2(c), elems // block_s))
    programs = triton.cdiv(s, block_s) * triton.cdiv(c, block_c) * n
    tiles = 1
    if not interpreting():  # fewer, longer programs once there are plenty to fill the GPU
        while tiles < 8 and programs // (2 * tiles) >= 8192 and triton.cdiv(s, block_s) >= 2 * tiles:
            tiles *= 2
    return GroupNormConfig(block_c, block_s, tiles, None, 8 if block_c * block_s >= 4096 else 4)


def _view3(t: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) -> (N, C, S): a view for contiguous and channels_last input, else a copy."""
    return t.reshape(t.shape[0], t.shape[1], -1)


def empty_output(x: torch.Tensor) -> torch.Tensor:
    """The output tensor the kernels write for input ``x``: x's shape and dtype, and x's layout where the
    spatial dims collapse (contiguous, channels_last(_3d)), else contiguous. Also used by the fake impl."""
    x3 = _view3(x)
    return torch.empty_like(x3).view(x.shape)


def _finalize_blocks(splits: int, cg: int, config: GroupNormConfig) -> tuple[int, int, int]:
    block_cg = _pow2(cg)
    block_p = config.block_p or max(1, min(_pow2(splits), 4096 // block_cg))
    return block_cg, block_p, triton.cdiv(splits, block_p)


def _check_out(out: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if out is None:
        return empty_output(x)
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"group_norm: out must be {tuple(x.shape)} {x.dtype} on {x.device}")
    return out


def _vec(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


@on_input_device
def group_norm_fwd(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, add: torch.Tensor | None = None, eps: float = 1e-6,
                   act: str | None = None, out: torch.Tensor | None = None,
                   config: GroupNormConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton GroupNorm forward. Returns (y, mean, rstd); mean/rstd are (N, G) fp32 statistics of x + add.

    ``out`` (optional) is written in place (tests pass a NaN-filled one); ``config`` forces the tiling
    (tests use small tiles so that every group is split over many programs with tails).
    """
    N, C = x.shape[0], x.shape[1]
    G = num_groups
    Cg = C // G
    y = _check_out(out, x)
    x3, y3 = _view3(x), y.view(N, C, -1)
    S = x3.shape[2]
    mean = torch.empty((N, G), device=x.device, dtype=torch.float32)
    rstd = torch.empty((N, G), device=x.device, dtype=torch.float32)
    if x.numel() == 0:
        mean.fill_(float("nan"))
        rstd.fill_(float("nan"))
        return y, mean, rstd
    cfg = config or default_config(N, C, S, x3.stride(1), x3.stride(2), G)
    weight, bias, add = _vec(weight), _vec(bias), _vec(add)
    dummy = mean  # stands in for absent optional pointers (never read: the HAS_* flag is off)
    if cfg.one_pass:
        _gn_fwd_group_kernel[(G, N)](x3, y3, mean, rstd, weight if weight is not None else dummy,
                                     bias if bias is not None else dummy, add if add is not None else dummy,
                                     C, S, G, Cg, 1.0 / (Cg * S), float(eps), *x3.stride(), *y3.stride(),
                                     HAS_W=weight is not None, HAS_B=bias is not None, HAS_ADD=add is not None,
                                     SILU=act == "silu", BLOCK_C=_pow2(Cg), BLOCK_S=cfg.block_s,
                                     num_warps=cfg.num_warps)
        return y, mean, rstd
    chunk = cfg.block_s * cfg.tiles
    splits = triton.cdiv(S, chunk)
    cblocks = triton.cdiv(C, cfg.block_c)
    pmean = torch.empty((N, C, splits), device=x.device, dtype=torch.float32)
    pm2 = torch.empty_like(pmean)
    grid = (splits, cblocks, N)
    _gn_fwd_stats_kernel[grid](x3, pmean, pm2, C, S, *x3.stride(), splits,
                               BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s, TILES=cfg.tiles,
                               num_warps=cfg.num_warps)
    block_cg, block_p, p_iters = _finalize_blocks(splits, Cg, cfg)
    _gn_fwd_finalize_kernel[(G, N)](pmean, pm2, add if add is not None else dummy, mean, rstd,
                                    C, S, G, Cg, splits, chunk, 1.0 / (Cg * S), float(eps),
                                    HAS_ADD=add is not None, BLOCK_CG=block_cg, BLOCK_P=block_p,
                                    P_ITERS=p_iters, num_warps=4)
    _gn_fwd_apply_kernel[grid](x3, y3, mean, rstd, weight if weight is not None else dummy,
                               bias if bias is not None else dummy, add if add is not None else dummy,
                               C, S, G, Cg, *x3.stride(), *y3.stride(),
                               HAS_W=weight is not None, HAS_B=bias is not None, HAS_ADD=add is not None,
                               SILU=act == "silu", BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s,
                               TILES=cfg.tiles, num_warps=cfg.num_warps)
    return y, mean, rstd


@on_input_device
def group_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   add: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor, num_groups: int,
                   act: str | None = None, dx_out: torch.Tensor | None = None,
                   config: GroupNormConfig | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton GroupNorm backward from the forward's (mean, rstd).

    Returns (dx in x's dtype and layout, dweight (C,) fp32, dbias (C,) fp32, dadd (N, C) fp32, or an
    empty tensor when ``add`` is None). dweight/dbias are computed whether or not weight/bias exist.
    """
    N, C = x.shape[0], x.shape[1]
    G = num_groups
    Cg = C // G
    dx = _check_out(dx_out, x)
    x3, d3, o3 = _view3(x), _view3(dy), dx.view(N, C, -1)
    S = x3.shape[2]
    f32 = dict(device=x.device, dtype=torch.float32)
    ds = torch.zeros((N, C), **f32)
    dd = torch.zeros((N, C), **f32)
    dadd = torch.zeros((N, C), **f32) if add is not None else torch.empty((0,), **f32)
    if x.numel() == 0:
        return dx, dd.sum(0), ds.sum(0), dadd
    cfg = config or default_config(N, C, S, x3.stride(1), x3.stride(2), G)
    weight, bias, add = _vec(weight), _vec(bias), _vec(add)
    dummy = mean
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_ADD=add is not None, SILU=act == "silu")
    wp = weight if weight is not None else dummy
    bp = bias if bias is not None else dummy
    ap = add if add is not None else dummy
    if cfg.one_pass:
        _gn_bwd_group_kernel[(G, N)](x3, d3, o3, mean, rstd, wp, bp, ap, ds, dd, dadd if add is not None else dummy,
                                     C, S, G, Cg, 1.0 / (Cg * S), *x3.stride(), *d3.stride(), *o3.stride(),
                                     **flags, BLOCK_C=_pow2(Cg), BLOCK_S=cfg.block_s, num_warps=cfg.num_warps)
        return dx, dd.sum(0), ds.sum(0), dadd
    chunk = cfg.block_s * cfg.tiles
    splits = triton.cdiv(S, chunk)
    cblocks = triton.cdiv(C, cfg.block_c)
    pds = torch.empty((N, C, splits), **f32)
    pdd = torch.empty_like(pds)
    psx = torch.empty_like(pds) if add is not None else dummy
    c1 = torch.empty((N, G), **f32)
    c2 = torch.empty((N, G), **f32)
    grid = (splits, cblocks, N)
    _gn_bwd_stats_kernel[grid](x3, d3, mean, rstd, wp, bp, ap, pds, pdd, psx, C, S, G, Cg,
                               *x3.stride(), *d3.stride(), splits, **flags,
                               BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s, TILES=cfg.tiles,
                               num_warps=cfg.num_warps)
    block_cg, block_p, p_iters = _finalize_blocks(splits, Cg, cfg)
    _gn_bwd_finalize_kernel[(G, N)](pds, pdd, psx, wp, rstd, ds, dd, c1, c2, dadd if add is not None else dummy,
                                    C, S, G, Cg, splits, 1.0 / (Cg * S),
                                    HAS_W=weight is not None, HAS_ADD=add is not None, BLOCK_CG=block_cg,
                                    BLOCK_P=block_p, P_ITERS=p_iters, num_warps=4)
    _gn_bwd_apply_kernel[grid](x3, d3, o3, mean, rstd, c1, c2, wp, bp, ap, C, S, G, Cg,
                               *x3.stride(), *d3.stride(), *o3.stride(), **flags,
                               BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s, TILES=cfg.tiles,
                               num_warps=cfg.num_warps)
    return dx, dd.sum(0), ds.sum(0), dadd
