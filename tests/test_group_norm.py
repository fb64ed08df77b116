"""GroupNorm(+add)(+SiLU): Triton kernels (under TRITON_INTERPRET=1), the C++ CPU kernel and the public op,
against a float64 torch reference. Inputs are fresh random tensors with an offset (never zeros); outputs
the kernels write are NaN-poisoned first; small forced tiles make every group split over many programs."""
from __future__ import annotations

import functools
import importlib
import os
import warnings

import pytest
import torch

from text2ct_engine.kernels.group_norm import GroupNormConfig, group_norm_bwd, group_norm_fwd
from text2ct_engine.ops import BACKENDS, backend, choose_group_norm_backend, cpp_ext, group_norm
from text2ct_engine.ops.group_norm import group_norm_torch

from kernel_device import DEVICE, ON_GPU

gn_ops = importlib.import_module("text2ct_engine.ops.group_norm")  # the module (ops.group_norm is the function)
gn_kernels = importlib.import_module("text2ct_engine.kernels.group_norm")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (rtol, atol): fp32 ~1e-5 relative; fp16/bf16 within their rounding (the Triton interpreter rounds
# bf16 stores toward zero: up to 1 ulp = 2^-7 relative, so bf16 gets 2 ulps)
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
# forced small tiles: 4 channels (straddling groups of 2) x 4 positions, 2 tiles per program (chunks of 8
# positions, so 30 positions make 4 chunks with a tail), 2 partials per finalize step (2 steps)
SPLIT = GroupNormConfig(block_c=4, block_s=4, tiles=2, block_p=2)
# forced one-program-per-group path with 4-position tiles: 30 positions make 8 tiles, the last of 2
ONE = GroupNormConfig(block_c=1, block_s=4, one_pass=True)
CONFIGS = {None: None, "split": SPLIT, "one": ONE}


@pytest.fixture
def no_one_pass(monkeypatch):
    """The default tiling without the one-launch path (as for groups above ONE_PASS_MAX)."""
    monkeypatch.setattr(gn_kernels, "ONE_PASS_MAX", 0)


def _cpp_built() -> bool:
    return cpp_ext.load() is not None


# on a GPU run (only the kernel tests) the C++ CPU kernel is never needed: do not spend time building it
needs_cpp = pytest.mark.skipif(ON_GPU or not _cpp_built(), reason=f"C++ kernel not built: {cpp_ext.load_error()}")


def make(shape, dtype=torch.float32, channels_last=False, scale=2.0, offset=3.0):
    """x = randn * scale + offset (never zeros), optionally channels_last(_3d); weight, bias, add; on DEVICE."""
    x = (torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)
    c = shape[1]
    w = (torch.randn(c) * 0.5 + 1.0).to(dtype)
    b = (torch.randn(c) * 0.5 + 0.2).to(dtype)
    a = (torch.randn(shape[0], c) * 0.7 - 0.3).to(dtype)
    return tuple(t.to(DEVICE) for t in (x, w, b, a))


def ref(x, g, w=None, b=None, add=None, eps=1e-6, act=None):
    """float64 reference of the same (already rounded) inputs."""
    d = (lambda t: None if t is None else t.double())
    return group_norm_torch(d(x), g, d(w), d(b), eps, act, d(add))


def close(actual, expected, dtype, what=""):
    rtol, atol = TOL[dtype]
    assert not torch.isnan(actual).any(), f"{what}: NaN left in the output"
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=what or None)


def close_sum(actual, expected, dtype, what=""):
    """For reductions (dweight, dbias, dadd): error relative to the largest entry."""
    rtol, _ = TOL[dtype]
    assert not torch.isnan(actual).any(), f"{what}: NaN"
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rtol * max(1.0, expected.abs().max().item()), f"{what}: max error {err}"


def poisoned(x):
    return torch.full_like(x, float("nan"))


