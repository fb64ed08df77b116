"""The Triton kernels compile for real GPU targets (no GPU needed): text2ct_engine.kernel_check."""
import json
import os
import subprocess
import sys

import pytest

from text2ct_engine.kernel_check import (ARCHS, KernelReport, LoopMix, hot_loop, loop_limit, loop_mix, occupancy,
                                         repeated_work, widest_global_load)

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


_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   FADD R2, R2, 1 ;
        /*0020*/              @P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0030*/                   MUFU.EX2 R3, R2 ;
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R56, gdesc[UR12], RZ, !UPT ;
        /*0050*/                   HMMA.16816.F32.BF16 R40, R60.reuse, R52, RZ ;
        /*0060*/                   FFMA R4, R3, R2, -R5 ;
        /*0070*/             @!UP1 BRA `(.L_x_1) ;
        /*0080*/                   EXIT ;
.L_x_2:
        /*0090*/                   BRA `(.L_x_2);
"""


def test_hot_loop_is_the_longest_backward_branch_body():
    assert hot_loop(_SASS) == ["MUFU.EX2", "HGMMA.64x64x16.F32.BF16", "HMMA.16816.F32.BF16", "FFMA", "BRA"]
    assert hot_loop("        /*0000*/                   EXIT ;") == []  # no loop at all
    mix = loop_mix(hot_loop(_SASS), num_warps=8)
    # wgmma runs once per warpgroup (2 of them at 8 warps), mma.sync once per warp
    assert mix.tensor_flops == 2 * 64 * 64 * 16 * 2 + 2 * 16 * 8 * 16 * 8
    assert (mix.instructions, mix.mufu, mix.exp2) == (5, 1, 1)
    assert loop_mix([], 4) is None


def test_loop_limit_names_the_slowest_unit():
    sm90, sm89 = ARCHS["sm90"], ARCHS["sm89"]
    # the head-32 forward tile of 128x64 scores: 1 MiB of matmul FLOPs, one exp2 per score
    fwd = LoopMix(instructions=458, mufu=68, exp2=68, tensor_flops=4 * 128 * 64 * 32, top="")
    limit, ceiling = loop_limit(sm90, fwd, 4)  # 256 tensor clocks against 544 MUFU and 458 issue clocks
    assert limit == "mufu" and ceiling == pytest.approx(256 / 544)
    assert loop_limit(sm89, fwd, 4) == ("tensor", 1.0)  # a GeForce card has 1/8 of the tensor rate
    busy = LoopMix(instructions=2000, mufu=0, exp2=0, tensor_flops=4 * 128 * 64 * 32, top="")
    assert loop_limit(sm90, busy, 4) == ("issue", pytest.approx(256 / 2000))
    assert loop_limit(sm90, LoopMix(10, 0, 0, 0, ""), 4) == ("", 0.0)  # no matmul: no tensor bound


def test_repeated_work_finds_warps_that_duplicate_each_other():
    def report(kernel, meta, flops, case="attention"):
        return KernelReport(case, kernel, meta, True, 128, 0, 0, 128, 0.5, True, loop=LoopMix(300, 64, 64, flops, ""))
    tile = 2 * 128 * 64 * 32  # FLOPs of one matmul over a 128 x 64 tile of scores at head size 32
    # dK/dV with 64 keys over 8 warps: 8 rows per warp, below mma's 16, so every matmul is done twice
    assert repeated_work(report("_attn_bwd_dkdv_kernel", "HEAD_DIM=32 BLOCK_M=128 BLOCK_N=64 w8 s2", 8 * tile)) == 2.0
    assert repeated_work(report("_attn_bwd_dkdv_kernel", "HEAD_DIM=32 BLOCK_M=128 BLOCK_N=64 w4 s2", 4 * tile)) == 1.0
    assert repeated_work(report("_attn_bwd_dkdv_kernel", "HEAD_DIM=32 BLOCK_M=128 BLOCK_N=64 w4 s2", 5 * tile,
                                "attention dq=atomic")) == 1.0  # dS K for dQ is a fifth matmul
    assert repeated_work(report("_attn_fwd_kernel", "HEAD_DIM=32 BLOCK_M=128 BLOCK_N=64 w4 s3", 2 * tile)) == 1.0
    assert repeated_work(report("_gn_fwd_group_kernel", "BLOCK_C=8 w4 s1", 0)) == 0.0


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
    if only.startswith("attention"):
        _check_attention_loops(real["reports"], atomic=only.endswith("Nk512"))

    # the same kernels against a card with 4 KiB of shared memory per block: the check must object
    tiny = out["tiny"]
    if only.startswith("group_norm"):
        assert tiny["problems"] == []  # the GroupNorm passes use (almost) no shared memory
    else:
        assert any("no config of _attn_fwd_kernel fits 4096 B" in p for p in tiny["problems"]), tiny["problems"]


def _check_attention_loops(reports, atomic):
    """The SASS loop counts must match the kernels' arithmetic: per BLOCK_M x BLOCK_N tile of scores the
    forward does 2 matmuls, the dK/dV kernel 4 (5 with the atomic dQ), the dQ kernel 3, each of
    2 x tile x D FLOPs, and every kernel one exp2 per score (the forward also one per row for the rescale,
    computed by each of the threads holding that row)."""
    matmuls = {"_attn_fwd_kernel": 2, "_attn_bwd_dkdv_kernel": 5 if atomic else 4, "_attn_bwd_dq_kernel": 3}
    seen = set()
    for r in reports:
        if r["kernel"] not in matmuls:
            continue
        meta = dict(kv.split("=") for kv in r["meta"].split() if "=" in kv)
        bm, bn = int(meta["BLOCK_M"]), int(meta["BLOCK_N"])
        warps = int(r["meta"].split(" w")[1].split()[0])
        loop = r["loop"]
        assert loop["tensor_flops"] == matmuls[r["kernel"]] * 2 * bm * bn * 32, r
        exp2 = loop["exp2"] * 32 * warps  # at most the 4 threads of a row repeat its rescale: never a score
        assert bm * bn <= exp2 <= bm * bn + (4 * bm if r["kernel"] == "_attn_fwd_kernel" else 0), r
        assert r["limit"] == "tensor" and r["tensor_ceiling"] == 1.0, r  # sm86: far fewer tensor FLOPs/clock
        seen.add(r["kernel"])
    assert seen == set(matmuls) - ({"_attn_bwd_dq_kernel"} if atomic else set())


@pytest.mark.skipif(not HAS_PTXAS, reason="triton has no NVIDIA backend tools here")
def test_runs_without_the_user_switching_the_interpreter_off():
    """On a machine without CUDA the kernels package turns the interpreter on by default; the check, which
    only compiles, keeps it off unless the user set TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "text2ct_engine.kernel_check", "--arch", "sm86", "--only", "group_norm 2x256x32x32x8"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].endswith("kernel compilations, 0 problem(s)")
    proc = subprocess.run(cmd, env=dict(env, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "interpreter is on" in err[0], proc.stderr[-2000:]
