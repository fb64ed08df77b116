"""Attention benchmark at the Text2CT UNet's real shapes: fused Triton vs every SDPA backend, xformers, naive.

The UNet (num_channels [64,128,256,512], head size 32) attends at levels 3 and 4:
  latent 4x128x128x32 : level 3 = 256 ch, 8 heads, 32x32x8 = 8192 tokens; level 4 = 512 ch, 16 heads, 1024
  latent 4x128x128x128: level 3 = 32768 tokens;                            level 4 = 4096 tokens
Self-attention (Nk = Nq) and cross-attention to the text context (1 pooled token, or 512 per-token).
``triton`` computes dQ in its own kernel (deterministic), ``triton-atomic`` inside the dK/dV kernel with fp32
atomic adds (``kernels.attention.DQ_MODE``): both are timed, to choose the default from measurements.
Forward and forward+backward; median time, TFLOP/s (4 B H Nq Nk D forward, x3.5 with backward), peak
CUDA memory above the inputs, max |error| of the forward against SDPA's math backend in fp32.

    python benchmarks/bench_attention.py                      # CUDA: full shapes, bf16
    python benchmarks/bench_attention.py --cpu                # CPU: tokens / 16, fp32, a couple of minutes

On CPU the Triton kernels only run under the interpreter (~0.1 GFLOP/s), so they are timed once and only
on the smallest shapes (--interp-max-rows); that checks the plumbing and accuracy, not the speed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import JsonRecord, peak_memory_mb, print_table, setting, time_fn  # noqa: E402

from text2ct_engine.kernels import attention as attention_kernels  # noqa: E402

HEAD_DIM = 32
# (level, heads, tokens at 128x128x32, tokens at 128x128x128)
LEVELS = [("L3", 8, 8192, 32768), ("L4", 16, 1024, 4096)]
CONTEXTS = (1, 512)


def shapes(quick: bool, batch: int) -> list[dict]:
    """The benchmark cases; ``quick`` divides latent tokens by 16 and the long context by 8."""
    out = []
    for latent, idx in (("128x128x32", 2), ("128x128x128", 3)):
        for level in LEVELS:
            name, heads, n = level[0], level[1], level[idx]
            n = n // 16 if quick else n
            out.append(dict(case=f"{latent} {name} self", B=batch, H=heads, Nq=n, Nk=n))
            for ctx in CONTEXTS:
                c = max(1, ctx // 8) if quick and ctx > 1 else ctx
                out.append(dict(case=f"{latent} {name} cross{ctx}", B=batch, H=heads, Nq=n, Nk=c))
    return out


def flops(s: dict, backward: bool) -> float:
    f = 4.0 * s["B"] * s["H"] * s["Nq"] * s["Nk"] * HEAD_DIM
    return f * 3.5 if backward else f


def naive(q, k, v):
    """softmax(q k^T / sqrt(D)) v with the full score matrix in memory (fp32 softmax)."""
    s = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    return (s.softmax(-1).to(v.dtype)) @ v


def backends(device: torch.device) -> dict:
    """name -> (callable(q, k, v), materialises the N x N scores?)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from text2ct_engine.ops.attention import attention_triton, attention_xformers
    from text2ct_engine.ops.backend import xformers_available

    def sdpa(which):
        def run(q, k, v):
            with sdpa_kernel([which]):
                return F.scaled_dot_product_attention(q, k, v)
        return run

    table = {"triton": (attention_triton, False),
             "triton-atomic": (attention_triton, False),  # its backward runs under dq_mode("atomic")
             "sdpa-math": (sdpa(SDPBackend.MATH), True),
             "sdpa-flash": (sdpa(SDPBackend.FLASH_ATTENTION), False)}
    if device.type == "cuda":
        table["sdpa-efficient"] = (sdpa(SDPBackend.EFFICIENT_ATTENTION), False)
        table["sdpa-cudnn"] = (sdpa(SDPBackend.CUDNN_ATTENTION), False)
        if xformers_available():
            table["xformers"] = (attention_xformers, False)
    table["naive"] = (naive, True)
    return table


def dq_mode(backend: str):
    """The Triton backward's dQ mode for the rows of ``backend``: atomic adds for ``triton-atomic``."""
    return setting(attention_kernels, "DQ_MODE", "atomic" if backend == "triton-atomic" else None)


