"""Fused Triton attention (kernels/attention.py) and the ``ops.attention`` seam, under TRITON_INTERPRET=1.

Every kernel output is checked against a float64 reference (and float64 autograd for dQ/dK/dV) after
its buffer was filled with NaN, so an element the kernel forgets to write fails the test. Shapes are
tiny and odd (tails in both query and key tiles); tiles of 16 make the loops run several times.
"""
from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from text2ct_engine import ops
from text2ct_engine.kernels.attention import attention_backward, attention_forward, check_inputs
from text2ct_engine.ops.attention import attention_torch, choose_attention_backend

from kernel_device import DEVICE, ON_GPU

attn_mod = importlib.import_module("text2ct_engine.ops.attention")  # ops.attention is also the function

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
GRAD_TOL = {torch.float32: dict(atol=5e-5, rtol=5e-5), torch.float16: dict(atol=1e-2, rtol=1e-2),
            torch.bfloat16: dict(atol=6e-2, rtol=6e-2)}


def reference(q, k, v, mask=None):
    """float64 attention and its natural-log LSE; rows with no attended key give 0 and LSE = +inf."""
    q, k, v = (t.double() for t in (q, k, v))
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v, torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))


def make(B, H, Nq, Nk, D, dtype, mask_kind=None):
    """Random q, k, v (and a key padding mask) on DEVICE."""
    q = torch.randn(B, H, Nq, D).to(dtype)
    k = torch.randn(B, H, Nk, D).to(dtype)
    v = torch.randn(B, H, Nk, D).to(dtype)
    mask = None
    if mask_kind is not None:
        mask = torch.rand(B, Nk) > 0.35
        mask[:, 0] = True  # keep every batch alive unless asked otherwise
        if mask_kind == "one_empty":
            mask[-1] = False  # the last batch attends to nothing: zeros, never NaN
        mask = mask.to(DEVICE)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), mask


def nan_like(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


# (B, H, Nq, Nk, D, dtype, mask kind, query splits in the dK/dV kernel)
CASES = [
    (1, 1, 1, 1, 16, torch.float32, None, 1),
    (2, 3, 7, 77, 32, torch.float16, "random", 1),
    (1, 2, 130, 7, 64, torch.float32, "random", 3),
    (2, 1, 77, 130, 16, torch.float16, None, 2),
    (2, 2, 33, 1, 128, torch.float32, None, 1),       # cross-attention to one pooled text token
    (3, 1, 77, 7, 32, torch.float16, "one_empty", 2),
    (1, 2, 7, 130, 32, torch.bfloat16, "random", 1),   # bf16 loads/stores, fp32 dots in the interpreter
    (2, 1, 130, 77, 32, torch.float32, "one_empty", 1),
]
IDS = [f"B{c[0]}H{c[1]}q{c[2]}k{c[3]}d{c[4]}-{str(c[5])[6:]}-{c[6]}-s{c[7]}" for c in CASES]


@pytest.mark.kernel
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_matches_float64(case):
    B, H, Nq, Nk, D, dtype, mask_kind, _ = case
    q, k, v, mask = make(B, H, Nq, Nk, D, dtype, mask_kind)
    out, lse = nan_like((B, H, Nq, D), dtype), nan_like((B, H, Nq), torch.float32)
    out, lse = attention_forward(q, k, v, mask, out=out, lse=lse, block_m=16, block_n=16)
    ref, ref_lse = reference(q, k, v, mask)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)
    if mask_kind == "one_empty":
        assert (out[-1] == 0).all() and (lse[-1] == float("inf")).all()


@pytest.mark.kernel
@pytest.mark.parametrize("dq_mode", ["separate", "atomic"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_backward_matches_float64_autograd(case, dq_mode):
    B, H, Nq, Nk, D, dtype, mask_kind, splits = case
    q, k, v, mask = make(B, H, Nq, Nk, D, dtype, mask_kind)
    out, lse = attention_forward(q, k, v, mask, block_m=16, block_n=16)
    grad_out = torch.randn(B, H, Nq, D).to(dtype).to(DEVICE)
    dq, dk, dv = (nan_like(t.shape, dtype) for t in (q, k, v))
    dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, mask, dq=dq, dk=dk, dv=dv,
                                    block_m=16, block_n=16, q_splits=splits, dq_mode=dq_mode)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    reference(q64, k64, v64, mask)[0].backward(grad_out.double())
    for got, want in ((dq, q64.grad), (dk, k64.grad), (dv, v64.grad)):
        assert not got.isnan().any()
        torch.testing.assert_close(got.double(), want, **GRAD_TOL[dtype])
    if mask is not None:  # masked keys and queries with nothing to attend get exactly zero gradient
        assert (dk.transpose(1, 2)[~mask] == 0).all() and (dv.transpose(1, 2)[~mask] == 0).all()
    if mask_kind == "one_empty":
        assert (dq[-1] == 0).all()


@pytest.mark.kernel
def test_query_splits_and_dq_modes_agree():
    q, k, v, mask = make(2, 1, 100, 40, 32, torch.float32, "random")
    out, lse = attention_forward(q, k, v, mask, block_m=16, block_n=16)
    g = torch.randn_like(q)
    one = attention_backward(g, q, k, v, out, lse, mask, block_m=16, block_n=16, q_splits=1)
    for splits, mode in ((5, "separate"), (1, "atomic"), (5, "atomic")):  # atomic: 3 key blocks add into dQ
        other = attention_backward(g, q, k, v, out, lse, mask, block_m=16, block_n=16, q_splits=splits,
                                   dq_mode=mode)
        for a, b in zip(one, other):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="dq_mode"):
        attention_backward(g, q, k, v, out, lse, mask, dq_mode="fast")


