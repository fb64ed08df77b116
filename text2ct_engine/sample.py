"""``python -m text2ct_engine.sample``: radiology report in, CT volume (int16 HU NIfTI) out.

    python -m text2ct_engine.sample --model models/text2ct --prompt "Findings: ... Impression: ..." \\
        --out ct.nii.gz --preview ct.png

Without ``--model`` the built-in phantom demo model (``text2ct_engine/assets/phantom_model``: 64x64x32 voxels of
6x6x12 mm, trained on the project's procedural phantoms by ``benchmarks/train_phantom_model.sh``) is used; it
shows the engine working offline and is not a clinical model.

Several prompts (``--prompt`` repeated, or ``--prompt-file`` with one prompt per line) give one volume
each: ``ct.nii.gz`` becomes ``ct_000.nii.gz``, ``ct_001.nii.gz``, ... Prompt i uses seed ``--seed + i``.
Every problem found in the arguments is reported in one line before any sampling, and nothing is written.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from functools import partial

import torch

from .cli import Parser, run_guarded, path as cli_path, slab as cli_slab
from .io_utils import read_text_lines
from .pipeline import (HALF_PRECISION, MAX_SEED, Text2CTPipeline, available_device, check_guidance, check_steps,
                       has_text_encoder)
from .volume_io import check_writable, save_nifti, save_preview

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "phantom_model")
DEFAULT_MODEL_NOTE = ("no --model given: using the built-in phantom demo model (trained on procedural phantoms, "
                      "64x64x32 at 6x6x12 mm; not a clinical model)")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def numbered(path: str, i: int, n: int) -> str:
    """``ct.nii.gz`` -> ``ct_003.nii.gz`` when there are several outputs; at least 3 digits, as many as the
    last number needs (``ct_0999`` of 1001), so that name order is prompt order."""
    if n == 1:
        return path
    width = max(3, len(str(n - 1)))
    for ext in (".nii.gz", ".nii", ".png"):
        if path.endswith(ext):
            return f"{path[:-len(ext)]}_{i:0{width}d}{ext}"
    return f"{path}_{i:0{width}d}"


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        from_file = read_text_lines(args.prompt_file, "--prompt-file")
        if not from_file:
            raise ValueError(f"--prompt-file {args.prompt_file} holds no prompt (one prompt per line)")
        prompts += from_file
    if not prompts:
        raise ValueError("give a prompt with --prompt TEXT or --prompt-file FILE"
                         + (" (for a volume without text: --unconditional --prompt '')" if args.unconditional else ""))
    if any(not p.strip() for p in prompts) and not args.unconditional:
        raise ValueError("a prompt is empty: write a report, or pass --unconditional to sample without text")
    return prompts


def peak_memory(device: torch.device) -> str:
    """The allocator's peak on the GPU that sampled (``cuda:N`` too), else the process's peak RAM."""
    if device.type == "cuda" and torch.cuda.max_memory_allocated(device) > 0:
        return f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return f"peak RAM {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="python -m text2ct_engine.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=cli_path,
                   help="model directory (pipeline.json, unet/, vae/, clip/, tokenizer.json); default: "
                   "the built-in phantom demo model (not a clinical model)")
    p.add_argument("--prompt", action="append", help="report text; repeat for several volumes")
    p.add_argument("--prompt-file", type=cli_path, help="UTF-8 file with one prompt per line")
    p.add_argument("--out", type=cli_path, required=True, help="output .nii.gz (numbered when several prompts)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's, 30 for Text2CT)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's, 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt i uses seed + i")
    p.add_argument("--size", type=int, nargs=3, metavar=("X", "Y", "Z"), help="output voxels (default: model's)")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), help="mm per voxel")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--decode-slab", type=cli_slab, default="auto",
                   help="rows per slab of the exact tiled VAE decode, 0 for no tiling, auto (default)")
    p.add_argument("--decode-host-memory", choices=("low", "fast"), default="low",
                   help="tiled decode: low (default) recomputes the full-resolution level to keep ~3x less in "
                        "host RAM; fast stores every activation and runs each conv once")
    p.add_argument("--decode-storage", choices=("auto", "host", "device"), default="auto",
                   help="tiled decode on a GPU: keep the stored activations on the GPU when they fit its free "
                        "memory (auto, default: no PCIe round trips), always in host RAM (host: least GPU "
                        "memory), or on the GPU (device)")
    p.add_argument("--preview", type=cli_path, help="also write a PNG montage of the mid-slices")
    p.add_argument("--unconditional", action="store_true", help="allow empty prompts (unconditional samples)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def check_outputs(args: argparse.Namespace, n: int) -> list[tuple[str, str | None]]:
    if not (args.out.endswith(".nii.gz") or args.out.endswith(".nii")):
        raise ValueError(f"--out {args.out} must end in .nii.gz or .nii")
    if args.preview and not args.preview.endswith(".png"):
        raise ValueError(f"--preview {args.preview} must end in .png")
    outs = []
    for i in range(n):
        nii = check_writable(numbered(args.out, i, n), args.force)
        png = check_writable(numbered(args.preview, i, n), args.force) if args.preview else None
        outs.append((nii, png))
    return outs


def check_numbers(args: argparse.Namespace, n: int) -> None:
    """--steps, --guidance and --seed (every prompt's seed + i must fit in 63 bits)."""
    for check, value in ((check_steps, args.steps), (check_guidance, args.guidance)):
        if value is not None:
            try:
                check(value)
            except ValueError as err:
                raise ValueError(f"--{err}") from None  # "steps must ..." -> "--steps must ..."
    if not 0 <= args.seed <= MAX_SEED - (n - 1):
        raise ValueError(f"--seed must be between 0 and 2**63 - {n} (prompt i uses seed + i and seeds are "
                         f"63-bit), got {args.seed}")


def pick_device(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """--device and --dtype: a device that is here, and a dtype it can sample in."""
    device = available_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cpu" and dtype in HALF_PRECISION:
        raise ValueError(f"--dtype {args.dtype}: sampling on the CPU supports float32 only; leave --dtype out "
                         f"or use --device cuda")
    return device, dtype


def pick_model(model: str | None, prompts: list[str]) -> str:
    """--model (or the demo model), checked before its weights are loaded: prompts need a text encoder."""
    if model is None:
        if not os.path.isfile(os.path.join(DEFAULT_MODEL, "pipeline.json")):
            raise ValueError(f"no --model given and the built-in phantom demo model is missing ({DEFAULT_MODEL}): "
                             f"pass --model DIR, or rebuild it with benchmarks/train_phantom_model.sh")
        print(DEFAULT_MODEL_NOTE)
        model = DEFAULT_MODEL
    if os.path.isfile(os.path.join(model, "pipeline.json")) and not has_text_encoder(model) \
            and any(p.strip() for p in prompts):
        raise ValueError(f"{model} has no text encoder (clip/): it only samples unconditionally (--prompt '' "
                         f"--unconditional); to use prompts, convert it with --clip and --tokenizer")
    return model


def show_step(bar, step: int, steps: int) -> None:
    """Advance the bar; after a volume's last step it says that the VAE decode (minutes at full size) runs."""
    bar.update(1)
    bar.set_postfix_str("decoding" if step == steps else "", refresh=step == steps)


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    prompts = read_prompts(args)
    outputs = check_outputs(args, len(prompts))
    check_numbers(args, len(prompts))
    device, dtype = pick_device(args)
    model = pick_model(args.model, prompts)
    pipe = Text2CTPipeline.from_pretrained(model, device=device, dtype=dtype)
    size = pipe.check_size(args.size or pipe.config.size)
    spacing = pipe.check_spacing(args.spacing or pipe.config.spacing)
    steps = args.steps or pipe.config.steps
    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=steps * len(prompts), unit="step", desc="sampling")
    for i, (prompt, (nii, png)) in enumerate(zip(prompts, outputs)):
        volume = pipe(prompt, steps=steps, guidance=args.guidance, seed=args.seed + i, size=size,
                      spacing=spacing, allow_empty=args.unconditional, decode_slab=args.decode_slab,
                      decode_host_memory=args.decode_host_memory, decode_storage=args.decode_storage,
                      progress=partial(show_step, bar) if bar is not None else None)[0]
        save_nifti(volume, spacing, nii, overwrite=args.force)
        if png:
            save_preview(volume, spacing, png, overwrite=args.force, window=tuple(pipe.config.hu_window))
        if bar is not None:
            bar.write(f"wrote {nii}" + (f" and {png}" if png else ""))
        else:
            print(f"wrote {nii}" + (f" and {png}" if png else ""))
    if bar is not None:
        bar.close()
    print(f"done: {len(prompts)} volume(s) of {size[0]}x{size[1]}x{size[2]} in "
          f"{time.perf_counter() - start:.1f} s on {device}, {peak_memory(device)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_guarded(lambda: run(args), oom_hint="try a smaller --size or --decode-slab")


if __name__ == "__main__":
    sys.exit(main())