def score_gib(s: dict, elem: int) -> float:
    """Memory a materialising backend needs for forward+backward scores (~3 N x N buffers), GiB."""
    return 3 * s["B"] * s["H"] * s["Nq"] * s["Nk"] * max(elem, 4) / 2**30


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cpu", "--quick", dest="quick", action="store_true",
                    help="shrunken token counts (latent tokens / 16, context 512 -> 64)")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                    help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--backends", default="", help="comma-separated subset (default: all available)")
    ap.add_argument("--cases", default="", help="comma-separated case names to keep, e.g. '128x128x32 L3 self' "
                                                "(a case is kept if its name contains one of them)")
    ap.add_argument("--no-backward", action="store_true", help="forward only")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--max-score-gib", type=float, default=40.0,
                    help="skip materialising backends whose N x N buffers would need more")
    ap.add_argument("--interp-max-rows", type=int, default=1024,
                    help="CPU: time the Triton interpreter (once, no warm-up) only up to B*H*Nq query rows")
    ap.add_argument("--json", default=None, help="output path (default benchmarks/out/attention-<device>.json)")
    args = ap.parse_args(argv)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = torch.device(args.device)
    on_cpu = device.type != "cuda"
    if on_cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("fp32" if on_cpu else "bf16")]
    warmup = args.warmup if args.warmup is not None else (2 if on_cpu else 5)
    reps = args.reps if args.reps is not None else (5 if on_cpu else 20)
    table = backends(device)
    if args.backends:
        wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
        table = {k: table[k] for k in wanted if k in table}

    cases = shapes(args.quick, args.batch)
    if args.cases:
        wanted_cases = [c.strip() for c in args.cases.split(",") if c.strip()]
        cases = [s for s in cases if any(w in s["case"] for w in wanted_cases)]
        if not cases:
            ap.error(f"no case matches --cases {args.cases!r}")
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                                     f"attention-{device.type}.json")
    record = JsonRecord(path, "attention", device, command=" ".join(["python"] + sys.argv), quick=args.quick,
                        warmup=warmup, reps=reps)
    rows = record.rows
    t_start = time.perf_counter()
    for s in cases:
        gen = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(s["B"], s["H"], s["Nq"], HEAD_DIM, generator=gen).to(device, dtype)
        k = torch.randn(s["B"], s["H"], s["Nk"], HEAD_DIM, generator=gen).to(device, dtype)
        v = torch.randn(s["B"], s["H"], s["Nk"], HEAD_DIM, generator=gen).to(device, dtype)
        g = torch.randn_like(q)
        with torch.no_grad():
            with sdpa_kernel([SDPBackend.MATH]):
                ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float()) \
                    if score_gib(s, 4) <= args.max_score_gib else None
        for name, (fn, materialises) in table.items():
            modes = [False] if args.no_backward else [False, True]
            for backward in modes:
                row = dict(case=s["case"], B=s["B"], H=s["H"], Nq=s["Nq"], Nk=s["Nk"], D=HEAD_DIM,
                           dtype=str(dtype).replace("torch.", ""), backend=name,
                           mode="fwd+bwd" if backward else "fwd", ms=None, tflops=None, peak_mb=None,
                           max_err=None, note="")
                if materialises and score_gib(s, dtype.itemsize) > args.max_score_gib:
                    row["note"] = f"skipped: ~{score_gib(s, dtype.itemsize):.0f} GiB of scores"
                    record.add(row)
                    continue
                runs = (warmup, reps)
                if name.startswith("triton") and on_cpu:
                    if s["B"] * s["H"] * s["Nq"] > args.interp_max_rows:
                        row["note"] = "skipped: interpreter too slow at this size"
                        record.add(row)
                        continue
                    row["note"] = "Triton interpreter, 1 run"
                    runs = (0, 1)
                if backward:
                    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

                    def call(fn=fn, name=name, qg=qg, kg=kg, vg=vg):
                        with dq_mode(name):  # the backward runs inside autograd.grad
                            return torch.autograd.grad(fn(qg, kg, vg), (qg, kg, vg), g)
                else:
                    call = lambda: fn(q, k, v)  # noqa: E731
                try:
                    if not backward and ref is not None:
                        with torch.no_grad():
                            row["max_err"] = (call().float() - ref).abs().max().item()
                    row["ms"] = time_fn(call, device, warmup=runs[0], reps=runs[1])
                    row["tflops"] = flops(s, backward) / (row["ms"] * 1e-3) / 1e12
                    row["peak_mb"] = peak_memory_mb(call, device)
                except Exception as err:  # noqa: BLE001 - a backend refuses these inputs, runs out of memory or
                    # cannot compile (Triton's OutOfResources is no RuntimeError): note it in the row, go on
                    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                    row["note"] = ("OOM" if isinstance(err, torch.cuda.OutOfMemoryError)
                                   else f"unavailable: {msg[:60]}")
                    row["ms"] = row["tflops"] = row["peak_mb"] = None
                finally:
                    record.add(row)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
        del q, k, v, g, ref

    columns = ["case", "Nq", "Nk", "H", "backend", "mode", "ms", "tflops", "peak_mb", "max_err", "note"]
    print_table(rows, columns)

    # Triton against the best SDPA backend per (case, mode): the GPU goal is >= 1.0x for fwd+bwd at 8k-32k.
    summary = []
    for key in sorted({(r["case"], r["mode"]) for r in rows}):
        sdpa = [r for r in rows if (r["case"], r["mode"]) == key and r["backend"].startswith("sdpa") and r["ms"]]
        for impl in ("triton", "triton-atomic"):
            mine = [r for r in rows if (r["case"], r["mode"]) == key and r["backend"] == impl and r["ms"]]
            if mine and sdpa:
                best = min(sdpa, key=lambda r: r["ms"])
                summary.append(dict(case=key[0], mode=key[1], impl=impl, triton_ms=mine[0]["ms"],
                                    best_sdpa=best["backend"], best_sdpa_ms=best["ms"],
                                    speedup=best["ms"] / mine[0]["ms"]))
    if summary:
        print()
        print_table(summary, ["case", "mode", "impl", "triton_ms", "best_sdpa", "best_sdpa_ms", "speedup"])
    elapsed = time.perf_counter() - t_start
    print(f"\n{len(rows)} rows in {elapsed:.0f} s")
    record.finish(summary=summary, seconds=round(elapsed, 1))


if __name__ == "__main__":
    main()
