"""GroupNorm(+add)+SiLU micro-benchmark: ours vs torch eager ``silu(group_norm(x))`` and ``torch.compile`` of it.

Shapes (N, C, H, W, D), 32 groups, SiLU, eps 1e-6:
  MAISI VAE decoder at a 512x512x128 output (num_channels [64, 128, 256]; levels 128x128x32 -> 256x256x64
  -> 512x512x128):
    vae-L2   (1,  64, 512, 512, 128)   decoder's last level and norm_out
    vae-L2in (1, 128, 512, 512, 128)   first ResBlock of the last level (norm1 on the upsampled 128 ch)
    vae-L1   (1, 128, 256, 256,  64)
    vae-L0   (1, 256, 128, 128,  32)
  UNet at a 4x128x128x32 latent (num_channels [64, 128, 256, 512]), batch 2 (classifier-free guidance),
  with the time embedding added per channel before the norm (``add``, the ResBlock's norm2):
    unet-L0  (2,  64, 128, 128, 32)   unet-L1 (2, 128, 64, 64, 16)
    unet-L2  (2, 256,  32,  32,  8)   unet-L3 (2, 512, 16, 16,  4)

On CPU the spatial dims are divided by ``--scale`` (default 4) and vae-L2in is left out (``--quick`` keeps
one VAE and one UNet shape); the Triton interpreter is not timed (it is a correctness tool), the C++
kernel is. Two traffic counts, both in tensors of x's size:

* compulsory (``gbps``, ``copy_pct``): what any implementation must move once: forward reads x and writes
  y (2); forward+backward also reads x and dy and writes dx (5).
* floor (``floor_pct``): what an exact GroupNorm must move when a group does not fit on the chip. Its
  statistics need every element of the group before the first output, so x is read twice: forward 2
  reads + 1 write (3, DESIGN section 6), backward 2 reads of (x, dy) + 1 write of dx (5), 8 together.
  A group of the VAE's last level (2 channels x 512x512x128, 128 MiB in bf16) is 2.5x an H100/H200's
  50 MiB L2, so there the compulsory count cannot pass 2/3 (forward) or 5/8 (forward+backward) of the
  copy rate; ``floor_pct`` is how close an implementation comes to moving its floor at copy speed.

On GPU, where a group holds at most 2^18 elements (the UNet's levels 1-3), the Triton path that the default
does not take is timed too: ``triton-split`` (three launches, many programs per group) or ``triton-1pass``
(one program per group), to set ``kernels.group_norm.ONE_PASS_MAX`` from measurements.

``copy_pct``/``floor_pct`` are those rates over the best rate of a large (256 MiB on CPU, 2 GiB on GPU)
device-to-device ``copy_`` (read + write) into a preallocated buffer: small shapes that stay in cache can
exceed 100%. ``speedup`` is over torch eager of the same mode. Times are
medians (and minima) over repetitions taken round-robin across the implementations, so that a busy spell
of a shared machine hits all of them alike; on CPU the count grows for short runs (up to 40).

    python benchmarks/bench_group_norm.py                      # CPU: shrunken shapes, fp32 + bf16
    python benchmarks/bench_group_norm.py --dtypes bf16        # GPU: full shapes
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch
import torch._dynamo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import JsonRecord, device_name, peak_memory_mb, print_table, setting, time_fn  # noqa: E402

from text2ct_engine.kernels import group_norm as gn_kernels  # noqa: E402
from text2ct_engine.ops import backend, choose_group_norm_backend, group_norm  # noqa: E402
from text2ct_engine.ops.group_norm import group_norm_torch  # noqa: E402

GROUPS, EPS = 32, 1e-6
ONE_PASS_STUDY = 1 << 18  # groups up to this size are timed on both Triton paths (GPU)
COMPULSORY = {"fwd": 2, "fwd+bwd": 5}  # tensors of x's size moved (see the docstring)
FLOOR = {"fwd": 3, "fwd+bwd": 8}
SHAPES = [  # name, (N, C, H, W, D), has the time-embedding add
    ("vae-L2", (1, 64, 512, 512, 128), False),
    ("vae-L2in", (1, 128, 512, 512, 128), False),
    ("vae-L1", (1, 128, 256, 256, 64), False),
    ("vae-L0", (1, 256, 128, 128, 32), False),
    ("unet-L0", (2, 64, 128, 128, 32), True),
    ("unet-L1", (2, 128, 64, 64, 16), True),
    ("unet-L2", (2, 256, 32, 32, 8), True),
    ("unet-L3", (2, 512, 16, 16, 4), True),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def eager(x, w, b, a):
    return group_norm_torch(x, GROUPS, w, b, EPS, "silu", a)


def ours(name, one_pass_max=None):
    """The engine's op on backend ``name``; ``one_pass_max`` overrides the kernels' small-group threshold
    during the call (0: always the split passes; a huge value: always one program per group)."""
    def fn(x, w, b, a):
        with setting(gn_kernels, "ONE_PASS_MAX", one_pass_max), backend(name):
            return group_norm(x, GROUPS, w, b, EPS, "silu", a)
    return fn


def path_variants(shape) -> dict:
    """On GPU, where a group is small enough for either Triton path, the one the default does not take, so
    that both are timed and ONE_PASS_MAX can be set from the figures."""
    group = shape[1] // GROUPS * math.prod(shape[2:])
    if group > ONE_PASS_STUDY:
        return {}
    if group <= gn_kernels.ONE_PASS_MAX:
        return {"triton-split": ours("triton", 0)}
    return {"triton-1pass": ours("triton", 1 << 62)}


def copy_bandwidth(nbytes: int, dtype: torch.dtype, device: torch.device, warmup: int, reps: int) -> float:
    """GB/s of a device-to-device ``copy_`` of ``nbytes`` (bytes read + bytes written), from the fastest of
    ``reps`` runs: the attainable rate (a median on a shared CPU mostly measures the neighbours). Take
    ``nbytes`` well above the last-level cache, so that it is the memory's rate."""
    src = torch.randn(nbytes // torch.empty((), dtype=dtype).element_size(), device=device).to(dtype)
    dst = torch.empty_like(src)
    time_fn(lambda: dst.copy_(src), device, warmup, 1)
    ms = min(time_fn(lambda: dst.copy_(src), device, 0, 1) for _ in range(reps))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16 (CPU: fp32,bf16; GPU: bf16,fp16)")
    p.add_argument("--scale", type=int, default=None, help="divide spatial dims by this (CPU default 4, GPU 1)")
    p.add_argument("--quick", action="store_true", help="one VAE and one UNet shape")
    p.add_argument("--shapes", default=None, help="comma list of shape names")
    p.add_argument("--channels-last", action="store_true", help="channels_last_3d input")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile on CPU)")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/out/group_norm_<device>.json)")
    args = p.parse_args()

    device = torch.device(args.device)
    cpu = device.type == "cpu"
    scale = args.scale or (4 if cpu else 1)
    dtypes = [DTYPES[d] for d in (args.dtypes or ("fp32,bf16" if cpu else "bf16,fp16")).split(",")]
    warmup, reps = (1, args.reps or 5) if cpu else (3, args.reps or 10)
    shapes = SHAPES
    if cpu:
        shapes = [s for s in shapes if s[0] != "vae-L2in"]
    if args.quick:
        shapes = [s for s in shapes if s[0] in ("vae-L2", "unet-L0")]
    if args.shapes:
        shapes = [s for s in SHAPES if s[0] in args.shapes.split(",")]

    impls = {"torch": eager}
    if not args.no_compile:
        for knob in ("recompile_limit", "cache_size_limit"):  # one graph per grad mode, dtype (and shape on GPU)
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 256)
        # one graph per dtype/mode on CPU (dynamic shapes: inductor's C++ compile is slow there)
        impls["compile"] = torch.compile(eager, dynamic=True if cpu else False)
    mine = "cpp" if cpu else "triton"
    impls[mine] = ours(mine)

    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                                   f"group_norm_{device.type}.json")
    record = JsonRecord(out, "group_norm", device, command=" ".join(sys.argv), scale=scale,
                        channels_last=args.channels_last, groups=GROUPS)
    rows = record.rows
    copy_cache: dict = {}
    for name, shape, has_add in shapes:
        shape = (*shape[:2], *(max(1, s // scale) for s in shape[2:]))
        for dtype in dtypes:
            x = (torch.randn(shape, device=device, dtype=torch.float32) * 2 + 0.5).to(dtype)
            if args.channels_last:
                x = x.to(memory_format=torch.channels_last_3d)
            c = shape[1]
            w = (torch.randn(c, device=device) * 0.5 + 1).to(dtype)
            b = (torch.randn(c, device=device) * 0.5).to(dtype)
            a = torch.randn(shape[0], c, device=device).to(dtype) if has_add else None
            nbytes = x.numel() * x.element_size()
            if dtype not in copy_cache:  # one memory-bound reference per dtype: 256 MiB (CPU) / 2 GiB (GPU)
                copy_cache[dtype] = copy_bandwidth(2**28 if cpu else 2**31, dtype, device, warmup, max(reps, 15))
            copy_gbs = copy_cache[dtype]
            chosen = choose_group_norm_backend(x)
            modes = ["fwd"] if args.no_backward else ["fwd", "fwd+bwd"]
            shape_impls = dict(impls, **({} if cpu else path_variants(shape)))
            for mode in modes:
                runs = {}
                for impl, fn in shape_impls.items():
                    if mode == "fwd":
                        def run(fn=fn):
                            with torch.no_grad():
                                return fn(x, w, b, a)
                    else:
                        xs = [t.detach().requires_grad_() for t in (x, w, b) + ((a,) if a is not None else ())]
                        dy = torch.randn_like(x)

                        def run(fn=fn, xs=xs, dy=dy):
                            y = fn(xs[0], xs[1], xs[2], xs[3] if len(xs) > 3 else None)
                            return torch.autograd.grad(y, xs, dy)
                    try:
                        one = time_fn(run, device, warmup, 1)  # warm-up (and compile), then one timing
                        runs[impl] = (run, [one])
                    except Exception as e:  # noqa: BLE001 - report and go on (e.g. out of memory)
                        print(f"{name} {dtype} {mode} {impl}: failed: {type(e).__name__}: {e}"[:300])
                # round-robin repetitions: a slow spell of a shared machine hits every impl alike
                n = reps if args.reps or not cpu else max(reps, min(40, int(1000 / max(
                    1e-3, max(v[1][0] for v in runs.values())))))
                for _ in range(n - 1):
                    for impl, (run, times) in runs.items():
                        times.append(time_fn(run, device, 0, 1))
                base = statistics.median(runs["torch"][1]) if "torch" in runs else float("nan")
                for impl, (run, times) in runs.items():
                    ms = statistics.median(times)
                    gbs = COMPULSORY[mode] * nbytes / ms / 1e6
                    floor_gbs = FLOOR[mode] * nbytes / ms / 1e6
                    row = record.add(dict(
                        shape_name=name, shape="x".join(map(str, shape)), dtype=str(dtype)[6:], mode=mode,
                        impl=impl, ms=ms, min_ms=min(times), reps=len(times), gbps=gbs,
                        copy_pct=100 * gbs / copy_gbs, floor_pct=100 * floor_gbs / copy_gbs, speedup=base / ms,
                        peak_mb=peak_memory_mb(run, device), copy_gbps=copy_gbs, add=has_add,
                        backend_auto=chosen[0]))
                    print(f"  {name:9s} {row['dtype']:8s} {mode:7s} {impl:8s} {ms:9.2f} ms (min {min(times):.2f},"
                          f" {len(times)} reps) {gbs:7.2f} GB/s {row['copy_pct']:5.1f}% copy"
                          f" {row['floor_pct']:5.1f}% floor  x{row['speedup']:.2f}", flush=True)
            del x, w, b, a
    print()
    print(f"device: {device_name(device)}; copy_ GB/s (read + write): "
          + ", ".join(f"{str(k)[6:]}: {v:.1f}" for k, v in copy_cache.items()))
    print_table(rows, ["shape_name", "shape", "dtype", "mode", "impl", "ms", "min_ms", "gbps", "copy_pct",
                       "floor_pct", "speedup", "peak_mb"])
    record.finish(copy_gbps={str(k)[6:]: v for k, v in copy_cache.items()})


if __name__ == "__main__":
    main()
