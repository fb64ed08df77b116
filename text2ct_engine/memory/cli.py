"""``python -m text2ct_engine.memory``: the plan of the phases asked for, as a table, summary lines and JSON."""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from dataclasses import asdict
from typing import Sequence

import torch

from ..cli import Parser, check_output_file, path as cli_path, run_guarded
from ..train.clip import CLIPTrainConfig
from ..train.vae import VAETrainConfig
from .planner import DTYPES, WHAT, PhasePlan, plan, summary, table
from .workloads import TEXT2CT_CONTEXT, Setup, patch_problem


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="python -m text2ct_engine.memory", description=sys.modules[__package__].__doc__.split("\n\n")[0])
    p.add_argument("--volume", type=int, nargs=3, default=[512, 512, 128], metavar=("X", "Y", "Z"),
                   help="output voxels (default 512 512 128)")
    p.add_argument("--dtype", default="bf16", help="bf16 (default), fp16 or fp32")
    p.add_argument("--batch", type=int, default=1, help="volumes per sampling call / training batch (default 1)")
    p.add_argument("--slab", type=int, default=32,
                   help="rows per slab of the exact tiled decode and encode (default 32)")
    p.add_argument("--what", default="all", help="sample, cache (the latent cache's encode), train (the UNet), "
                   "train-vae, train-clip or all (default)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="the UNet's training keeps an fp32 EMA copy of it, as train ldm does by default "
                        "(--no-ema: as with --ema-decay 0)")
    p.add_argument("--ema-offload", action="store_true", help="the EMA copy in host RAM (train ldm --ema-offload)")
    p.add_argument("--patch", type=int, nargs=3, default=list(VAETrainConfig.patch_size), metavar=("X", "Y", "Z"),
                   help="train vae: patch voxels (default %(default)s)")
    p.add_argument("--clip-volume", type=int, nargs=3, default=list(CLIPTrainConfig.size), metavar=("X", "Y", "Z"),
                   help="train clip: voxels the volume tower sees (default %(default)s)")
    p.add_argument("--clip-batch", type=int, default=CLIPTrainConfig.batch_size,
                   help="train clip: pairs per batch (default %(default)s)")
    p.add_argument("--context-length", type=int, default=TEXT2CT_CONTEXT,
                   help="tokens per report of the text tower (default %(default)s, Text2CT's)")
    p.add_argument("--clip-config", type=cli_path,
                   help="JSON file of CLIP3D settings (text_config, vision_config, projection_dim), as the "
                        "\"model\" object of train clip --config; its text_config also shapes the text tower "
                        "of sampling and UNet training (default: CLIP's text tower, train clip's volume tower)")
    p.add_argument("--backend", default="triton", help="ops backend for GroupNorm/attention: triton or torch")
    p.add_argument("--unet-config", type=cli_path,
                   help="JSON file of DiffusionModelUNetMaisi keyword arguments (default: Text2CT)")
    p.add_argument("--vae-config", type=cli_path,
                   help="JSON file of AutoencoderKlMaisi keyword arguments (default: Text2CT)")
    p.add_argument("--json", type=cli_path, help="also write the plan to this JSON file (atomic)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Every argument problem as one ValueError, before any planning."""
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    if args.what not in WHAT:
        raise ValueError(f"--what must be one of {', '.join(WHAT)}, got {args.what!r}")
    if args.backend not in ("triton", "torch"):
        raise ValueError(f"--backend must be triton or torch, got {args.backend!r}")
    if args.json:
        check_output_file("--json", args.json, args.force)


def read_config(path: str | None, flag: str) -> dict:
    """A JSON object of network keyword arguments, or {} when no file is given."""
    if path is None:
        return {}
    try:
        with open(path) as f:
            config = json.load(f)
    except OSError as err:
        raise ValueError(f"{flag} {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag} {path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{flag} {path} must hold a JSON object of keyword arguments")
    return config


def make_setup(args: argparse.Namespace) -> Setup:
    """The CLI's arguments as a :class:`Setup`; a bad value is one ValueError naming its option."""
    unet, vae = read_config(args.unet_config, "--unet-config"), read_config(args.vae_config, "--vae-config")
    clip = read_config(args.clip_config, "--clip-config")
    try:
        return Setup(unet, vae, volume=args.volume, dtype=DTYPES[args.dtype], batch=args.batch, slab=args.slab,
                     ema=args.ema, ema_offload=args.ema_offload, clip_config=clip, context_length=args.context_length, patch=args.patch,
                     clip_volume=args.clip_volume, clip_batch=args.clip_batch)
    except TypeError as err:  # an unknown network keyword
        raise ValueError(f"network config: {err}") from None
    except ValueError as err:
        msg = str(err)
        raise ValueError(msg if msg.startswith("--") else f"--{msg}" if msg.startswith("volume ")
                         else f"network config: {msg}") from None


def record(args: argparse.Namespace, s: Setup, rows: Sequence[PhasePlan], argv: Sequence[str]) -> dict:
    """The plan as the JSON object ``--json`` writes: settings, every phase, the summary lines."""
    return {"plan": "peak memory on fake tensors (FakeTensorMode), not measured on a GPU",
            "accounting": "live tensor storages rounded to 512 B (like torch.cuda.max_memory_allocated); "
                          "no CUDA context, library workspaces or allocator fragmentation",
            "date": datetime.date.today().isoformat(), "command": " ".join(["python -m text2ct_engine.memory",
                                                                           *argv]),
            "torch": torch.__version__, "volume": list(s.volume), "latent": list(s.latent_shape),
            "dtype": args.dtype, "batch": s.batch, "slab": s.slab, "ema": s.ema, "ema_offload": s.ema_offload, "patch": list(s.patch),
            "clip_volume": list(s.clip_volume), "clip_batch": s.clip_batch, "context_length": s.context_length,
            "phases": [{**asdict(r), "device_gib": round(r.device_gib, 3), "host_gib": round(r.host_gib, 3)}
                       for r in rows],
            "summary": summary(rows)}


def run(args: argparse.Namespace, argv: Sequence[str]) -> None:
    check_args(args)
    start = time.perf_counter()
    s = make_setup(args)
    rows = plan(s, args.what, args.backend)
    if args.what == "all" and patch_problem(s):
        print(f"note: train vae not planned: {patch_problem(s)}", file=sys.stderr)
    c, *sp = s.latent_shape
    print(f"memory plan: {'x'.join(map(str, s.volume))} volume (latent {c}x{'x'.join(map(str, sp))}), "
          f"{args.dtype}, batch {s.batch}; planned on fake tensors, not measured on a GPU")
    print(table(rows))
    for line in summary(rows):
        print(line)
    print("not counted: CUDA context (~0.3-0.6 GiB), cuDNN/cuBLAS workspaces, allocator fragmentation; "
          f"planned in {time.perf_counter() - start:.0f} s")
    if args.json:
        from ..io_utils import write_json
        write_json(args.json, record(args, s, rows, argv))
        print(f"wrote {args.json}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except SystemExit as done:  # --help, or a bad command line (its one error line is printed)
        return int(done.code or 0)
    return run_guarded(lambda: run(args, argv))

