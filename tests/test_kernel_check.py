"""The Triton kernels compile for real GPU targets (no GPU needed): text2ct_engine.kernel_check."""
import json
import os
import subprocess
import sys

import pytest

from text2ct_engine.kernel_check import ARCHS, occupancy, widest_global_load

triton = pytest.importorskip("triton")
HAS_PTXAS = os.path.isfile(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


def test_occupancy_counts_registers_shared_memory_and_threads():
    sm86, sm90 = ARCHS["sm86"], ARCHS["sm90"]
    # 255 registers x 32 threads rounds to 8192 per warp: 8 warps fill the register file, 8 of 48 warps
    assert occupancy(sm86, 255, 0, 8) == pytest.approx(8 / 48)
    # 32 registers, 4 warps: threads limit to 12 blocks = 48 warps on sm86, 16 blocks = 64 warps on sm90
    assert occupancy(sm86, 32, 0, 4) == pytest.approx(1.0)
    assert occupancy(sm90, 32, 0, 4) == pytest.approx(1.0)
    # shared memory: 48 KiB (+1 KiB reserved) per block leaves 2 blocks of 4 warps on sm86, 4 on sm90
    assert occupancy(sm86, 32, 48 * 1024, 4) == pytest.approx(8 / 48)
    assert occupancy(sm90, 32, 48 * 1024, 4) == pytest.approx(16 / 64)
    # more than the per-block limit cannot launch at all
    assert occupancy(sm86, 32, 120 * 1024, 4) == 0.0


def test_widest_global_load_reads_vector_and_element_width():
    ptx = """
        ld.global.b16 %rs1, [%rd1];
        ld.global.L1::evict_last.v2.b32 {%r1, %r2}, [%rd2];
        st.global.v4.b32 [%rd3], {%r1, %r2, %r3, %r4};
    """
    assert widest_global_load(ptx) == 64  # the 128-bit access is a store, not a load
    assert widest_global_load(ptx + "ld.global.nc.v4.b32 {%r5, %r6, %r7, %r8}, [%rd4];") == 128
    assert widest_global_load("mov.b32 %r1, 0;") == 0


_SCRIPT = """
import json, sys
from text2ct_engine import kernel_check as kc
kc.ARCHS["tiny"] = kc.Arch("tiny", 86, "made up: 4 KiB of shared memory", 4096, 4096, 1536, 16)
out = {}
for arch in ("sm86", "tiny"):
    out[arch] = kc.check([arch], quick=True, only=sys.argv[1], log=lambda s: None)
json.dump(out, sys.stdout)
"""


@pytest.mark.skipif(not HAS_PTXAS, reason="triton has no NVIDIA backend tools here")
@pytest.mark.parametrize("only", ["group_norm 1x64x512x512x128", "group_norm 2x256x32x32x8",
                                  "attention B2 H8 Nq8192 Nk77", "attention B2 H8 Nq8192 Nk512"])
def test_kernels_compile_for_sm86_without_spills(only):
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, only], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)

    real = out["sm86"]
    assert real["problems"] == []
    kernels = {r["kernel"] for r in real["reports"]}
    if only.startswith("group_norm"):
        # the VAE's 128 MiB groups take the split passes; the UNet's 64K-element groups one program each
        stages = {"stats", "finalize", "apply"} if "512x512" in only else {"group"}
        assert kernels == {f"_gn_{d}_{s}_kernel" for d in ("fwd", "bwd") for s in stages}
        # the streaming passes of a memory-bound op must move 128 bits per load on a contiguous bf16 volume
        for r in real["reports"]:
            if not r["kernel"].endswith("finalize_kernel"):
                assert r["widest_load_bits"] == 128, r
                assert r["occupancy"] >= 0.33, r  # 0.5-1.0 with triton 3.9: a guard against regressions
    elif only.endswith("Nk512"):  # the quick case with dq_mode="atomic": dQ inside dK/dV, no dQ kernel
        assert kernels == {"_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel"}
    else:
        assert kernels == {"_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel",
                           "_attn_bwd_dq_kernel"}
        tuned = [r for r in real["reports"] if r["autotuned"]]
        assert len({(r["kernel"], r["meta"]) for r in tuned}) >= 12  # every kept config compiled
    for r in real["reports"]:
        assert r["spill_bytes"] == 0 and 0 < r["registers"] <= 255 and r["fits"]

    # the same kernels against a card with 4 KiB of shared memory per block: the check must object
    tiny = out["tiny"]
    if only.startswith("group_norm"):
        assert tiny["problems"] == []  # the GroupNorm passes use (almost) no shared memory
    else:
        assert any("no config of _attn_fwd_kernel fits 4096 B" in p for p in tiny["problems"]), tiny["problems"]
