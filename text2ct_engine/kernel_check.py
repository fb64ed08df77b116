"""Compile every Triton kernel launch of the engine for a GPU architecture, on a machine without a GPU.

    python -m text2ct_engine.kernel_check --arch sm86 sm89 sm90 [--quick] [--json F]

The Triton interpreter proves the kernels' arithmetic on CPU, but not that they compile, nor what they
cost in registers, spills and shared memory on a real card. Triton's compiler and ptxas run without a
GPU, so this tool calls the engine's real host wrappers (``kernels.group_norm``, ``kernels.attention``)
at the full-size shapes of the Text2CT networks, on meta tensors (nothing is allocated), with Triton's
active driver replaced by a stand-in that reports the chosen target. A compile hook compiles each launch
to a cubin for that target and skips the launch itself; an autotuned kernel compiles every config its
pruning keeps. For each kernel it reports registers per thread, spilled bytes (local memory), shared
memory, the widest global load (a memory-bound kernel wants 128-bit loads) and the theoretical
occupancy, and the hot loop's SASS (disassembled with the nvdisasm that ships with triton): instructions
per warp and iteration, MUFU (exp2) instructions, and which unit bounds it on that architecture (tensor
cores, MUFU, or instruction issue; ``loop_limit``) with the share of the tensor cores' peak that leaves.
It checks:

* every launch compiles, with no register spills;
* every fixed-config launch fits the architecture's shared memory per block, and every autotuned launch
  has at least one config that fits (the autotuner skips the others on that card).

It checks compilation, not results: the results are checked under the interpreter (tests/) and, where a
GPU is lent, by the compiled tests.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .cli import Parser, run_guarded, path as cli_path
from .io_utils import write_json


@dataclasses.dataclass(frozen=True)
class Arch:
    """Per-SM limits of one CUDA architecture (CUDA C Programming Guide, compute capability table)."""
    name: str
    capability: int
    cards: str
    max_shared_per_block: int  # opt-in dynamic shared memory per block, bytes
    shared_per_sm: int
    max_threads_per_sm: int
    max_blocks_per_sm: int
    registers_per_sm: int = 65536
    # Throughputs per clock per SM for the loop model (``loop_limit``). Tensor: dense matmul FLOPs with
    # 16-bit inputs and fp32 accumulation, from the named card's peak / (SMs x boost clock): A100
    # 312 TFLOPS / (108 x 1.41 GHz), GeForce RTX 3090 71 / (82 x 1.70), RTX 4090 165 / (128 x 2.52) (GeForce
    # cards accumulate in fp32 at half their fp16 rate; A6000/L40-class cards have twice this), H100/H200 SXM
    # 989 / (132 x 1.83). MUFU (exp2, reciprocal: 16 per SM on 8.x/9.0) and 4 warp instructions issued per
    # clock (one per scheduler) from the CUDA C Programming Guide's throughput table.
    tensor_flops_per_clk: int = 0
    mufu_per_clk: int = 16
    issue_per_clk: int = 4


ARCHS = {a.name: a for a in (
    Arch("sm80", 80, "A100", 166912, 167936, 2048, 32, tensor_flops_per_clk=2048),
    Arch("sm86", 86, "RTX 30xx, A6000, A10", 101376, 102400, 1536, 16, tensor_flops_per_clk=512),
    Arch("sm89", 89, "RTX 40xx, L4, L40", 101376, 102400, 1536, 24, tensor_flops_per_clk=512),
    Arch("sm90", 90, "H100, H200", 232448, 233472, 2048, 32, tensor_flops_per_clk=4096),
)}


@dataclasses.dataclass(frozen=True)
class LoopMix:
    """One warp's SASS instructions in one iteration of a kernel's hot loop (its longest loop body)."""
    instructions: int
    mufu: int  # special-function instructions (MUFU.EX2 for the softmax's exp2, MUFU.RCP, ...)
    exp2: int  # of which MUFU.EX2
    tensor_flops: int  # matmul FLOPs of the whole program (CTA) per iteration, from the MMA shapes
    top: str  # the most frequent opcodes, "FMUL 48, FFMA 32, ..."


@dataclasses.dataclass
class KernelReport:
    """One compiled kernel specialisation."""
    case: str
    kernel: str
    meta: str  # constexpr block sizes, warps, stages
    autotuned: bool
    registers: int
    spill_bytes: int
    shared_bytes: int
    widest_load_bits: int
    occupancy: float  # resident warps / max warps per SM (0 when it cannot launch)
    fits: bool  # shared memory within the per-block limit
    loop: LoopMix | None = None  # the hot loop's instruction mix (None: no loop)
    limit: str = ""  # which unit bounds that loop on this arch: tensor, mufu or issue ("" without tensor ops)
    tensor_ceiling: float = 0.0  # tensor-core busy fraction that bound allows (1.0 = tensor-bound)


# ------------------------------------------------------------------------------- hot-loop analysis
_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_SASS_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_HGMMA = re.compile(r"^HGMMA\.64x(\d+)x(\d+)\b")
_HMMA = re.compile(r"^HMMA\.168(\d+)\b")


def hot_loop(sass: str) -> list[str]:
    """Opcodes of the longest loop body in a disassembly: from a label to the last branch back to it."""
    opcodes: list[str] = []
    labels: dict[str, int] = {}
    best: tuple[int, int] = (0, -1)
    for line in sass.splitlines():
        m = _SASS_LABEL.match(line)
        if m:
            labels[m.group(1)] = len(opcodes)
            continue
        m = _SASS_LINE.match(line)
        if not m:
            continue
        opcodes.append(m.group(1))
        if m.group(1).startswith("BRA"):
            target = re.search(r"\.L_x_\d+", m.group(2))
            start = labels.get(target.group(0)) if target else None
            if start is not None and len(opcodes) - start > best[1] - best[0]:
                best = (start, len(opcodes))
    return opcodes[best[0]:best[1]]


def loop_mix(opcodes: list[str], num_warps: int) -> LoopMix | None:
    """Count a loop body; tensor FLOPs from wgmma (one per warpgroup of 4 warps) and mma.sync (one per warp)."""
    if not opcodes:
        return None
    flops = 0
    for op in opcodes:
        if m := _HGMMA.match(op):
            flops += 2 * 64 * int(m.group(1)) * int(m.group(2)) * max(num_warps // 4, 1)
        elif m := _HMMA.match(op):
            flops += 2 * 16 * 8 * int(m.group(1)) * num_warps
    counts: dict[str, int] = {}
    for op in opcodes:
        counts[op.split(".")[0]] = counts.get(op.split(".")[0], 0) + 1
    top = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:8])
    return LoopMix(len(opcodes), counts.get("MUFU", 0), sum(op.startswith("MUFU.EX2") for op in opcodes), flops, top)


def loop_limit(arch: Arch, loop: LoopMix, num_warps: int) -> tuple[str, float]:
    """(bounding unit, tensor-busy ceiling) of one loop iteration on a fully loaded SM.

    Clocks per iteration if each unit ran alone at its peak: tensor FLOPs / tensor rate, 32 lanes x MUFU
    instructions / MUFU rate, warp instructions / issue rate. The slowest is the bound; tensor / bound is
    the most of the tensor cores the loop can keep busy. A model (no latency, memory or occupancy), to
    tell which unit to relieve, not a timing.
    """
    if not loop.tensor_flops or not arch.tensor_flops_per_clk:
        return "", 0.0
    clocks = {"tensor": loop.tensor_flops / arch.tensor_flops_per_clk,
              "mufu": num_warps * loop.mufu * 32 / arch.mufu_per_clk,
              "issue": num_warps * loop.instructions / arch.issue_per_clk}
    limit = max(clocks, key=clocks.__getitem__)
    return limit, clocks["tensor"] / clocks[limit]


def _disassemble(cubin: bytes) -> str:
    return _on_cubin("nvdisasm", ["-c"], cubin)


# ------------------------------------------------------------------------------------- compilation
class _TargetDriver:
    """Stands in for Triton's CUDA driver: reports a target, never launches; benchmarks just compile."""

    def __init__(self, target) -> None:
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def get_benchmarker(self) -> Callable:
        def compile_only(fn: Callable, quantiles=None, **_) -> list[float]:
            fn()
            return [1.0, 1.0, 1.0]
        return compile_only


