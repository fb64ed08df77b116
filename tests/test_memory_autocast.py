"""The planner's autocast emulation (memory/autocast.py): with torch's CPU op lists it takes, to the byte and at
the same op, what torch's real CPU autocast takes on the same training steps, with and without gradient
checkpointing; its CUDA table agrees with the ops this torch build registers for CUDA autocast."""
import contextlib
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from text2ct_engine import ops
from text2ct_engine.memory import (BLOCK, CPU_POLICIES, CUDA_POLICIES, AutocastEmulation, MemoryTracker, Setup,
                                   clip_training_step, training_step, vae_training_step)
from text2ct_engine.precision import AUTOCAST_STAND_INS, autocast_off, bf16_autocast

from test_memory import CLIP, UNET, VAE

STEPS = {"train": (training_step, Setup.networks), "train_vae": (vae_training_step, Setup.vae_training_networks),
         "train_clip": (clip_training_step, Setup.clip_networks)}


def tracked(step, s: Setup, networks, emulate: bool) -> MemoryTracker:
    """One bf16 step on real CPU tensors: under torch's CPU autocast, or under the emulation with CPU's lists."""
    nets = networks(s)
    tracker = MemoryTracker()
    tracker.name_modules(*nets)
    emulation = AutocastEmulation("cpu", CPU_POLICIES) if emulate else None
    with ops.backend("torch"), emulation or contextlib.nullcontext(), tracker:
        step(s, *nets)
    return tracker


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("name", list(STEPS))
def test_emulation_with_cpu_lists_equals_real_cpu_autocast(name, checkpointing):
    s = Setup(UNET, VAE, dtype=torch.bfloat16, device="cpu", host="cpu", volume=(32, 32, 32), clip_config=CLIP,
              context_length=9, patch=(24, 24, 24), clip_volume=(16, 16, 8), clip_batch=3)
    step, networks = STEPS[name]
    step = partial(step, checkpointing=checkpointing)
    real, emulated = (tracked(step, s, networks, emulate) for emulate in (False, True))
    # torch's real autocast keeps CLIP's logit_scale and its exp (two 0-dim tensors, found by this test; not
    # kept by a reference cycle or the cast cache) alive past the step: one 512-byte block at its peak
    slack = 2 * BLOCK if name == "train_clip" else 0
    assert real.peak["cpu"] > 0 and 0 <= real.peak["cpu"] - emulated.peak["cpu"] <= slack // 2
    r, e = real.peak_at["cpu"], emulated.peak_at["cpu"]
    assert (e.op, e.module, e.backward) == (r.op, r.module, r.backward)
    assert emulated.live == {"cpu": 0} and real.live["cpu"] <= slack
    assert not AUTOCAST_STAND_INS  # the emulation is registered only while it runs


def test_regions_cast_as_cuda_autocast_does():
    x = torch.randn(2, 8, 4, 4, 4, device="meta")
    w = torch.nn.Parameter(torch.randn(8, 8, 3, 3, 3, device="meta"))
    with AutocastEmulation("meta"):
        assert F.conv3d(x, w).dtype == torch.float32  # outside a region: nothing is cast
        with bf16_autocast(torch.device("meta"), True):
            y = F.conv3d(x, w, padding=1)
            assert y.dtype == torch.bfloat16
            assert F.group_norm(y, 4).dtype == F.interpolate(y, scale_factor=2.0).dtype == torch.float32
            assert y.sum().dtype == torch.softmax(y, 1).dtype == (y ** 2).dtype == torch.float32
            assert (F.silu(y).dtype, torch.cat([y, y]).dtype) == (torch.bfloat16, torch.bfloat16)
            assert F.conv3d(y, w).dtype == torch.bfloat16
            with autocast_off(torch.device("meta")):
                assert F.conv3d(x, w).dtype == torch.float32
            assert F.conv3d(x, w).dtype == torch.bfloat16  # the enclosing region again
    with AutocastEmulation("meta") as emulation:
        lin = torch.nn.Linear(8, 8, device="meta")
        with bf16_autocast(torch.device("meta"), True):
            a = F.linear(x[:, :, 0, 0, 0], lin.weight)
            (_, first), = emulation.cache.values()
            F.linear(x[:, :, 0, 0, 1], lin.weight)
            (_, again), = emulation.cache.values()  # the weight's one cast, shared by both calls
            assert a.dtype == torch.bfloat16 and again is first and first.grad_fn is not None
        assert emulation.cache == {}  # and dropped when the region ends
        with bf16_autocast(torch.device("meta"), True):
            F.linear(x[:, :, 0, 0, 0], lin.weight)
            (_, second), = emulation.cache.values()
        assert second is not first
        assert F.linear(x[:, :, 0, 0, 0], lin.weight).dtype == torch.float32
    assert not AUTOCAST_STAND_INS