@pytest.mark.kernel
def test_strided_inputs_and_default_blocks():
    """(B, N, H, D) projections viewed as (B, H, N, D) and an expanded dO: no copies needed."""
    B, H, Nq, Nk, D = 2, 3, 45, 38, 16
    q = torch.randn(B, Nq, H, D, device=DEVICE).transpose(1, 2)
    kv = torch.randn(B, Nk, 2, H, D, device=DEVICE)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    mask = torch.rand(B, Nk, device=DEVICE) > 0.5
    mask[:, 3] = True
    out, lse = attention_forward(q, k, v, mask)  # the interpreter's default tiles, or the GPU's autotuning
    ref, _ = reference(q, k, v, mask)
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
    grad_out = torch.randn(1, 1, 1, D, device=DEVICE).expand(B, H, Nq, D)
    dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, mask)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    reference(q64, k64, v64, mask)[0].backward(grad_out.double())
    for got, want in ((dq, q64.grad), (dk, k64.grad), (dv, v64.grad)):
        torch.testing.assert_close(got.double(), want, **GRAD_TOL[torch.float32])


@pytest.mark.kernel
def test_long_key_sequence():
    """64k + 1 keys (one partial tile at the end), a few queries. The interpreter takes wide key tiles to stay
    quick; compiled kernels take their tuned tiles (a 16 x 4096 tile needs 1.3 MB of shared memory)."""
    blocks = {} if ON_GPU else dict(block_m=16, block_n=4096)
    q, k, v, mask = make(1, 1, 3, 65537, 16, torch.float32, "random")
    out, lse = attention_forward(q, k, v, mask, **blocks)
    ref, ref_lse = reference(q, k, v, mask)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-5)
    g = torch.randn_like(q)
    dq, dk, dv = attention_backward(g, q, k, v, out, lse, mask, **blocks)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    reference(q64, k64, v64, mask)[0].backward(g.double())
    for got, want in ((dq, q64.grad), (dk, k64.grad), (dv, v64.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.kernel
@pytest.mark.kernel
@pytest.mark.skipif(not ON_GPU, reason="8k tokens: too slow for the interpreter")
@pytest.mark.parametrize("dtype,Nq,Nk,mask_kind", [(torch.bfloat16, 8191, 8191, None),
                                                    (torch.float16, 8192, 77, "one_empty")], ids=str)
@pytest.mark.parametrize("dq_mode", ["separate", "atomic"])
def test_autotuned_kernels_at_unet_sizes(dtype, Nq, Nk, mask_kind, dq_mode):
    """The autotuned GPU configs at the UNet's self-attention (8k latent tokens, tails in both tiles) and
    cross-attention sizes (with atomic dQ, the tuner's trial runs must not leave their sums behind). Two
    dtype/shape pairs, not four: every pair compiles some 30 kernels, in the GPU session's time."""
    q, k, v, mask = make(2, 2, Nq, Nk, 32, dtype, mask_kind)
    out, lse = attention_forward(q, k, v, mask, out=nan_like(q.shape, dtype), lse=nan_like(q.shape[:3], torch.float32))
    grad_out = torch.randn_like(q)
    dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, mask, dq=nan_like(q.shape, dtype),
                                    dk=nan_like(k.shape, dtype), dv=nan_like(v.shape, dtype), dq_mode=dq_mode)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, _ = reference(q64, k64, v64, mask)
    ref.backward(grad_out.double())
    torch.testing.assert_close(out.double(), ref.detach(), **TOL[dtype])
    for got, want in ((dq, q64.grad), (dk, k64.grad), (dv, v64.grad)):
        torch.testing.assert_close(got.double(), want, **GRAD_TOL[dtype])


# ------------------------------------------------------------------------------------ ops seam

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ops_triton_matches_sdpa_with_autograd(dtype):
    q, k, v, mask = make(3, 2, 21, 19, 32, dtype, "one_empty")
    for t in (q, k, v):
        t.requires_grad_()
    with ops.backend("triton"):
        assert choose_attention_backend(q)[0] == "triton"
        out = ops.attention(q, k, v, mask)
    grad_out = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad_out))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_torch(q64, k64, v64, mask)
    want = (ref, *torch.autograd.grad(ref, (q64, k64, v64), grad_out.double()))
    for a, b, tol in zip(got, want, (TOL, GRAD_TOL, GRAD_TOL, GRAD_TOL)):
        assert not a.isnan().any()
        torch.testing.assert_close(a.double(), b.detach(), **tol[dtype])


