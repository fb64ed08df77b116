"""Fused multi-head attention in Triton: FlashAttention-2-style forward and backward.

    O = softmax(Q K^T * D**-0.5 + mask) V        Q (B, H, Nq, D), K/V (B, H, Nk, D), non-causal

Why a fused kernel: the UNet of Text2CT attends over every latent voxel at its two deepest levels
(8192 tokens at a 128x128x32 latent, 32768 at 128x128x128). A materialised score matrix for one
(batch, head) at 32k tokens is 32768^2 * 4 B = 4 GiB, and autograd keeps one per head. Here the scores
only ever exist as a BLOCK_M x BLOCK_N tile in registers, so the extra memory is O(N): the output,
and one fp32 log-sum-exp (LSE) per query row that the backward uses to rebuild the softmax exactly.

Forward (one program per BLOCK_M query rows of one (batch, head)):
    load the Q tile once, then stream K/V in BLOCK_N-row tiles and keep an *online softmax*:
    a running row max m, a running denominator l and an unnormalised fp32 accumulator acc.
    When a new tile raises the max, old contributions are rescaled by alpha = 2^(m_old - m_new).
    One division by l at the end normalises; LSE = m + log(l) is stored for the backward.
    Work is in base 2 (exp2 is the native instruction): each score tile is scaled by D**-0.5 * log2(e).
    Bytes per head: Q read and O written once (2 Nq D elements), K and V streamed once per query block
    (2 Nk D * Nq / BLOCK_M), against 4 Nq Nk D FLOPs: BLOCK_M FLOPs per 16-bit byte even if no K/V
    re-read hit the cache, and most do (the programs of one head run side by side and share K/V in L2).
    At head size 32 the limit is the softmax itself: every score costs one exp2 and a few FMAs on the
    CUDA cores against only 4 * 32 = 128 tensor-core FLOPs, so tiles are sized to keep that work busy.

Backward (recompute instead of storing P):
    Delta_i = rowsum(O_i * dO_i)        (a small pre-pass; equals sum_j P_ij dP_ij; it also stores
                                         LSE2_i = LSE_i * log2e, so each score costs one FMA before exp2)
    P_ij = 2^(S_ij * D**-0.5 * log2e - LSE2_i),   dP = dO V^T,   dS = P * (dP - Delta)
    dV = P^T dO,   dK = dS^T Q * D**-0.5,   dQ = dS K * D**-0.5
  Two kernels, no atomics, deterministic:
    * dK/dV: one program per BLOCK_N keys keeps its K, V tile and fp32 dK, dV accumulators in registers
      and streams all query tiles (Q, dO, LSE, Delta). For a short K/V (text context of 1-512 tokens)
      that would leave most of the GPU idle, so the query range can be split over Q_SPLITS programs that
      write fp32 partial sums (Q_SPLITS x Nk x D, still O(N)) which are added afterwards.
    * dQ: one program per BLOCK_M queries keeps Q, dO and an fp32 dQ accumulator and streams K/V.
  That recomputes S and dP twice (7 matmuls instead of the 5 of an atomic-add variant) in exchange for
  plain stores and no fp32 dQ scratch of size Nq x D.

Masks and tails: any Nq, Nk (no multiple-of-block requirement). Full tiles (K/V in the forward and dQ
kernels, Q/dO in the dK/dV kernel) run without bounds checks; only the last partial tile pays for masked
loads and a column mask (``_load_tile``, ``_load_rows``). The key padding mask is
(B, Nk) bool (True = attend), read as bytes. A query row whose keys are all masked (a fully padded
context) has l = 0: it gets O = 0, LSE = +inf, and since 2^(S - inf) = 0 its gradients are exactly zero.

Under ``TRITON_INTERPRET=1`` (CPU): one fixed config (no autotune), and bf16 inputs are upcast to fp32
before ``tl.dot`` because the interpreter's bf16 dot is wrong.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .launch import interpreting, on_input_device

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Block sizes used under the interpreter unless the caller passes its own (tests pass 16 to exercise
# multi-tile loops and tails on tiny inputs). Every query split is a multiple of the largest BLOCK_M.
INTERPRET_BLOCK_M = 32
INTERPRET_BLOCK_N = 32
_GPU_MAX_BLOCK_M = 128


# ------------------------------------------------------------------------------- boundary-aware loads

@triton.jit
def _load_tile(base, rows, n_rows, stride_row, stride_col, COLS: tl.constexpr, BOUNDARY: tl.constexpr):
    """A (len(rows), COLS) tile of a row-major operand. Only the last, partial tile (BOUNDARY) pays for a
    bounds mask; its rows past n_rows read as 0."""
    ptrs = base + rows[:, None] * stride_row + tl.arange(0, COLS)[None, :] * stride_col
    if BOUNDARY:
        return tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _load_rows(base, rows, n_rows, stride, other, BOUNDARY: tl.constexpr):
    """One value per row (mask bytes, LSE, Delta); rows past n_rows read as ``other`` in a BOUNDARY tile."""
    if BOUNDARY:
        return tl.load(base + rows * stride, mask=rows < n_rows, other=other)
    return tl.load(base + rows * stride)


# --------------------------------------------------------------------------------------------- forward

@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k_base, v_base, mask_base, start_n, Nk,
              stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
              BOUNDARY: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one BLOCK_N-key tile into the running (acc, m, l) of BLOCK_M query rows."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(k_base, offs_n, Nk, stride_kn, stride_kd, HEAD_DIM, BOUNDARY)  # keys past Nk: masked below
    v = _load_tile(v_base, offs_n, Nk, stride_vn, stride_vd, HEAD_DIM, BOUNDARY)
    # Raw scores S = Q K^T. The softmax works in log2 units, S * qk_scale with qk_scale = D**-0.5 * log2(e),
    # so that exp(x) becomes exp2(x). qk_scale > 0 commutes with the row max, so it scales the max (BLOCK_M
    # multiplies) and enters exp2's argument as one FMA per score: at head size 32 the softmax, not the
    # matmuls, bounds this loop, and a separate multiply per score would cost ~12 % of its instructions.
    s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION)
    if HAS_MASK:
        keep = _load_rows(mask_base, offs_n, Nk, stride_mn, 0, BOUNDARY) != 0
        s = tl.where(keep[None, :], s, float("-inf"))
    elif BOUNDARY:
        s = tl.where((offs_n < Nk)[None, :], s, float("-inf"))
    # Online softmax. m_new is -inf only while every key seen so far was masked; exponentiate against 0
    # then, so that exp2(-inf - -inf) never makes a NaN (p and alpha are 0, acc and l stay 0).
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    if HAS_MASK:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:  # the first tile always holds key 0, so m_new is finite from the start
        m_ref = m_new
    p = tl.exp2(tl.fma(s, qk_scale, -m_ref[:, None]))
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, Mask, O, LSE,
                     stride_qb, stride_qh, stride_qm, stride_qd,
                     stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_mb, stride_mn,
                     stride_ob, stride_oh, stride_om, stride_od,
                     H, Nq, Nk, qk_scale, nq_bucket, nk_bucket,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_MASK: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (cdiv(Nq, BLOCK_M), B * H). Writes O (input dtype) and LSE (fp32, natural log)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # 64-bit base offsets: B*H*N*D can pass 2^31
    b = pid_bh // H
    h = pid_bh % H
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    mask_base = Mask + b * stride_mb

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Nq
    # The Q tile stays in registers for the whole K/V sweep: Q is read from memory exactly once.
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = (Nk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, mask_base, start_n, Nk,
                                  stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, qk_scale,
                                  HEAD_DIM, BLOCK_N, HAS_MASK, False, DOT_DTYPE, PRECISION)
    if n_full < Nk:
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, mask_base, n_full, Nk,
                                  stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, qk_scale,
                                  HEAD_DIM, BLOCK_N, HAS_MASK, True, DOT_DTYPE, PRECISION)

    # Normalise once. Rows with no attended key (l = 0) give O = 0 and LSE = +inf.
    attended = l_i > 0.0
    l_safe = tl.where(attended, l_i, 1.0)
    o = tl.where(attended[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(attended, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("inf"))
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + pid_bh * Nq + offs_m, lse, mask=row_ok)


# -------------------------------------------------------------------------------------------- backward

@triton.jit
def _attn_bwd_delta_kernel(O, DO, LSE, Delta, LSE2,
                           stride_ob, stride_oh, stride_om, stride_od,
                           stride_dob, stride_doh, stride_dom, stride_dod,
                           H, Nq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta = rowsum(O * dO) in fp32, and LSE2 = LSE * log2(e) (the log2-unit LSE both backward kernels
    subtract inside exp2, converted once here instead of in every tile). Grid (cdiv(Nq, BLOCK_M), B * H).
    Reads O and dO once (2 N D elements) and LSE (N fp32), writes 2 N fp32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Nq
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(Delta + pid_bh * Nq + offs_m, tl.sum(o * do, 1), mask=row_ok)
    lse = tl.load(LSE + pid_bh * Nq + offs_m, mask=row_ok, other=0.0)
    tl.store(LSE2 + pid_bh * Nq + offs_m, lse * 1.4426950408889634, mask=row_ok)


@triton.jit
def _dkdv_tile(dk, dv, k, v, key_ok, q_base, do_base, lse2_base, delta_base, dq_base, start_m, Nq,
               stride_qm, stride_qd, stride_dom, stride_dod, qk_scale, sm_scale,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BOUNDARY: tl.constexpr,
               DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """Fold one BLOCK_M-query tile into the fp32 dK, dV accumulators of BLOCK_N keys (transposed tiles)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_tile(q_base, offs_m, Nq, stride_qm, stride_qd, HEAD_DIM, BOUNDARY).to(DOT_DTYPE)
    do = _load_tile(do_base, offs_m, Nq, stride_dom, stride_dod, HEAD_DIM, BOUNDARY).to(DOT_DTYPE)
    # Rows past Nq (and fully masked rows, whose saved LSE is +inf) get P = 0 exactly.
    lse2 = _load_rows(lse2_base, offs_m, Nq, 1, float("inf"), BOUNDARY)
    delta = _load_rows(delta_base, offs_m, Nq, 1, 0.0, BOUNDARY)
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)                    # (BLOCK_N, BLOCK_M)
    p_t = tl.exp2(tl.fma(s_t, qk_scale, -lse2[None, :]))  # one FMA and one exp2 per score
    dv = tl.dot(p_t.to(DOT_DTYPE), do, dv, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(DOT_DTYPE), q, dk, input_precision=PRECISION)
    if ATOMIC_DQ:  # masked and missing keys add nothing to dQ (their P entries are not zero here)
        ds_keys = tl.where(key_ok[:, None], ds_t, 0.0).to(DOT_DTYPE)
        dq_part = tl.dot(tl.trans(ds_keys), k, input_precision=PRECISION) * sm_scale
        dq_ptrs = dq_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        # Relaxed: the sums are read only after the kernel ends, so no ordering is needed; the default
        # (acq_rel) put a full GPU memory barrier and a cache invalidation beside every vector atomic (SASS).
        if BOUNDARY:
            tl.atomic_add(dq_ptrs, dq_part, mask=(offs_m < Nq)[:, None], sem="relaxed")
        else:
            tl.atomic_add(dq_ptrs, dq_part, sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, Mask, DO, LSE2, Delta, DK, DV, DQ,
                          stride_qb, stride_qh, stride_qm, stride_qd,
                          stride_kb, stride_kh, stride_kn, stride_kd,
                          stride_vb, stride_vh, stride_vn, stride_vd,
                          stride_mb, stride_mn,
                          stride_dob, stride_doh, stride_dom, stride_dod,
                          stride_dks, stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                          stride_dvs, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                          H, Nq, Nk, qk_scale, sm_scale, q_per_split, nq_bucket, nk_bucket,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          HAS_MASK: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                          ATOMIC_DQ: tl.constexpr = False):
    """Grid (cdiv(Nk, BLOCK_N), B * H, Q_SPLITS): dK, dV of BLOCK_N keys over one range of queries.

    Works on transposed tiles (keys along rows) so that P^T and dS^T come straight out of the dots.
    K and V are read once; Q, dO, LSE and Delta once per key block: ~(2 + 2 * Nk/BLOCK_N) * N * D reads.

    ``ATOMIC_DQ``: also add this key block's share dS K of dQ into the contiguous fp32 (B, H, Nq, D)
    buffer DQ with atomic adds (FlashAttention-2's backward), so the dQ kernel and its second computation
    of S, P and dP (one exp2 per score, the limit at head size 32) are skipped, at the price of
    Nk / BLOCK_N atomic adds per dQ element and a summation order that varies from run to run.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse2_base = LSE2 + pid_bh * Nq
    delta_base = Delta + pid_bh * Nq
    dq_base = DQ + pid_bh * Nq * HEAD_DIM

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < Nk
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=key_ok[:, None], other=0.0).to(DOT_DTYPE)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=key_ok[:, None], other=0.0).to(DOT_DTYPE)
    m_lo = pid_s * q_per_split
    m_hi = tl.minimum(m_lo + q_per_split, Nq)
    if HAS_MASK:
        key_ok = key_ok & (tl.load(Mask + b * stride_mb + offs_n * stride_mn, mask=key_ok, other=0) != 0)
        # A tile of padding keys (e.g. the padded tail of a text context) has zero gradients: skip it.
        if tl.sum(key_ok.to(tl.int32), 0) == 0:
            m_hi = m_lo

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # Full query tiles without bounds checks, then the partial tail (only the last split has one).
    m_full = m_lo + (m_hi - m_lo) // BLOCK_M * BLOCK_M
    for start_m in range(m_lo, m_full, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, key_ok, q_base, do_base, lse2_base, delta_base, dq_base, start_m, Nq,
                            stride_qm, stride_qd, stride_dom, stride_dod, qk_scale, sm_scale,
                            HEAD_DIM, BLOCK_M, False, DOT_DTYPE, PRECISION, ATOMIC_DQ)
    if m_full < m_hi:
        dk, dv = _dkdv_tile(dk, dv, k, v, key_ok, q_base, do_base, lse2_base, delta_base, dq_base, m_full, Nq,
                            stride_qm, stride_qd, stride_dom, stride_dod, qk_scale, sm_scale,
                            HEAD_DIM, BLOCK_M, True, DOT_DTYPE, PRECISION, ATOMIC_DQ)
    # Key masking is row-local here (row j of dK/dV only depends on P[:, j]), so masked and
    # out-of-range keys are zeroed once at the end instead of masking every tile.
    dk = tl.where(key_ok[:, None], dk * sm_scale, 0.0)
    dv = tl.where(key_ok[:, None], dv, 0.0)
    store_ok = (offs_n < Nk)[:, None]
    tl.store(DK + pid_s * stride_dks + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=store_ok)
    tl.store(DV + pid_s * stride_dvs + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=store_ok)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_base, v_base, mask_base, start_n, Nk,
             stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, qk_scale,
             HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
             BOUNDARY: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Add one K/V tile's share dS K to the fp32 dQ accumulator of BLOCK_M query rows."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(k_base, offs_n, Nk, stride_kn, stride_kd, HEAD_DIM, BOUNDARY).to(DOT_DTYPE)
    v = _load_tile(v_base, offs_n, Nk, stride_vn, stride_vd, HEAD_DIM, BOUNDARY).to(DOT_DTYPE)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    p = tl.exp2(tl.fma(s, qk_scale, -lse2[:, None]))  # the forward's softmax, rebuilt from the saved LSE
    if HAS_MASK:
        keep = _load_rows(mask_base, offs_n, Nk, stride_mn, 0, BOUNDARY) != 0
        p = tl.where(keep[None, :], p, 0.0)
    elif BOUNDARY:
        p = tl.where((offs_n < Nk)[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(DOT_DTYPE), k, dq, input_precision=PRECISION)


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, Mask, DO, LSE2, Delta, DQ,
                        stride_qb, stride_qh, stride_qm, stride_qd,
                        stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_vd,
                        stride_mb, stride_mn,
                        stride_dob, stride_doh, stride_dom, stride_dod,
                        stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                        H, Nq, Nk, qk_scale, sm_scale, nq_bucket, nk_bucket,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        HAS_MASK: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (cdiv(Nq, BLOCK_M), B * H): dQ of BLOCK_M queries, streaming K/V like the forward."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    mask_base = Mask + b * stride_mb

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Nq
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0).to(DOT_DTYPE)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=row_ok[:, None], other=0.0).to(DOT_DTYPE)
    lse2 = tl.load(LSE2 + pid_bh * Nq + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + pid_bh * Nq + offs_m, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = (Nk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, mask_base, start_n, Nk,
                      stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, qk_scale,
                      HEAD_DIM, BLOCK_N, HAS_MASK, False, DOT_DTYPE, PRECISION)
    if n_full < Nk:
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, mask_base, n_full, Nk,
                      stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, qk_scale,
                      HEAD_DIM, BLOCK_N, HAS_MASK, True, DOT_DTYPE, PRECISION)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ------------------------------------------------------------------------------------ GPU autotuning

def _prune(configs, named_args, **kwargs):
    """Drop key tiles far wider than the key count (cross-attention to 1-77 text tokens)."""
    nk = named_args["Nk"]
    widest = max(16, triton.next_power_of_2(nk))
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= widest]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_N"])]


def _fwd_configs() -> list:
    shapes = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 4),
              (64, 32, 4, 3), (64, 16, 2, 2), (128, 16, 4, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _bwd_configs(kernel: str) -> list:
    """(BLOCK_M, BLOCK_N, warps, stages) per backward kernel. The tile's row dimension (keys for dK/dV,
    queries for dQ) must give every warp its own rows: with fewer than 16 rows per warp Triton's mma
    layout makes warps repeat each other's scores (kernel_check counts the exp2 per score and objects)."""
    if kernel == "dkdv":  # rows = BLOCK_N keys
        shapes = [(64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2), (32, 128, 4, 2), (128, 64, 4, 2),
                  (64, 32, 2, 2), (32, 16, 1, 2), (64, 16, 1, 2)]
    else:  # dq, rows = BLOCK_M queries
        shapes = [(64, 64, 4, 2), (32, 64, 2, 2), (64, 128, 4, 2), (32, 128, 2, 2), (128, 64, 8, 2),
                  (64, 32, 4, 2), (32, 16, 2, 2), (64, 16, 2, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


_KEY = ["HEAD_DIM", "nq_bucket", "nk_bucket", "HAS_MASK"]


@functools.lru_cache(maxsize=None)
def _tuned(name: str):
    """Autotuned wrappers, built on first GPU use (never under the interpreter, which cannot bench)."""
    prune = {"early_config_prune": _prune}
    if name == "fwd":
        return triton.autotune(_fwd_configs(), key=_KEY, prune_configs_by=prune)(_attn_fwd_kernel)
    if name == "dkdv":
        return triton.autotune(_bwd_configs("dkdv"), key=_KEY, prune_configs_by=prune)(_attn_bwd_dkdv_kernel)
    if name == "dkdv_atomic":  # every trial run adds into DQ: the tuner zeroes it before each
        return triton.autotune(_bwd_configs("dkdv"), key=_KEY, prune_configs_by=prune,
                               reset_to_zero=["DQ"])(_attn_bwd_dkdv_kernel)
    if name == "dq":
        return triton.autotune(_bwd_configs("dq"), key=_KEY, prune_configs_by=prune)(_attn_bwd_dq_kernel)
    raise KeyError(name)


# ------------------------------------------------------------------------------------------ wrappers

def _bucket(n: int) -> int:
    """Autotune key for a sequence length: its power-of-two bucket (so new lengths reuse a tuning)."""
    return triton.next_power_of_2(max(int(n), 1))


def _dot_setup(dtype: torch.dtype) -> tuple:
    """(dtype fed to tl.dot, input precision). fp32 keeps IEEE dots unless torch allows TF32."""
    if dtype == torch.float16:
        return tl.float16, "tf32"  # precision only matters for fp32 operands
    if dtype == torch.bfloat16:
        return (tl.float32, "ieee") if interpreting() else (tl.bfloat16, "tf32")
    tf32 = torch.backends.cuda.matmul.allow_tf32 and not interpreting()
    return tl.float32, ("tf32" if tf32 else "ieee")


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 key_padding_mask: torch.Tensor | None = None) -> None:
    """Raise ``ValueError`` unless the kernels can serve these tensors."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention kernel: q, k, v must be 4-D (B, H, N, D)")
    B, H, _, D = q.shape
    if tuple(k.shape[:2]) != (B, H) or k.shape[3] != D or k.shape != v.shape:
        raise ValueError(f"attention kernel: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         f"disagree in batch, heads or head size")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"attention kernel: head size {D} is not supported (supported: {SUPPORTED_HEAD_DIMS})")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"attention kernel: q, k, v must share one dtype of fp16/bf16/fp32, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or tuple(key_padding_mask.shape) != (B, k.shape[2])):
        raise ValueError(f"attention kernel: key_padding_mask must be bool (B, Nk) = ({B}, {k.shape[2]})")


def _mask_args(mask: torch.Tensor | None, like: torch.Tensor) -> tuple:
    if mask is None:
        return like, 0, 0  # never read: HAS_MASK is False
    m = mask.view(torch.uint8)  # bool is one byte: read it as bytes without a copy
    return m, m.stride(0), m.stride(1)


def _blocks(block_m: int | None, block_n: int | None) -> tuple[int, int] | None:
    """Explicit block sizes (caller's, or the interpreter's defaults), or None to autotune on GPU."""
    if block_m is None and block_n is None and not interpreting():
        return None
    return (block_m or INTERPRET_BLOCK_M, block_n or INTERPRET_BLOCK_N)


@on_input_device
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      key_padding_mask: torch.Tensor | None = None, *,
                      out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                      block_m: int | None = None, block_n: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention forward. Returns (O (B, H, Nq, D) in q's dtype, LSE (B, H, Nq) fp32).

    ``out``/``lse`` may be given as preallocated buffers (every element is written). ``block_m``/
    ``block_n`` pin the tile sizes (powers of two >= 16); by default the interpreter uses a fixed pair
    and a GPU autotunes.
    """
    check_inputs(q, k, v, key_padding_mask)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if out is None:
        out = torch.empty((B, H, Nq, D), dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    if not lse.is_contiguous() or lse.shape != (B, H, Nq):
        raise ValueError("attention_forward: lse must be a contiguous (B, H, Nq) fp32 buffer")
    if B * H * Nq == 0:
        return out, lse
    mask, smb, smn = _mask_args(key_padding_mask, q)
    dot_dtype, precision = _dot_setup(q.dtype)
    args = (q, k, v, mask, out, lse, *q.stride(), *k.stride(), *v.stride(), smb, smn, *out.stride(),
            H, Nq, Nk, D ** -0.5 * LOG2E, _bucket(Nq), _bucket(Nk))
    consts = dict(HEAD_DIM=D, HAS_MASK=key_padding_mask is not None, DOT_DTYPE=dot_dtype, PRECISION=precision)
    blocks = _blocks(block_m, block_n)
    if blocks is None:
        grid = lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * H)  # noqa: E731
        _tuned("fwd")[grid](*args, **consts)
    else:
        bm, bn = blocks
        _attn_fwd_kernel[(triton.cdiv(Nq, bm), B * H)](*args, BLOCK_M=bm, BLOCK_N=bn, **consts, num_warps=4)
    return out, lse


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def default_q_splits(B: int, H: int, Nq: int, Nk: int, device: torch.device) -> int:
    """How many programs share one key block's query sweep in the dK/dV kernel.

    Self-attention has plenty of key blocks; cross-attention to a short context (1-512 tokens) has a
    handful per head, so the query range is split until there are ~4 programs per SM, keeping at
    least 512 queries per split so the fp32 partial sums stay small next to the work.
    """
    programs = triton.cdiv(max(Nk, 1), 64) * B * H
    want = triton.cdiv(4 * _num_sms(device), programs)
    return max(1, min(want, Nq // 512))


# How the backward computes dQ: "separate" (its own kernel, deterministic) or "atomic" (inside the dK/dV
# kernel with fp32 atomic adds, one computation of P fewer). Read at each call; the benchmark times both.
DQ_MODES = ("separate", "atomic")
DQ_MODE = "separate"


@on_input_device
def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor,
                       key_padding_mask: torch.Tensor | None = None, *,
                       dq: torch.Tensor | None = None, dk: torch.Tensor | None = None,
                       dv: torch.Tensor | None = None, block_m: int | None = None,
                       block_n: int | None = None, q_splits: int | None = None, dq_mode: str | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dQ, dK, dV) of ``attention_forward`` given dO, from the saved output and LSE.

    ``dq``/``dk``/``dv`` may be preallocated (fully written). ``q_splits`` > 1 splits each key block's
    query sweep over that many programs (fp32 partials, summed afterwards); default: a heuristic.
    ``dq_mode``: one of DQ_MODES, default the module's DQ_MODE.
    """
    dq_mode = dq_mode or DQ_MODE
    if dq_mode not in DQ_MODES:
        raise ValueError(f"attention_backward: dq_mode must be one of {DQ_MODES}, got {dq_mode!r}")
    check_inputs(q, k, v, key_padding_mask)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if grad_out.shape != q.shape or out.shape != q.shape:
        raise ValueError("attention_backward: grad_out and out must have q's shape (B, H, Nq, D)")
    if lse.shape != (B, H, Nq) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError("attention_backward: lse must be the forward's contiguous (B, H, Nq) fp32 LSE")
    dq = torch.empty((B, H, Nq, D), dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty((B, H, Nk, D), dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty((B, H, Nk, D), dtype=v.dtype, device=v.device) if dv is None else dv
    if B * H == 0 or (Nq == 0 and Nk == 0):
        return dq, dk, dv
    if Nq == 0:  # no query: the keys receive no gradient
        dk.zero_()
        dv.zero_()
        return dq, dk, dv
    atomic = dq_mode == "atomic" and Nk > 0
    dq32 = torch.zeros((B, H, Nq, D), dtype=torch.float32, device=q.device) if atomic else dq

    mask, smb, smn = _mask_args(key_padding_mask, q)
    dot_dtype, precision = _dot_setup(q.dtype)
    consts = dict(HEAD_DIM=D, HAS_MASK=key_padding_mask is not None, DOT_DTYPE=dot_dtype, PRECISION=precision)
    blocks = _blocks(block_m, block_n)
    qk_scale, sm_scale = D ** -0.5 * LOG2E, D ** -0.5
    nqb, nkb = _bucket(Nq), _bucket(Nk)

    # Pre-pass: Delta = rowsum(O * dO) and the LSE in log2 units, one fp32 each per query row.
    delta = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    dbm = 64
    _attn_bwd_delta_kernel[(triton.cdiv(Nq, dbm), B * H)](
        out, grad_out, lse, delta, lse2, *out.stride(), *grad_out.stride(), H, Nq, HEAD_DIM=D, BLOCK_M=dbm)

    # dK, dV. With several query splits, each split writes an fp32 partial that is summed below.
    splits = q_splits if q_splits is not None else default_q_splits(B, H, Nq, Nk, q.device)
    align = blocks[0] if blocks is not None else _GPU_MAX_BLOCK_M
    q_per_split = triton.cdiv(triton.cdiv(Nq, max(1, splits)), align) * align
    splits = triton.cdiv(Nq, q_per_split)  # no empty split
    if Nk > 0:
        if splits == 1:
            dk_t, dv_t = dk, dv
            dks, dvs = (0, *dk.stride()), (0, *dv.stride())
        else:
            dk_t = torch.empty((splits, B, H, Nk, D), dtype=torch.float32, device=q.device)
            dv_t = torch.empty_like(dk_t)
            dks, dvs = dk_t.stride(), dv_t.stride()
        args = (q, k, v, mask, grad_out, lse2, delta, dk_t, dv_t, dq32, *q.stride(), *k.stride(), *v.stride(),
                smb, smn, *grad_out.stride(), *dks, *dvs, H, Nq, Nk, qk_scale, sm_scale, q_per_split, nqb, nkb)
        if blocks is None:
            grid = lambda meta: (triton.cdiv(Nk, meta["BLOCK_N"]), B * H, splits)  # noqa: E731
            _tuned("dkdv_atomic" if atomic else "dkdv")[grid](*args, **consts, ATOMIC_DQ=atomic)
        else:
            bm, bn = blocks
            _attn_bwd_dkdv_kernel[(triton.cdiv(Nk, bn), B * H, splits)](*args, BLOCK_M=bm, BLOCK_N=bn, **consts,
                                                                        ATOMIC_DQ=atomic, num_warps=4)
        if splits > 1:
            dk.copy_(dk_t.sum(0))
            dv.copy_(dv_t.sum(0))
    if atomic:
        dq.copy_(dq32)
        return dq, dk, dv

    # dQ.
    args = (q, k, v, mask, grad_out, lse2, delta, dq, *q.stride(), *k.stride(), *v.stride(), smb, smn,
            *grad_out.stride(), *dq.stride(), H, Nq, Nk, qk_scale, sm_scale, nqb, nkb)
    if blocks is None:
        grid = lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * H)  # noqa: E731
        _tuned("dq")[grid](*args, **consts)
    else:
        bm, bn = blocks
        _attn_bwd_dq_kernel[(triton.cdiv(Nq, bm), B * H)](*args, BLOCK_M=bm, BLOCK_N=bn, **consts, num_warps=4)
    return dq, dk, dv


def flops(B: int, H: int, Nq: int, Nk: int, D: int, backward: bool = False) -> float:
    """Matmul FLOPs of one attention forward (4 B H Nq Nk D), or forward+backward (x3.5, the usual count)."""
    f = 4.0 * B * H * Nq * Nk * D
    return f * 3.5 if backward else f


__all__ = ["attention_forward", "attention_backward", "check_inputs", "default_q_splits", "flops",
           "SUPPORTED_HEAD_DIMS", "SUPPORTED_DTYPES"]