@pytest.fixture
def two_threads():
    """The C++ kernels merge per-thread partial sums: run them on 2 threads (conftest sets 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------------
# Triton kernels, called directly (so the output buffers can be poisoned and the tiling forced)
# ------------------------------------------------------------------------------------------------------
def with_layouts(cases):
    """Each case contiguous and channels-last; channels-last exists for 4D and 5D tensors only."""
    return [pytest.param(*case, cl, id=f"{'x'.join(map(str, case[0]))}-{'cl' if cl else 'contig'}")
            for case in cases for cl in (False, True) if not (cl and len(case[0]) == 3)]


@pytest.mark.kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups,config,channels_last", with_layouts([
    ((2, 6, 3, 5, 7), 3, None),          # 5D, odd spatial, default tiles (one program per group)
    ((3, 8, 5, 9), 4, None),             # 4D
    ((2, 6, 2, 3, 5), 3, "split"),       # forced split: 30 positions in chunks of 8 -> 4 chunks, tail
    ((1, 6, 37), 2, "split"),            # 3D input, N = 1, 37 positions
    ((2, 6, 2, 3, 5), 3, "one"),         # one program per group, 8 tiles of 4 positions with a tail
    ((1, 12, 37), 2, "one"),             # 6 channels per group in a tile of 8 (masked lanes), 10 tiles
]))
def test_triton_forward(dtype, channels_last, shape, groups, config):
    x, w, b, a = make(shape, dtype, channels_last)
    cfg = CONFIGS[config]
    out = poisoned(x)
    y, mean, rstd = group_norm_fwd(x, groups, w, b, a, 1e-6, "silu", out=out, config=cfg)
    assert y.data_ptr() == out.data_ptr() and y.stride() == x.stride() and y.dtype == dtype
    close(y, ref(x, groups, w, b, a, act="silu"), dtype, "y")
    # the saved statistics are those of x + add, in fp32
    u = (x.double() + a.double().reshape(*a.shape, *[1] * (x.dim() - 2))).reshape(x.shape[0], groups, -1)
    torch.testing.assert_close(mean.double(), u.mean(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), (u.var(-1, unbiased=False) + 1e-6).rsqrt(), rtol=1e-4, atol=1e-5)


@pytest.mark.kernel
@pytest.mark.parametrize("act,affine,use_add", [(None, False, False), (None, True, False), ("silu", False, True)])
def test_triton_forward_options(act, affine, use_add):
    x, w, b, a = make((2, 8, 2, 3, 5))
    w, b = (w, b) if affine else (None, None)
    a = a if use_add else None
    for cfg in (SPLIT, ONE):
        y, _, _ = group_norm_fwd(x, 2, w, b, a, 1e-5, act, out=poisoned(x), config=cfg)
        close(y, ref(x, 2, w, b, a, 1e-5, act), torch.float32)


@pytest.mark.kernel
def test_triton_forward_large_mean_is_stable():
    # |mean| / std = 1000: a one-pass sum of squares in fp32 would lose the variance
    x, w, b, _ = make((2, 4, 2, 3, 5), scale=1.0, offset=1000.0)
    for cfg in (None, SPLIT, ONE):
        y, _, _ = group_norm_fwd(x, 2, w, b, None, 1e-6, None, out=poisoned(x), config=cfg)
        torch.testing.assert_close(y.double(), ref(x, 2, w, b), rtol=1e-3, atol=1e-3)


@pytest.mark.kernel
def test_triton_forward_odd_input_layouts():
    x, w, b, a = make((2, 4, 2, 3, 10))
    sliced = x[..., ::2]  # spatial dims do not collapse: copied to contiguous first
    y, _, _ = group_norm_fwd(sliced, 2, w, b, a, 1e-6, "silu")
    close(y, ref(sliced, 2, w, b, a, act="silu"), torch.float32)
    perm = x.permute(0, 1, 3, 2, 4)  # a non-standard dense layout
    y, _, _ = group_norm_fwd(perm, 2, w, b, a, 1e-6, "silu", config=SPLIT)
    close(y, ref(perm, 2, w, b, a, act="silu"), torch.float32)
    tiny = make((3, 8, 1, 1, 1))[0]  # one element per channel, two per group
    y, _, _ = group_norm_fwd(tiny, 4)
    close(y, ref(tiny, 4), torch.float32)


def _float64_grads(x, w, b, a, groups, act, dy):
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b, a)]
    y = ref(*leaves[:1], groups, *leaves[1:3], leaves[3], act=act)
    y.backward(dy.double())
    return [t.grad for t in leaves]


@pytest.mark.kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contig", "cl"])
@pytest.mark.parametrize("config", [None, "split", "one"], ids=["default", "split", "one"])
def test_triton_backward(dtype, channels_last, config):
    shape, groups = ((2, 8, 3, 5, 7), 4) if config is None else ((2, 6, 2, 3, 5), 3)
    x, w, b, a = make(shape, dtype, channels_last)
    cfg = CONFIGS[config]
    _, mean, rstd = group_norm_fwd(x, groups, w, b, a, 1e-6, "silu", config=cfg)
    dy = (torch.randn(shape) + 0.3).to(dtype).to(DEVICE)  # contiguous even when x is channels_last
    out = poisoned(x)
    dx, dw, db, da = group_norm_bwd(dy, x, w, b, a, mean, rstd, groups, "silu", dx_out=out, config=cfg)
    assert dx.data_ptr() == out.data_ptr()
    gx, gw, gb, ga = _float64_grads(x, w, b, a, groups, "silu", dy)
    close(dx, gx, dtype, "dx")
    close_sum(dw, gw, dtype, "dweight")
    close_sum(db, gb, dtype, "dbias")
    close_sum(da, ga, dtype, "dadd")


@pytest.mark.kernel
@pytest.mark.skipif(not ON_GPU, reason="GPU-sized groups: too slow for the interpreter")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contig", "cl"])
def test_triton_default_tiles_at_network_sizes(dtype, channels_last):
    """The GPU's own tiling (many programs per group, several tiles per program) on a VAE-like layer."""
    x, w, b, a = make((2, 64, 67, 61, 33), dtype, channels_last)
    y, mean, rstd = group_norm_fwd(x, 32, w, b, a, 1e-6, "silu", out=poisoned(x))
    close(y, ref(x, 32, w, b, a, act="silu"), dtype, "y")
    dy = (torch.randn(x.shape, device=DEVICE) + 0.3).to(dtype)
    dx, dw, db, da = group_norm_bwd(dy, x, w, b, a, mean, rstd, 32, "silu", dx_out=poisoned(x))
    for got, want, what in zip((dx, dw, db, da), _float64_grads(x, w, b, a, 32, "silu", dy), "xwba"):
        (close if what == "x" else close_sum)(got, want, dtype, f"d{what}")