def test_opcheck_custom_ops():
    """Schema, fake impl, autograd registration and dispatch of text2ct::attention_fwd/_bwd."""
    for mask_kind in (None, "one_empty"):
        q, k, v, mask = make(2, 2, 9, 5, 16, torch.float32, mask_kind)
        torch.library.opcheck(torch.ops.text2ct.attention_fwd.default, (q, k, v, mask))
        out, lse = torch.ops.text2ct.attention_fwd(q, k, v, mask)
        torch.library.opcheck(torch.ops.text2ct.attention_bwd.default,
                              (torch.randn_like(out), q, k, v, out, lse, mask))


def test_torch_compile_traces_custom_op():
    q, k, v, mask = make(2, 2, 17, 11, 16, torch.float32, "random")
    q.requires_grad_()

    def f(q, k, v, mask):
        return ops.attention(q * 2.0, k, v, mask).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    with ops.backend("triton"):
        loss = compiled(q, k, v, mask)
        (grad,) = torch.autograd.grad(loss, q)
    q2 = q.detach().requires_grad_()
    want = attention_torch(q2 * 2.0, k, v, mask).square().sum()
    torch.testing.assert_close(loss, want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grad, torch.autograd.grad(want, q2)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Nq,Nk", [(8192, 8192), (32768, 1), (1024, 512)])
def test_fake_cuda_shapes(dtype, Nq, Nk):
    """The memory planner's view: full-size fake CUDA tensors pick Triton and get shapes from the fake impls."""
    with FakeTensorMode():
        q = torch.empty(2, 8, Nq, 32, device="cuda", dtype=dtype)
        k = torch.empty(2, 8, Nk, 32, device="cuda", dtype=dtype)
        mask = torch.ones(2, Nk, device="cuda", dtype=torch.bool)
        assert choose_attention_backend(q)[0] == "triton"
        out = ops.attention(q, k, k, mask)
        assert (out.shape, out.dtype, out.device.type) == (q.shape, dtype, "cuda")
        o, lse = torch.ops.text2ct.attention_fwd(q, k, k, None)
        assert lse.shape == (2, 8, Nq) and lse.dtype == torch.float32
        dq, dk, dv = torch.ops.text2ct.attention_bwd(o, q, k, k, o, lse, mask)
        assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, k.shape)
        assert dq.dtype == dk.dtype == dv.dtype == dtype


def test_fake_autograd_runs_backward_fake_impl():
    # Fake CUDA tensors cannot carry autograd on a CPU-only torch build, so use fake CPU tensors here.
    with FakeTensorMode(), ops.backend("triton"):
        q = torch.empty(2, 4, 300, 32, requires_grad=True)
        k = torch.empty(2, 4, 77, 32, requires_grad=True)
        mask = torch.ones(2, 77, dtype=torch.bool)
        ops.attention(q, k, k, mask).sum().backward()
        assert q.grad.shape == q.shape and k.grad.shape == k.shape


# ----------------------------------------------------------------------------- choice and errors

