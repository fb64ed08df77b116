"""Measured against planned peak memory of sampling, decoding and training: the planner's phases, run for real.

    python benchmarks/bench_memory.py                      # CUDA: Text2CT networks at 512x512x128, bf16
    python benchmarks/bench_memory.py --volume 64 64 32    # CPU: a small volume (fp32)

Planned: ``text2ct_engine.memory`` on fake tensors (no memory used). Measured: the same workload functions on
real tensors with zero weights. On CUDA the measurement is ``torch.cuda.max_memory_allocated`` above what was
allocated before the phase, which includes scratch buffers inside the Triton ops that the plan cannot see;
the planner's own tracker also runs on the real tensors. On CPU (torch keeps no CPU allocator statistics) the
tracker on real tensors is the measurement. Host RAM of the tiled decode is the tracker's count of CPU
storages. Prints a table and writes JSON (default ``benchmarks/out/memory-<device>.json``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import JsonRecord, device_name, peak_memory_mb, print_table  # noqa: E402

from text2ct_engine.memory import DTYPES, GIB, Phase, Setup, phases, run_phase, track  # noqa: E402


def measure(phase: Phase, setup: Setup, device: torch.device) -> dict:
    """Run one phase for real; the allocator's peak on CUDA, the tracker's on both."""
    networks = (phase.networks or Setup.networks)(setup)
    start = time.perf_counter()
    holder = {}

    def run():
        holder["tracker"] = track(phase.workload, setup, *networks, fake=False, backend="auto")
    allocator = peak_memory_mb(run, device) if device.type == "cuda" else run()
    tracker = holder["tracker"]
    dev = str(device) if device.type == "cpu" else setup.device
    return {"measured_gib": allocator / 1024 if allocator is not None else tracker.peak.get(dev, 0) / GIB,
            "tracked_gib": tracker.peak.get(dev, 0) / GIB,
            "host_gib": tracker.peak.get(setup.host, 0) / GIB if setup.host != dev else None,
            "seconds": round(time.perf_counter() - start, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--volume", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="default 512 512 128 on CUDA, 64 64 32 on CPU")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--slab", type=int, default=32)
    p.add_argument("--only", default=None, help="comma list of phase keys (python -m text2ct_engine.memory --json "
                                                 "lists them: sample, decode_tiled, ..., train_ckpt, train_vae, "
                                                 "train_clip_ckpt)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu and device.index is None:  # tensors report "cuda:0": the tracker's peaks are keyed that way
        device = torch.device("cuda", torch.cuda.current_device())
    volume = args.volume or ((512, 512, 128) if gpu else (64, 64, 32))
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    real_setup = Setup(volume=volume, dtype=dtype, slab=args.slab, device=str(device),
                       host="cpu" if gpu else str(device))
    # GPU: planned on the fake meta device + host; CPU: planned on the same (fake) CPU the run uses
    planned_setup = Setup(volume=volume, dtype=dtype, slab=args.slab) if gpu else real_setup
    wanted = set(args.only.split(",")) if args.only else None
    out = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                                    f"memory-{device.type}.json")
    record = JsonRecord(out, "memory", device, volume=list(volume), dtype=str(dtype), slab=args.slab)
    rows = record.rows
    for phase in phases(planned_setup):
        key = phase.key
        if wanted is not None and key not in wanted:
            continue
        plan = run_phase(key, key, phase.workload, planned_setup, networks=phase.networks)
        row = {"phase": key, "planned_gib": plan.device_gib,
               "planned_host_gib": plan.host_gib if gpu else None}
        try:
            row.update(measure(phase, real_setup, device))
            row["measured/planned"] = row["measured_gib"] / max(plan.device_gib, 1e-9)
        except torch.cuda.OutOfMemoryError as err:  # say so and go on with the next phase
            row["error"] = f"out of memory: {str(err).splitlines()[0][:80]}"
        if gpu:
            torch.cuda.empty_cache()
        record.add(row)
        print(f"{key}: {row}", file=sys.stderr)
    title = f"{'x'.join(map(str, volume))} {str(dtype)[6:]}, slab {args.slab}, {device_name(device)}"
    print(f"peak memory, planned vs measured: {title}")
    print_table(rows, ["phase", "planned_gib", "measured_gib", "tracked_gib", "measured/planned",
                       "planned_host_gib", "host_gib", "seconds", "error"])
    record.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