@pytest.mark.kernel
@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("config", ["split", "one"])
def test_triton_backward_without_affine_or_add(act, config):
    x = make((2, 6, 2, 3, 5))[0]
    cfg = CONFIGS[config]
    _, mean, rstd = group_norm_fwd(x, 3, None, None, None, 1e-6, act, config=cfg)
    dy = torch.randn_like(x) * 2 + 0.5
    dx, _, _, da = group_norm_bwd(dy, x, None, None, None, mean, rstd, 3, act, dx_out=poisoned(x), config=cfg)
    assert da.numel() == 0
    xr = x.double().requires_grad_()
    ref(xr, 3, act=act).backward(dy.double())
    close(dx, xr.grad, torch.float32, "dx")


@pytest.mark.kernel
@pytest.mark.parametrize("channels_last", [False, True], ids=["contig", "cl"])
def test_triton_default_split_tiles(no_one_pass, channels_last):
    """The default split tiling (one program per chunk of a group), as groups above ONE_PASS_MAX get it."""
    x, w, b, a = make((2, 6, 3, 5, 7), torch.float32, channels_last)
    assert not gn_kernels.default_config(2, 6, 105, *gn_kernels._view3(x).stride()[1:], 3).one_pass
    y, mean, rstd = group_norm_fwd(x, 3, w, b, a, 1e-6, "silu", out=poisoned(x))
    close(y, ref(x, 3, w, b, a, act="silu"), torch.float32, "y")
    dy = torch.randn(x.shape, device=DEVICE) + 0.3
    dx, dw, db, da = group_norm_bwd(dy, x, w, b, a, mean, rstd, 3, "silu", dx_out=poisoned(x))
    for got, want, what in zip((dx, dw, db, da), _float64_grads(x, w, b, a, 3, "silu", dy), "xwba"):
        (close if what == "x" else close_sum)(got, want, torch.float32, f"d{what}")