def _bad_calls():
    q, k, v = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    return {
        "batch": (q, k[:1], v[:1], None),
        "heads": (q, k[:, :1], v[:, :1], None),
        "head size": (q, k[..., :8], v[..., :8], None),
        "k/v shape": (q, k, v[:, :, :3], None),
        "dtype": (q, k.half(), v.half(), None),
        "not 4-D": (q[0], k, v, None),
        "mask shape": (q, k, v, torch.ones(2, 6, dtype=torch.bool)),
        "mask dtype": (q, k, v, torch.ones(2, 7)),
        "mask type": (q, k, v, [True] * 7),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
@pytest.mark.parametrize("which", ["auto", "triton"])
def test_bad_calls_raise_value_error(name, which):
    with ops.backend(which), pytest.raises(ValueError):
        ops.attention(*_bad_calls()[name])


def test_unsupported_head_size():
    q = torch.randn(1, 2, 5, 48)
    with ops.backend("triton"), pytest.raises(ValueError, match="head size 48"):
        ops.attention(q, q, q)
    with pytest.raises(ValueError, match="head size 48"):
        check_inputs(q, q, q)
    torch.testing.assert_close(ops.attention(q, q, q), attention_torch(q, q, q))  # auto on CPU: torch


def test_auto_falls_back_with_one_notice(monkeypatch):
    monkeypatch.setattr(attn_mod, "_noticed", set())
    with FakeTensorMode():
        q = torch.empty(1, 2, 64, 48, device="cuda", dtype=torch.float16)
        name, reason = choose_attention_backend(q)
        assert name == "torch" and "head size 48" in reason
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for _ in range(3):
                assert ops.attention(q, q, q).shape == q.shape
    assert len([w for w in seen if "head size 48" in str(w.message)]) == 1


def test_backend_choice(monkeypatch):
    q = torch.randn(1, 1, 4, 32)
    monkeypatch.delenv("TEXT2CT_ATTENTION", raising=False)
    monkeypatch.delenv("TEXT2CT_BACKEND", raising=False)
    assert choose_attention_backend(q)[0] == "torch"
    with ops.backend("cpp"):
        assert choose_attention_backend(q)[0] == "torch"
    monkeypatch.setenv("TEXT2CT_BACKEND", "triton")
    assert choose_attention_backend(q)[0] == "triton"
    monkeypatch.setenv("TEXT2CT_ATTENTION", "sdpa")  # attention-only setting beats TEXT2CT_BACKEND
    assert choose_attention_backend(q)[0] == "torch"
    with ops.backend("triton"):  # ... and a scoped ops.backend() beats both
        assert choose_attention_backend(q)[0] == "triton"
    monkeypatch.setenv("TEXT2CT_ATTENTION", "flash9")
    with pytest.raises(ValueError, match="TEXT2CT_ATTENTION"):
        choose_attention_backend(q)
    monkeypatch.setenv("TEXT2CT_ATTENTION", "xformers")
    name, reason = choose_attention_backend(q)  # reports, never raises: info prints it
    assert name == "xformers" and "but" in reason
    with pytest.raises(ValueError, match="xformers"):  # not installed here, or CPU tensors anyway
        ops.attention(q, q, q)


def test_more_batch_heads_than_a_cuda_grid_axis_falls_back(monkeypatch):
    """The kernels give each (batch, head) one program on the grid's y axis, which CUDA caps at 65535."""
    monkeypatch.setattr(attn_mod, "_noticed", set())
    with FakeTensorMode():
        fits = torch.empty(8191, 8, 64, 32, device="cuda", dtype=torch.bfloat16)
        assert choose_attention_backend(fits)[0] == "triton"
        q = torch.empty(8192, 8, 64, 32, device="cuda", dtype=torch.bfloat16)
        name, reason = choose_attention_backend(q)
        assert name == "torch" and "65536" in reason and "65535" in reason
    with ops.backend("triton"), pytest.raises(ValueError, match="65535"):
        big = torch.randn(65536, 1, 1, 16)
        ops.attention(big, big, big)


def test_forced_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(attn_mod, "triton_usable", lambda device_type: (False, "needs TRITON_INTERPRET=1"))
    q = torch.randn(1, 1, 4, 32)
    with ops.backend("triton"), pytest.raises(ValueError, match="TRITON_INTERPRET"):
        ops.attention(q, q, q)


def test_causal_attention_matches_float64_reference_with_padding():
    """is_causal (the CLIP text tower): query i sees keys 0..i that the padding mask keeps; empty rows are 0."""
    torch.manual_seed(5)
    b, h, n, d = 2, 3, 9, 16
    q, k, v = (torch.randn(b, h, n, d) * 0.7 + 0.1 for _ in range(3))
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0, 6:] = False        # right padding
    mask[1, :2] = False        # left padding: queries 0 and 1 see no key at all
    out = ops.attention(q, k, v, mask, is_causal=True)
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None] & mask[:, None, :]
    scores = (q.double() @ k.double().transpose(-1, -2)) * d ** -0.5
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    ref = torch.nan_to_num(scores.softmax(-1), nan=0.0) @ v.double()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[1, :, :2], torch.zeros(h, 2, d))
    no_mask = ops.attention(q, k, v, is_causal=True)
    full = torch.ones(n, n, dtype=torch.bool).tril()
    ref = (scores.new_tensor(0) + (q.double() @ k.double().transpose(-1, -2)) * d ** -0.5).masked_fill(~full, float("-inf"))
    torch.testing.assert_close(no_mask.double(), ref.softmax(-1) @ v.double(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="is_causal needs as many queries as keys"):
        ops.attention(q[:, :, :4], k, v, is_causal=True)