def test_normalize_and_norm_take_an_fp32_output_without_an_fp32_copy_of_their_input():
    """CUDA autocast gives ``norm`` an fp32 output (fp32_append_dtype) and leaves ``F.normalize``'s input as is:
    the bf16 input is not copied to fp32; only the fp32 result and the per-row norms are new."""
    y = torch.randn(64, 512, device="meta", dtype=torch.bfloat16, requires_grad=True)
    with AutocastEmulation("meta"), bf16_autocast(torch.device("meta"), True):
        assert y.norm(dim=-1).dtype == torch.linalg.vector_norm(y, dim=-1).dtype == torch.float32
        with MemoryTracker(block=1) as tracker:
            out = F.normalize(y, dim=-1)
        assert out.dtype == torch.float32 and out.grad_fn is not None
        rows = 64 * 4  # the norms (and their clamp), fp32
        assert out.numel() * 4 + rows <= tracker.peak["meta"] <= out.numel() * 4 + 2 * rows  # no 128 KiB copy
    assert F.normalize(y, dim=-1).dtype == torch.bfloat16  # outside a region: untouched


def test_the_cuda_table_matches_this_torch_builds_cuda_autocast_ops():
    """Each function the emulation casts reaches an aten op with a CUDA autocast kernel, and the functions it
    leaves alone reach ops without one (cat promotes by itself; silu, gelu, add are not autocast ops)."""
    cast = {F.conv3d: "conv3d", F.linear: "linear", F.scaled_dot_product_attention: "scaled_dot_product_attention",
            torch.matmul: "matmul", torch.bmm: "bmm", torch.baddbmm: "baddbmm", F.group_norm: "group_norm",
            F.layer_norm: "layer_norm", F.interpolate: "upsample_nearest3d", F.l1_loss: "l1_loss",
            F.mse_loss: "mse_loss", torch.exp: "exp", torch.Tensor.pow: "pow.Tensor_Scalar", torch.rsqrt: "rsqrt",
            F.softmax: "softmax.int", torch.Tensor.sum: "sum", torch.logsumexp: "logsumexp",
            F.binary_cross_entropy_with_logits: "binary_cross_entropy_with_logits", torch.Tensor.norm: "norm.ScalarOpt_dim"}
    left = {"cat", "silu", "gelu", "add.Tensor", "mul.Tensor", "native_group_norm"}

    def cuda_autocast(op: str) -> bool:
        return "AutocastCUDA:" in torch._C._dispatch_dump(f"aten::{op}")
    for func, op in cast.items():
        assert func in CUDA_POLICIES and cuda_autocast(op), op
    lower = {F.conv3d, F.linear, F.scaled_dot_product_attention, torch.matmul, torch.bmm, torch.baddbmm}
    fp32_out = {F.softmax, torch.Tensor.sum, torch.Tensor.norm}
    assert all(CUDA_POLICIES[f] == ("lower" if f in lower else "fp32_out" if f in fp32_out else "fp32") for f in cast)
    assert not any(cuda_autocast(op) for op in left)
    assert CUDA_POLICIES[F.conv3d] == CPU_POLICIES[F.conv3d] == "lower"
    assert F.layer_norm not in CPU_POLICIES and "AutocastCPU:" not in torch._C._dispatch_dump("aten::layer_norm")