@pytest.mark.kernel
def test_triton_one_pass_at_the_unet_deepest_level():
    """The default (one program per group) at the UNet's level-4 shape: 16 channels x 1024 per group."""
    x, w, b, a = make((2, 512, 16, 16, 4), torch.bfloat16)
    assert gn_kernels.default_config(2, 512, 1024, 1024, 1, 32).one_pass
    y, mean, rstd = group_norm_fwd(x, 32, w, b, a, 1e-6, "silu", out=poisoned(x))
    close(y, ref(x, 32, w, b, a, act="silu"), torch.bfloat16, "y")
    dy = (torch.randn(x.shape, device=DEVICE) + 0.3).to(torch.bfloat16)
    dx, dw, db, da = group_norm_bwd(dy, x, w, b, a, mean, rstd, 32, "silu", dx_out=poisoned(x))
    for got, want, what in zip((dx, dw, db, da), _float64_grads(x, w, b, a, 32, "silu", dy), "xwba"):
        (close if what == "x" else close_sum)(got, want, torch.bfloat16, f"d{what}")


def test_default_config_takes_one_pass_for_small_groups_only():
    one = gn_kernels.default_config(2, 512, 16 * 16 * 4, 1024, 1, 32)  # UNet level 4: 16 x 1024 per group
    assert one.one_pass and one.block_c == 16
    assert not gn_kernels.default_config(1, 64, 512 * 512 * 128, 512 * 512 * 128, 1, 32).one_pass  # VAE
    assert not gn_kernels.default_config(1, 4096, 1, 1, 1, 2).one_pass  # 2048 channels: no tile holds them
    assert not gn_kernels.default_config(2, 512, 1024, 1024, 1).one_pass  # no group count: split tiles


# ------------------------------------------------------------------------------------------------------
# the public op on every CPU backend: forward, autograd, dtypes of gradients
# ------------------------------------------------------------------------------------------------------
@pytest.mark.kernel
@pytest.mark.parametrize("name", ["triton", "cpp", "torch", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["contig", "cl"])
def test_op_autograd(name, dtype, channels_last):
    if name == "cpp" and (ON_GPU or not _cpp_built()):
        pytest.skip("C++ kernel not built" if not ON_GPU else "the C++ kernel is for CPU tensors")
    x, w, b, a = make((2, 6, 3, 4, 5), dtype, channels_last)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, a)]
    with backend(name):
        y = group_norm(leaves[0], 3, leaves[1], leaves[2], act="silu", add=leaves[3])
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()
    close(y, ref(x, 3, w, b, a, act="silu"), dtype, "y")
    dy = (torch.randn(x.shape) + 0.2).to(dtype).to(DEVICE)
    y.backward(dy)
    for got, want, t in zip((t.grad for t in leaves), _float64_grads(x, w, b, a, 3, "silu", dy), leaves):
        assert got.dtype == t.dtype and got.shape == t.shape
        close_sum(got, want, dtype, f"{name} grad")


def test_op_fp16_and_fp64_dispatch(monkeypatch):
    x, w, b, a = make((2, 4, 3, 3, 5), torch.float16)
    with backend("triton"):
        assert choose_group_norm_backend(x)[0] == "triton"
        close(group_norm(x, 2, w, b, act="silu", add=a), ref(x, 2, w, b, a, act="silu"), torch.float16)
        x64 = x.double()
        assert choose_group_norm_backend(x64)[0] == "torch"  # the kernels take fp32/fp16/bf16
        torch.testing.assert_close(group_norm(x64, 2), ref(x64, 2))
    with backend("cpp"):
        assert choose_group_norm_backend(x)[0] == "torch"  # the C++ kernel takes fp32/bf16
    with backend("auto"):
        assert choose_group_norm_backend(x.float())[0] == "torch"  # small: below CPP_MIN_NUMEL
        monkeypatch.setattr(gn_ops, "CPP_MIN_NUMEL", 0)
        name, reason = choose_group_norm_backend(x.float())
        assert name == ("cpp" if _cpp_built() else "torch") and reason
        assert choose_group_norm_backend(x)[0] == "torch"  # fp16


