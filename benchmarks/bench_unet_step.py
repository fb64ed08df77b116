"""The main job's inner loop, end to end: one CFG sampling step and one training step of the Text2CT UNet.

    python benchmarks/bench_unet_step.py                       # CUDA: 4x128x128x32 latent, bf16
    python benchmarks/bench_unet_step.py --latent 4 16 16 8    # CPU: a small latent, fp32

What the kernel benchmarks cannot say: whether the engine's ops make the *network* faster. Each row times the
full-size Text2CT UNet (217.7 M parameters, random weights) with

* backend ``auto`` (the engine's default: Triton GroupNorm and attention on CUDA, C++/torch on CPU)
  against ``torch`` (``F.group_norm`` + ``F.silu``, SDPA), and
* ``contiguous`` (NCDHW) against ``channels_last`` (NDHWC: input and conv weights in channels_last_3d,
  the layout cuDNN's tensor-core convolutions prefer);

modes: ``sample`` = the UNet on [cond; uncond] (batch 2B) under no_grad, as ``Text2CTPipeline`` runs each
step; ``train`` = forward + backward of the rectified-flow L1 loss on batch B as ``train/ldm.py`` runs it
(fp32 master weights, bf16 autocast on CUDA), with and without gradient checkpointing. Median ms over
repetitions taken round-robin, peak CUDA memory above the weights, and the max |difference| of each
variant's output from the ``auto``/``contiguous`` one. JSON rows (rewritten after each row).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import JsonRecord, device_name, peak_memory_mb, print_table, time_fn  # noqa: E402

from text2ct_engine.models import DiffusionUNet  # noqa: E402
from text2ct_engine.ops import backend  # noqa: E402

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last_3d}


def build_unet(device: torch.device, dtype: torch.dtype, seed: int = 0) -> DiffusionUNet:
    """Text2CT's UNet with seeded random weights (its zero-initialised output conv given small values, so the
    outputs compare meaningfully)."""
    torch.manual_seed(seed)
    unet = DiffusionUNet()
    with torch.no_grad():
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return unet.to(device, dtype)


def unet_inputs(unet: DiffusionUNet, batch: int, latent, device, dtype, layout) -> tuple:
    g = torch.Generator().manual_seed(1)
    x = torch.randn((batch, *latent), generator=g).to(device, dtype).to(memory_format=LAYOUTS[layout])
    t = torch.full((batch,), 500.0, device=device, dtype=dtype)
    ctx = torch.randn((batch, 1, unet.config.cross_attention_dim), generator=g).to(device, dtype)
    extra = {}
    if unet.config.num_class_embeds is not None:
        extra["class_labels"] = torch.ones(batch, dtype=torch.long, device=device)
    if unet.config.include_spacing_input:
        extra["spacing_tensor"] = torch.full((batch, 3), 75.0, device=device, dtype=dtype)
    return x, t, ctx, extra


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--latent", type=int, nargs=4, default=None, metavar=("C", "X", "Y", "Z"),
                   help="default 4 128 128 32 on CUDA, 4 16 16 8 on CPU")
    p.add_argument("--batch", type=int, default=1, help="samples (the sampling step runs the UNet on 2x this)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="bf16 on CUDA, fp32 on CPU")
    p.add_argument("--modes", default="sample,train,train_ckpt")
    p.add_argument("--backends", default="auto,torch")
    p.add_argument("--layouts", default="contiguous,channels_last")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    latent = tuple(args.latent or ((4, 128, 128, 32) if gpu else (4, 16, 16, 8)))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if gpu else "fp32")]
    reps = args.reps or (10 if gpu else 3)
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - {"sample", "train", "train_ckpt"}
    if unknown:
        p.error(f"unknown mode(s) {sorted(unknown)}: sample, train, train_ckpt")
    variants = [(b, lay) for lay in args.layouts.split(",") for b in args.backends.split(",")]
    for _, lay in variants:
        if lay not in LAYOUTS:
            p.error(f"unknown layout {lay!r}: {', '.join(LAYOUTS)}")

    out = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", f"unet_step-{device.type}.json")
    record = JsonRecord(out, "unet_step", device, latent=list(latent), batch=args.batch, dtype=str(dtype)[6:],
                        command=" ".join(["python"] + sys.argv))
    for mode in modes:
        train = mode != "sample"
        unet = build_unet(device, torch.float32 if train else dtype)
        unet.train(train)
        unet.set_gradient_checkpointing(mode == "train_ckpt")
        batch = args.batch if train else 2 * args.batch
        autocast = train and dtype != torch.float32
        runs, outputs = {}, {}
        for name, lay in variants:
            unet.to(memory_format=LAYOUTS[lay])
            x, t, ctx, extra = unet_inputs(unet, batch, latent, device, torch.float32 if train else dtype, lay)

            def step(name=name, x=x, t=t, ctx=ctx, extra=extra):
                with backend(name), torch.autocast(device.type, dtype=dtype, enabled=autocast):
                    if not train:
                        with torch.no_grad():
                            return unet(x, t, context=ctx, **extra)
                    v = unet(x, t, context=ctx, **extra)
                    F.l1_loss(v.float(), torch.zeros_like(v, dtype=torch.float32)).backward()
                    unet.zero_grad(set_to_none=True)
                    return v.detach()
            try:
                outputs[(name, lay)] = step().float()
                runs[(name, lay)] = (step, [time_fn(step, device, 1, 1)])
            except (RuntimeError, ValueError) as err:  # e.g. out of memory, or a backend that cannot run here
                record.add(dict(mode=mode, backend=name, layout=lay, note=f"failed: {str(err).splitlines()[0][:80]}"))
        for _ in range(reps - 1):  # round-robin: a busy spell hits every variant alike
            for (name, lay), (fn, times) in runs.items():
                unet.to(memory_format=LAYOUTS[lay])  # the weights in this variant's layout (outside the timing)
                times.append(time_fn(fn, device, 0, 1))
        ref = outputs.get(variants[0])
        base = statistics.median(runs[variants[0]][1]) if variants[0] in runs else float("nan")
        for (name, lay), (fn, times) in runs.items():
            unet.to(memory_format=LAYOUTS[lay])
            ms = statistics.median(times)
            diff = (outputs[(name, lay)] - ref).abs().max().item() if ref is not None else None
            row = record.add(dict(mode=mode, backend=name, layout=lay, batch=batch, ms=ms, min_ms=min(times),
                                  reps=len(times), vs_first=base / ms, peak_mb=peak_memory_mb(fn, device),
                                  max_diff=diff))
            print(f"  {mode:10s} {name:6s} {lay:13s} {ms:10.1f} ms  x{row['vs_first']:.2f} vs "
                  f"{variants[0][0]}/{variants[0][1]}  max|diff| {diff:.2e}", flush=True)
        del unet, runs, outputs
        if gpu:
            torch.cuda.empty_cache()
    print(f"\nText2CT UNet, latent {'x'.join(map(str, latent))}, batch {args.batch}, {str(dtype)[6:]}, "
          f"{device_name(device)}")
    print_table(record.rows, ["mode", "backend", "layout", "batch", "ms", "min_ms", "vs_first", "peak_mb",
                              "max_diff", "note"])
    record.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