def _tool(name: str) -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.isfile(path):
        raise ValueError(f"triton's {name} is missing ({path}): install a triton wheel with the NVIDIA backend")
    return path


def _on_cubin(tool: str, args: list[str], cubin: bytes) -> str:
    """stdout of one of triton's NVIDIA tools (cuobjdump, nvdisasm) run on a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool(tool), *args, f.name], capture_output=True, text=True, check=True).stdout


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, local-memory bytes per thread) of a cubin's one kernel, from cuobjdump."""
    out = _on_cubin("cuobjdump", ["--dump-resource-usage"], cubin)
    m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cannot read cuobjdump's resource usage:\n{out}")
    return int(m.group(1)), int(m.group(2))


_LOAD = re.compile(r"\bld\.global(?:\.[A-Za-z0-9_:]+?)*?(?:\.v(\d))?\.[busf](8|16|32|64)\b")


def widest_global_load(ptx: str) -> int:
    """Bits moved by the widest global load instruction in the PTX (vector width x element width)."""
    return max((int(v or 1) * int(w) for v, w in _LOAD.findall(ptx)), default=0)


def occupancy(arch: Arch, registers: int, shared: int, num_warps: int) -> float:
    """Theoretical occupancy: resident warps per SM over the SM's maximum (registers allocated per warp in
    units of 256, one extra KiB of shared memory reserved per block)."""
    regs_per_warp = -(-registers * 32 // 256) * 256
    by_regs = arch.registers_per_sm // max(regs_per_warp * num_warps, 1)
    by_shared = arch.shared_per_sm // (shared + 1024) if shared <= arch.max_shared_per_block else 0
    by_threads = arch.max_threads_per_sm // (32 * num_warps)
    blocks = min(by_regs, by_shared, by_threads, arch.max_blocks_per_sm)
    return blocks * num_warps / (arch.max_threads_per_sm // 32)


@contextmanager
def compile_for(arch: Arch, reports: list[KernelReport], case: str) -> Iterator[None]:
    """While active, every Triton launch compiles for ``arch`` and appends a report instead of running."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime import driver

    if knobs.runtime.interpret:
        raise ValueError("the Triton interpreter is on (TRITON_INTERPRET=1, set by you or, on a machine without "
                         "CUDA, by importing text2ct_engine.kernels first): run python -m text2ct_engine.kernel_check "
                         "in its own process with TRITON_INTERPRET unset or 0")
    target = GPUTarget("cuda", arch.capability, 32)
    compiled: dict = {}

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled) -> bool:
        jit = fn.jit_function
        opts = dict(num_warps=compile["num_warps"], num_stages=compile["num_stages"])
        if str(key) in compiled:
            return True
        src = ASTSource(jit, compile["signature"], compile["constants"], compile["configs"][0])
        kernel = triton.compile(src, target=target, options=opts)
        regs, spill = _resource_usage(kernel.asm["cubin"])
        shared = int(kernel.metadata.shared)
        consts = {jit.arg_names[k[0]]: v for k, v in compile["constants"].items()
                  if jit.arg_names[k[0]].isupper() and isinstance(v, int) and not isinstance(v, bool)}
        meta = " ".join(f"{k}={v}" for k, v in consts.items() if k.startswith(("BLOCK", "TILES", "HEAD_DIM")))
        meta += f" w{opts['num_warps']} s{opts['num_stages']}"
        loop = loop_mix(hot_loop(_disassemble(kernel.asm["cubin"])), opts["num_warps"])
        limit, ceiling = loop_limit(arch, loop, opts["num_warps"]) if loop else ("", 0.0)
        report = KernelReport(case, jit.__name__, meta.strip(), autotuned=_in_autotune[0], registers=regs,
                              spill_bytes=spill, shared_bytes=shared,
                              widest_load_bits=widest_global_load(kernel.asm["ptx"]),
                              occupancy=occupancy(arch, regs, shared, opts["num_warps"]),
                              fits=shared <= arch.max_shared_per_block, loop=loop, limit=limit,
                              tensor_ceiling=ceiling)
        compiled[str(key)] = report
        reports.append(report)
        return True  # compiled: skip the launch

    _in_autotune = [False]
    from triton.runtime import autotuner
    bench, tune = autotuner.Autotuner._bench, autotuner.Autotuner.run

    def fresh_tune(self, *args, **kwargs):  # forget choices made for another target: compile every config
        self.cache.clear()
        return tune(self, *args, **kwargs)

    def tracked_bench(self, *args, **kwargs):
        _in_autotune[0] = True
        try:
            return bench(self, *args, **kwargs)
        finally:
            _in_autotune[0] = False

    old_hook, old_driver = knobs.runtime.jit_cache_hook, driver._active
    driver.set_active(_TargetDriver(target))
    knobs.runtime.jit_cache_hook = hook
    autotuner.Autotuner._bench, autotuner.Autotuner.run = tracked_bench, fresh_tune
    try:
        yield
    finally:
        autotuner.Autotuner._bench, autotuner.Autotuner.run = bench, tune
        knobs.runtime.jit_cache_hook = old_hook
        driver._active = old_driver  # private, but the public reset would create a CUDA driver here


# ------------------------------------------------------------------------------------------ cases
def _meta(*shape: int, dtype=None, channels_last: bool = False):
    import torch
    t = torch.empty(shape, device="meta", dtype=dtype or torch.bfloat16)
    if channels_last:
        t = t.to(memory_format=torch.channels_last_3d if t.dim() == 5 else torch.channels_last)
    return t


def group_norm_cases(quick: bool) -> list[tuple[str, Callable[[], None]]]:
    """GroupNorm forward and backward at the MAISI VAE decoder (512x512x128 output) and UNet (2x4x128x128x32
    latent, batch 2 for classifier-free guidance) shapes, as the networks call it."""
    import torch

    from .kernels import group_norm as gn

    def case(shape, dtype, channels_last=False, act="silu", add=False, backward=True):
        def run():
            x = _meta(*shape, dtype=dtype, channels_last=channels_last)
            w = _meta(shape[1], dtype=torch.float32)
            a = _meta(shape[0], shape[1], dtype=torch.float32) if add else None
            y, mean, rstd = gn.group_norm_fwd(x, 32, w, w, add=a, act=act)
            if backward:
                gn.group_norm_bwd(torch.empty_like(y), x, w, w, a, mean, rstd, 32, act=act)
        layout = "cl" if channels_last else "cont"
        name = f"group_norm {'x'.join(map(str, shape))} {str(dtype)[6:]} {layout}{' +add' if add else ''}"
        return name, run

    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    vae = [(1, 64, 512, 512, 128), (1, 128, 256, 256, 64), (1, 256, 128, 128, 32),
           (1, 128, 512, 512, 128)]  # the last: 2^32 elements, the first ResBlock of the last level
    unet = [(2, 64, 128, 128, 32), (2, 128, 64, 64, 16), (2, 256, 32, 32, 8), (2, 512, 16, 16, 4)]
    if quick:
        return [case(vae[0], bf16), case(unet[2], fp32, add=True), case(vae[1], fp16, channels_last=True)]
    cases = [case(s, bf16) for s in vae] + [case(s, bf16, add=True) for s in unet]
    cases += [case(s, bf16, channels_last=True) for s in (vae[0], vae[1], vae[3])]
    cases += [case(vae[0], fp16), case(vae[0], fp32), case(unet[0], fp32, add=True)]
    cases += [case((1, 64, 512, 512), bf16, act=None, backward=False)]  # 4-D, no activation
    return cases


def attention_cases(quick: bool) -> list[tuple[str, Callable[[], None]]]:
    """Attention forward and backward at the UNet's shapes: self-attention over the latent tokens of its
    two deepest levels (head size 32) and cross-attention to 1 or 512 text tokens, with padding masks."""
    import torch

    from .kernels import attention as at

    def case(b, h, nq, nk, d, dtype, mask=False, backward=True, dq_mode="separate"):
        def run():
            q = _meta(b, h, nq, d, dtype=dtype)
            k = _meta(b, h, nk, d, dtype=dtype)
            m = torch.empty((b, nk), device="meta", dtype=torch.bool) if mask else None
            o, lse = at.attention_forward(q, k, k, m)
            if backward:
                at.attention_backward(torch.empty_like(o), q, k, k, o, lse, m, dq_mode=dq_mode)
        name = f"attention B{b} H{h} Nq{nq} Nk{nk} D{d} {str(dtype)[6:]}{' mask' if mask else ''}"
        return name + (f" dq={dq_mode}" if dq_mode != "separate" else ""), run

    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    if quick:
        return [case(2, 8, 8192, 8192, 32, bf16), case(2, 8, 8192, 77, 32, fp16, mask=True),
                case(2, 8, 8192, 512, 32, bf16, mask=True, dq_mode="atomic")]
    cases = [case(2, 8, 8192, 8192, 32, bf16), case(2, 16, 2048, 2048, 32, bf16),
             case(2, 8, 32768, 32768, 32, bf16), case(2, 8, 8192, 1, 32, bf16),
             case(2, 8, 8192, 512, 32, bf16, mask=True), case(2, 8, 8192, 8192, 32, fp16),
             case(2, 8, 8192, 8192, 32, fp32)]
    cases += [case(2, 4, 4096, 4096, d, bf16) for d in (16, 64, 128)]
    cases += [case(2, 8, 8192, 8192, 32, bf16, dq_mode="atomic"), case(2, 8, 8192, 512, 32, bf16, mask=True,
                                                                        dq_mode="atomic")]
    return cases


def check(arch_names: list[str], quick: bool = False, only: str | None = None,
          log: Callable[[str], None] = print) -> dict:
    """Compile every case (or those whose name contains ``only``) for every architecture;
    return {"reports": [...], "problems": [...]}."""
    unknown = [a for a in arch_names if a not in ARCHS]
    if unknown:
        raise ValueError(f"unknown architecture {unknown}: choose from {sorted(ARCHS)}")
    cases = [(n, run) for n, run in group_norm_cases(quick) + attention_cases(quick) if only is None or only in n]
    if not cases:
        raise ValueError(f"no case name contains {only!r}")
    results, problems = [], []
    for name in arch_names:
        arch = ARCHS[name]
        for case_name, run in cases:
            reports: list[KernelReport] = []
            with compile_for(arch, reports, case_name):
                run()
            problems += _problems(arch, case_name, reports)
            for r in reports:
                results.append({"arch": name, **dataclasses.asdict(r)})
            log(f"{name:5s} {case_name}: {len(reports)} kernel(s)")
    return {"reports": results, "problems": problems}


# Attention kernels whose hot loop handles one BLOCK_M x BLOCK_N tile of scores: their matmuls per tile
# (QK^T and PV; S, dV, dP, dK, and dQ with the atomic dQ; S, dP, dQ), each 2 x BLOCK_M x BLOCK_N x HEAD_DIM FLOPs.
SCORE_TILE_MATMULS = {"_attn_fwd_kernel": 2, "_attn_bwd_dkdv_kernel": 4, "_attn_bwd_dq_kernel": 3}


def repeated_work(r: KernelReport) -> float:
    """Tensor FLOPs of an attention kernel's loop over what its tile needs: 1.0 when every warp has its own
    rows, 2 or more when warps repeat each other's matmuls (and softmax); 0 when it does not apply."""
    if r.kernel not in SCORE_TILE_MATMULS or r.loop is None:
        return 0.0
    meta = dict(kv.split("=") for kv in r.meta.split() if "=" in kv)
    matmuls = SCORE_TILE_MATMULS[r.kernel] + (r.kernel == "_attn_bwd_dkdv_kernel" and "dq=atomic" in r.case)
    needed = matmuls * 2 * int(meta["BLOCK_M"]) * int(meta["BLOCK_N"]) * int(meta["HEAD_DIM"])
    return r.loop.tensor_flops / needed


def _problems(arch: Arch, case: str, reports: list[KernelReport]) -> list[str]:
    out = [f"{arch.name} {case}: {r.kernel} [{r.meta}] spills {r.spill_bytes} B per thread"
           for r in reports if r.spill_bytes]
    out += [f"{arch.name} {case}: {r.kernel} [{r.meta}] does {repeated_work(r):.2f}x its tile's matmuls: its "
            f"warps repeat each other's work (give each warp >= 16 rows of the tile)"
            for r in reports if repeated_work(r) > 1.01]
    out += [f"{arch.name} {case}: {r.kernel} [{r.meta}] needs {r.shared_bytes} B shared > {arch.max_shared_per_block}"
            for r in reports if not r.autotuned and not r.fits]
    tuned = {}
    for r in reports:
        if r.autotuned:
            tuned.setdefault(r.kernel, []).append(r)
    out += [f"{arch.name} {case}: no config of {k} fits {arch.max_shared_per_block} B of shared memory"
            for k, rs in tuned.items() if not any(r.fits for r in rs)]
    if not reports:
        out.append(f"{arch.name} {case}: no kernel was compiled")
    return out


def format_table(results: list[dict]) -> str:
    head = f"{'arch':5s} {'kernel':24s} {'meta':44s} {'regs':>4s} {'spill':>5s} {'smem KiB':>8s} " \
           f"{'load b':>6s} {'occ':>5s} {'loop':>5s} {'mufu':>4s} {'limit':>6s} {'tc%':>4s}  case"
    rows = [head, "-" * len(head)]
    seen = set()
    for r in results:
        key = (r["arch"], r["kernel"], r["meta"], r["registers"], r["shared_bytes"])
        if key in seen:
            continue
        seen.add(key)
        flag = "" if r["fits"] else "  (too much shared memory for this arch)"
        loop = r["loop"] or {"instructions": 0, "mufu": 0}
        tc = f"{100 * r['tensor_ceiling']:4.0f}" if r["limit"] else "   -"
        rows.append(f"{r['arch']:5s} {r['kernel']:24s} {r['meta']:44s} {r['registers']:4d} {r['spill_bytes']:5d} "
                    f"{r['shared_bytes'] / 1024:8.1f} {r['widest_load_bits']:6d} {r['occupancy']:5.2f} "
                    f"{loop['instructions']:5d} {loop['mufu']:4d} {r['limit'] or '-':>6s} {tc}  {r['case']}{flag}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m text2ct_engine.kernel_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=["sm86", "sm90"], help=f"targets: {' '.join(ARCHS)}")
    p.add_argument("--quick", action="store_true", help="a few representative shapes only")
    p.add_argument("--only", help="only the cases whose name contains this text, e.g. 'attention'")
    p.add_argument("--json", type=cli_path, help="write the reports to this JSON file")
    args = p.parse_args(argv)
    # This check compiles, it never runs a kernel: unless the user chose, keep the interpreter off, which the
    # kernels package would otherwise switch on for a machine without CUDA when first imported.
    os.environ.setdefault("TRITON_INTERPRET", "0")

    problems: list[str] = []

    def run() -> None:
        out = check(args.arch, quick=args.quick, only=args.only, log=lambda s: print(s, file=sys.stderr))
        print(format_table(out["reports"]))
        for line in out["problems"]:
            print(f"problem: {line}")
        print(f"{len(out['reports'])} kernel compilations, {len(out['problems'])} problem(s)")
        if args.json:
            write_json(args.json, out)
        problems.extend(out["problems"])
    rc = run_guarded(run)
    return rc or (1 if problems else 0)


if __name__ == "__main__":
    sys.exit(main())