# ------------------------------------------------------------------------------------------------------
# C++ kernel
# ------------------------------------------------------------------------------------------------------
@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,groups,channels_last",
                         with_layouts([((2, 6, 3, 5, 7), 3), ((2, 64, 20, 31), 32), ((1, 8, 40000), 2)]))
def test_cpp_forward(dtype, channels_last, shape, groups, two_threads):
    # 40000 positions: 3 chunks of 16K per row; 20 x 31 channels_last: 3 chunks of 256 rows over 2 threads
    x, w, b, a = make(shape, dtype, channels_last)
    with backend("cpp"):
        for act, add in ((None, None), ("silu", a)):
            y = group_norm(x, groups, w, b, act=act, add=add)
            assert y.stride() == x.stride()
            close(y, ref(x, groups, w, b, add, act=act), dtype, f"cpp {act}")


@needs_cpp
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # interpreter: sigmoid of masked lanes
def test_cpp_stats_and_odd_layouts():
    x, w, b, a = make((2, 4, 4, 6, 6), scale=1.0, offset=1000.0)
    _, mean, rstd = torch.ops.text2ct.group_norm_cpp(x, 2, w, b, a, 1e-6, "silu")
    _, mean_t, rstd_t = group_norm_fwd(x, 2, w, b, a, 1e-6, "silu")
    torch.testing.assert_close(mean, mean_t)
    torch.testing.assert_close(rstd, rstd_t, rtol=1e-4, atol=0)
    with backend("cpp"):
        for t in (x[..., ::2], x.permute(0, 1, 3, 2, 4), x[:, :, :1, :1, :1]):
            torch.testing.assert_close(group_norm(t, 2, w, b, act="silu").double(),
                                       ref(t, 2, w, b, act="silu"), rtol=1e-3, atol=1e-3)
        # weight 60: z reaches beyond +-100, where exp(-z) saturates to 0 / inf: no overflow, no NaN
        big, w60 = torch.randn(2, 4, 3, 3) + 0.5, torch.full((4,), 60.0)
        torch.testing.assert_close(group_norm(big, 1, w60, act="silu").double(), ref(big, 1, w60, act="silu"),
                                   rtol=1e-5, atol=1e-5)


@needs_cpp
@pytest.mark.parametrize("channels_last", [False, True], ids=["contig", "cl"])
@pytest.mark.parametrize("act,affine,use_add", [(None, False, False), ("silu", True, True)])
def test_cpp_backward(channels_last, act, affine, use_add, two_threads):
    # 9000 positions: 3 blocks of 4096 per row; channels_last with C = 16: 36 chunks of 256 rows
    x, w, b, a = make((2, 16, 9, 1000), channels_last=channels_last)
    w, b = (w, b) if affine else (None, None)
    a = a if use_add else None
    _, mean, rstd = torch.ops.text2ct.group_norm_cpp(x, 4, w, b, a, 1e-6, act or "none")
    dy = torch.randn(x.shape) * 1.5 + 0.2  # contiguous even when x is channels_last
    dx, dw, db, da = torch.ops.text2ct.group_norm_cpp_bwd(dy, x, w, b, a, mean, rstd, 4, act or "none")
    assert dx.stride() == x.stride()
    leaves = [None if t is None else t.double().requires_grad_() for t in (x, w, b, a)]
    ref(leaves[0], 4, leaves[1], leaves[2], leaves[3], act=act).backward(dy.double())
    close(dx, leaves[0].grad, torch.float32, "dx")
    for got, leaf in ((dw, leaves[1]), (db, leaves[2]), (da, leaves[3])):
        if leaf is not None:
            close_sum(got, leaf.grad, torch.float32)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contig", "cl"])
