"""Assemble a model directory from what the project's trainers wrote: ``python -m text2ct_engine.assemble``.

    python -m text2ct_engine.assemble --vae runs/vae/model --clip runs/clip/model --out models/mine \
        --size 128 128 128 --spacing 3 3 3 [--unet-config unet.json] [--seed 0]

The step between ``train vae`` / ``train clip`` and ``data.cache`` / ``train ldm`` when training from scratch:
the trained VAE, the text tower of the trained CLIP3D with its tokenizer (the volume tower is dropped: sampling
needs only the text side), and a freshly initialised diffusion UNet (drawn from ``--seed``, so a rerun gives
the same directory) whose cross-attention width is the CLIP embedding width. ``pipeline.json`` takes the
default output size and spacing given here; its ``scale_factor`` is 1 until ``train ldm --scale-factor
auto`` measures the latents' spread from the cache (the trained model directory records it).
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

import torch

from .cli import Parser, path as cli_path, run_guarded
from .convert import check_output
from .io_utils import atomic_dir, read_json_object
from .models import AutoencoderKL, DiffusionUNet
from .models.serialization import build_on_meta
from .pipeline import PIPELINE_FILE, PipelineConfig, Text2CTPipeline, check_guidance, check_steps
from .text import CLIP_DIR, load_text_side


def fresh_unet(settings: dict, width: int, seed: int) -> DiffusionUNet:
    """A seeded new UNet of ``settings`` cross-attending to ``width``-wide text embeddings (the global RNG is
    left as it was)."""
    given = settings.get("cross_attention_dim")
    if given is not None and given != width:
        raise ValueError(f"--unet-config sets cross_attention_dim {given}, but the CLIP's embeddings are {width} "
                         f"wide: drop it or set {width}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return DiffusionUNet(**{**settings, "cross_attention_dim": width}).eval()
        except TypeError as err:
            raise ValueError(f"--unet-config: {err}") from None


def assemble(vae_dir: str, clip_dir: str, out: str, size: Sequence[int], spacing: Sequence[float],
             unet_config: str | None = None, seed: int = 0, steps: int = 30, guidance: float = 5.0,
             force: bool = False, log: Callable[[str], None] = print) -> Text2CTPipeline:
    """Write the model directory ``out`` (see the module docstring); nothing is left behind on error."""
    check_output(out, force, (vae_dir, clip_dir, unet_config))
    for flag, check, value in (("--steps", check_steps, steps), ("--guidance", check_guidance, guidance)):
        try:
            check(value)
        except ValueError as err:
            raise ValueError(f"{flag}: {err}") from None
    settings = read_json_object(unet_config, "UNet config (DiffusionUNet keyword arguments)") if unet_config else {}
    if not os.path.isdir(os.path.join(clip_dir, CLIP_DIR)):
        raise ValueError(f"--clip {clip_dir} holds no {CLIP_DIR}/: give train clip's out/model (clip/ + "
                         f"tokenizer.json) or a model directory")
    text_encoder, tokenizer = load_text_side(clip_dir, torch.device("cpu"))
    vae = AutoencoderKL.from_pretrained(vae_dir)
    with build_on_meta():  # the settings and the size are checked before any weight is drawn
        probe = Text2CTPipeline(fresh_unet(settings, text_encoder.embed_dim, seed), vae)
    size, spacing = probe.check_size(size), probe.check_spacing(spacing)
    unet = fresh_unet(settings, text_encoder.embed_dim, seed)
    config = PipelineConfig(scale_factor=1.0, size=size, spacing=spacing, steps=steps, guidance=guidance)
    pipe = Text2CTPipeline(unet, vae, config, text_encoder, tokenizer)
    with atomic_dir(out, marker=PIPELINE_FILE) as tmp:
        pipe.save_pretrained(tmp)
    millions = {name: sum(p.numel() for p in m.parameters()) / 1e6
                for name, m in (("UNet (new)", unet), ("VAE", vae), ("text tower", text_encoder))}
    log(f"wrote {out}: " + ", ".join(f"{k} {v:.2f} M" for k, v in millions.items()) + " parameters; "
        "scale_factor 1: train ldm --scale-factor auto measures it from the latent cache")
    return pipe


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m text2ct_engine.assemble", description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", type=cli_path, required=True, help="VAE directory (train vae's out/model)")
    p.add_argument("--clip", type=cli_path, required=True,
                   help="train clip's out/model (clip/ + tokenizer.json), or a model directory")
    p.add_argument("--out", type=cli_path, required=True, help="model directory to create")
    p.add_argument("--size", type=int, nargs=3, required=True, metavar=("X", "Y", "Z"),
                   help="default output voxels of sample (and the cache's --size to train at)")
    p.add_argument("--spacing", type=float, nargs=3, required=True, metavar=("SX", "SY", "SZ"),
                   help="default mm per voxel")
    p.add_argument("--unet-config", type=cli_path,
                   help="JSON file of DiffusionModelUNetMaisi keyword arguments (default: Text2CT's UNet)")
    p.add_argument("--seed", type=int, default=0, help="draws the new UNet's weights (default 0)")
    p.add_argument("--steps", type=int, default=30, help="default sampling steps (default 30)")
    p.add_argument("--guidance", type=float, default=5.0, help="default guidance scale (default 5)")
    p.add_argument("--force", action="store_true", help="replace --out if it is a model directory")
    args = p.parse_args(argv)
    return run_guarded(lambda: assemble(args.vae, args.clip, args.out, args.size, args.spacing, args.unet_config,
                                        args.seed, args.steps, args.guidance, args.force))


if __name__ == "__main__":
    sys.exit(main())