def test_closed_form_torch_backward(channels_last):
    """The fallback backward of the C++ op (used if the library vanished after the forward)."""
    from text2ct_engine.ops.group_norm import group_norm_backward_torch
    x, w, b, a = make((2, 6, 3, 4, 5), channels_last=channels_last)
    _, mean, rstd = group_norm_fwd(x, 3, w, b, a, 1e-6, "silu")
    dy = torch.randn(x.shape) + 0.1
    dx, dw, db, da = group_norm_backward_torch(dy, x, w, b, a, mean, rstd, 3, "silu")
    for got, want, what in zip((dx, dw, db, da), _float64_grads(x, w, b, a, 3, "silu", dy), "xwba"):
        close_sum(got, want, torch.float32, what)


def test_cpp_build_failure_warns_once_and_falls_back(monkeypatch):
    def broken():
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(cpp_ext, "_build", broken)
    monkeypatch.setattr(cpp_ext, "_load_cached", functools.lru_cache(maxsize=None)(cpp_ext._load_cached.__wrapped__))
    x, w, b, _ = make((2, 4, 3, 3, 3))
    monkeypatch.setattr(gn_ops, "CPP_MIN_NUMEL", 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with backend("auto"):
            name, reason = choose_group_norm_backend(x)
            y = group_norm(x, 2, w, b, act="silu")
            group_norm(x, 2, w, b, act="silu")
    assert name == "torch" and "no compiler here" in reason
    assert sum("C++ CPU kernels unavailable" in str(c.message) for c in caught) == 1
    close(y, ref(x, 2, w, b, act="silu"), torch.float32)


# ------------------------------------------------------------------------------------------------------
# fake tensors, torch.compile, invalid calls
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True], ids=["contig", "cl"])
def test_fake_cuda_tensors(channels_last):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(2, 64, 8, 16, 12, device="cuda", dtype=torch.bfloat16)
        if channels_last:
            x = x.to(memory_format=torch.channels_last_3d)
        w = torch.empty(64, device="cuda")
        a = torch.empty(2, 64, device="cuda", dtype=torch.bfloat16)
        assert choose_group_norm_backend(x)[0] == "triton"
        y = group_norm(x, 32, w, w, act="silu", add=a)
        assert (y.shape, y.dtype, y.stride(), y.device.type) == (x.shape, x.dtype, x.stride(), "cuda")
        y, mean, rstd = torch.ops.text2ct.group_norm_triton(x, 32, w, w, a, 1e-6, "silu")
        assert mean.shape == rstd.shape == (2, 32) and mean.dtype == torch.float32
        dx, dw, db, da = torch.ops.text2ct.group_norm_triton_bwd(y, x, w, w, a, mean, rstd, 32, "silu")
        assert (dx.shape, dx.dtype, dx.stride()) == (x.shape, x.dtype, x.stride())
        assert dw.shape == db.shape == (64,) and da.shape == (2, 64)
        y4 = group_norm(torch.empty(3, 64, 10, 10, device="cuda", dtype=torch.float16), 32)
        assert y4.shape == (3, 64, 10, 10) and y4.dtype == torch.float16


_FRESH_COMPILE = """
import sys, torch
from text2ct_engine import ops
from text2ct_engine.pipeline import Text2CTPipeline
from text2ct_engine.sample import DEFAULT_MODEL
assert "torch._dynamo" not in sys.modules, "importing the ops loaded dynamo"
pipe = Text2CTPipeline.from_pretrained(DEFAULT_MODEL)  # built on meta, weights assigned
assert not any(p.is_meta for p in pipe.unet.parameters())
x = torch.randn(2, 64, 9, 8, 7, requires_grad=True)
with ops.backend("cpp" if ops.cpp_ext.load() is not None else "auto"):
    ops.group_norm(x, 32, act="silu").sum().backward()  # a custom op's call and its backward
assert x.grad is not None
assert "torch._dynamo" not in sys.modules, "loading a model or calling an op loaded dynamo"
marked = torch.compiler.assume_constant_result(lambda: 0)
assert getattr(marked, "_dynamo_marked_constant", False), "torch marks constant results another way now"
x = torch.randn(2, 6, 3, 4, 5)
with ops.backend("torch"):
    y = torch.compile(lambda t: ops.group_norm(t, 3, act="silu") + 1.0, backend="eager", fullgraph=True)(x)
torch.testing.assert_close(y, ops.group_norm(x, 3, act="silu") + 1.0)
q = torch.randn(1, 2, 7, 16)
with ops.backend("torch"):
    o = torch.compile(lambda t: ops.attention(t, t, t) * 2.0, backend="eager", fullgraph=True)(q)
torch.testing.assert_close(o, ops.attention(q, q, q) * 2.0)
print("ok")
"""


def test_ops_start_without_dynamo_and_still_compile():
    """Neither the ops (their backend choice is marked a compile-time constant without dynamo), nor loading
    a model, nor calling a custom op imports dynamo (2.5 s of every command); the mark must still be the one
    torch.compile reads, and the ops still compile, in a fresh process."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TEXT2CT_BACKEND"}
    done = subprocess.run([sys.executable, "-c", _FRESH_COMPILE], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("name", ["triton", "cpp"])
def test_torch_compile_traces_the_op(name):
    if name == "cpp" and not _cpp_built():
        pytest.skip("C++ kernel not built")
    import torch._dynamo

    def block(x, w, b, a):
        return group_norm(x, 3, w, b, act="silu", add=a) * 2.0 + 1.0

    x, w, b, a = make((2, 6, 3, 4, 5))
    leaves = [t.clone().requires_grad_() for t in (x, w)]
    torch._dynamo.reset()  # the backend is fixed when a graph is traced
    try:
        with backend(name):
            compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
            y = compiled(leaves[0], leaves[1], b, a)
            y.sum().backward()
    finally:
        torch._dynamo.reset()
    close(y, ref(x, 3, w, b, a, act="silu") * 2 + 1, torch.float32)
    gx, gw, _, _ = _float64_grads(x, w, b, a, 3, "silu", torch.full(x.shape, 2.0))
    close_sum(leaves[0].grad, gx, torch.float32, "dx")
    close_sum(leaves[1].grad, gw, torch.float32, "dw")


@pytest.mark.parametrize("name", BACKENDS)
def test_invalid_calls_raise_value_error(name):
    x, w, b, a = make((2, 6, 3, 4, 5))
    bad = [
        dict(x=x, num_groups=4),                                # C not divisible by groups
        dict(x=x, num_groups=0),
        dict(x=x, num_groups=3, weight=torch.ones(5)),          # wrong weight shape
        dict(x=x, num_groups=3, bias=torch.ones(6, 1)),         # wrong bias shape
        dict(x=x, num_groups=3, act="gelu"),                    # unknown activation
        dict(x=x.to(torch.int32), num_groups=3),                # integer input
        dict(x=x, num_groups=3, add=torch.ones(2, 5)),          # wrong add shape
        dict(x=x[0, 0, 0, 0], num_groups=1),                    # no channel dim
        dict(x=x, num_groups=3, weight=torch.ones(6, device="meta")),  # weight on another device
    ]
    with backend(name):
        for kwargs in bad:
            with pytest.raises(ValueError):
                group_norm(**kwargs)


@pytest.mark.skipif(os.environ.get("TEXT2CT_SLOW_TESTS") != "1",
                    reason="inductor on CPU takes ~25 s: TEXT2CT_SLOW_TESTS=1")
def test_torch_compile_inductor():
    import torch._dynamo

    def block(x, w, b, a):
        return group_norm(x, 3, w, b, act="silu", add=a) * 2.0

    x, w, b, a = make((2, 6, 3, 4, 5))
    xr = x.clone().requires_grad_()
    torch._dynamo.reset()
    try:
        with backend("triton"):
            y = torch.compile(block, fullgraph=True)(xr, w, b, a)
            y.sum().backward()
    finally:
        torch._dynamo.reset()
    close(y, ref(x, 3, w, b, a, act="silu") * 2, torch.float32)
    close_sum(xr.grad, _float64_grads(x, w, b, a, 3, "silu", torch.full(x.shape, 2.0))[0], torch.float32)


def test_forced_triton_without_interpreter_is_a_value_error_and_info_still_reports(monkeypatch):
    from text2ct_engine import info
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(2, 8, 3, 3, 3)
    with backend("triton"):
        name, reason = choose_group_norm_backend(x)
        assert name == "triton" and "cannot run here" in reason
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            group_norm(x, 4)
        assert any("cannot run here" in row for row in info.op_backends())
