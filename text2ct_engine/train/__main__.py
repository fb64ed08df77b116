"""``python -m text2ct_engine.train ldm``: train the diffusion UNet on a latent cache.

    python -m text2ct_engine.data.cache --data data/phantom --vae models/base --out cache/phantom ...
    python -m text2ct_engine.train ldm --model models/base --data cache/phantom --out runs/ldm --steps 20000

``--model`` supplies the networks (its UNet is fine-tuned, or re-initialised with ``--from-scratch``; the
VAE and text tower stay frozen); ``out/model`` is the trained model directory, ``out/checkpoint`` the
resumable state (``--resume``: every trainer continues with the checkpoint's settings, over which typed
flags go; a typed change to the math is refused), ``out/loss.jsonl`` the loss log.

``python -m text2ct_engine.train clip``: train the 3D CLIP (volume + report towers, InfoNCE) on paired data::

    python -m text2ct_engine.train clip --data data/phantom --tokenizer tokenizer.json --out runs/clip

``out/model`` holds ``clip/`` + ``tokenizer.json``: copy both into a model directory (replacing its text
side) before ``train ldm --model``; ``out/eval.jsonl`` logs held-out text -> volume recall@1/@5.

``python -m text2ct_engine.train vae``: train or fine-tune the 3D VAE on random patches (``train/vae.py``);
``out/model`` is a VAE directory (a model directory's ``vae/``).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
from torch.utils.data import Dataset

from ..cli import Parser, run_guarded, path as cli_path
from ..pipeline import Text2CTPipeline, available_device
from .clip import add_parser as add_clip_parser
from .common import add_config_flags, add_run_flags, checkpoint_state, run_settings
from .ldm import LDMTrainConfig, sample_scale_factor, train_ldm
from .vae import add_parser as add_vae_parser


class CachedLatents(Dataset):
    """A latent cache as training items ``{"latent": mu, "sigma", "text", "spacing"}``: the trainer draws
    mu + sigma * noise from each step's seeded generator (``ldm.draw_latents``)."""

    def __init__(self, cache_dir: str) -> None:
        from ..data.cache import LatentCacheDataset
        from ..data.errors import DataError
        try:
            self.cache = LatentCacheDataset(cache_dir)
        except (DataError, OSError) as err:
            raise ValueError(str(err)) from None
        if len(self.cache) == 0:
            raise ValueError(f"{cache_dir} holds no latents")
        self.dir = cache_dir

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict:
        item = self.cache[i]
        sigma = item["sigma"] if item["sigma"] is not None else torch.zeros_like(item["mu"])
        return {"latent": item["mu"], "sigma": sigma, "text": item["text"], "spacing": item["spacing"]}

    def check_fits(self, pipe: Text2CTPipeline, model_dir: str, allow_other_vae: bool = False) -> None:
        """One-line ``ValueError`` unless the latents fit ``pipe``'s UNet and came from its VAE."""
        shapes = sorted({tuple(e["shape"]) for e in self.cache.entries.values()})
        unet = pipe.unet.config
        multiple = 2 ** (len(unet.num_channels) - 1)
        if len(shapes) > 1:
            raise ValueError(f"the latent cache {self.dir} mixes latent shapes {shapes[:3]}: rebuild it")
        channels, *spatial = shapes[0]
        if channels != unet.in_channels or any(s % multiple for s in spatial):
            raise ValueError(f"the latent cache {self.dir} holds latents of shape {shapes[0]} (channels, x, y, z), "
                             f"but the UNet of {model_dir} takes {unet.in_channels} channels and sizes divisible "
                             f"by {multiple}: rebuild the cache with the model's VAE and a --size divisible by "
                             f"{pipe.size_multiple}")
        if not allow_other_vae and not self.same_vae(pipe, model_dir):
            raise ValueError(f"the latent cache {self.dir} was encoded by another VAE "
                             f"({self.cache.config.get('vae') or 'unnamed'}) than the one of {model_dir}: rebuild "
                             f"the cache with --vae {model_dir}, or pass --allow-other-vae")

    def same_vae(self, pipe: Text2CTPipeline, model_dir: str) -> bool:
        """Do the cache's recorded VAE weights (or, for an older cache, its VAE path) match ``pipe``'s?"""
        from ..data.cache import module_digest, vae_dir_of
        recorded = self.cache.config
        if recorded.get("vae_weights"):
            return recorded["vae_weights"] == module_digest(pipe.vae)
        return not recorded.get("vae") or os.path.realpath(vae_dir_of(recorded["vae"])) == \
            os.path.realpath(vae_dir_of(model_dir))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="python -m text2ct_engine.train",
               description="Train the diffusion UNet (ldm), the 3D VAE (vae) or the 3D CLIP (clip); "
                           "`python -m text2ct_engine.train ldm --help` gives a trainer's options.")
    sub = p.add_subparsers(dest="what", required=True)
    ldm = sub.add_parser("ldm", help="train the diffusion UNet on cached latents")
    ldm.add_argument("--model", type=cli_path, required=True,
                     help="model directory with unet/, vae/, clip/, tokenizer.json")
    add_run_flags(ldm, data_help="latent cache directory (python -m text2ct_engine.data.cache)")
    ldm.add_argument("--from-scratch", action="store_true", help="re-initialise the UNet instead of fine-tuning")
    ldm.add_argument("--scale-factor",
                     help="'model' (from pipeline.json; the default, but a resume keeps the run's), 'auto' (1/std "
                          "of the cached latents, drawn from --seed; a resume keeps the run's) or a number")
    ldm.add_argument("--allow-other-vae", action="store_true",
                     help="train on a cache that another VAE than --model's encoded")
    add_config_flags(ldm, LDMTrainConfig, helps={
        "ema_decay": "default 0.999; 0 turns EMA off",
        "ema_offload": "keep the EMA copy in host RAM: its fp32 weights off the GPU (0.81 GiB for Text2CT's UNet), "
                       "for a copy of the weights to the host per step (default: off)"})
    add_vae_parser(sub)
    add_clip_parser(sub)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    cfg = LDMTrainConfig(**run_settings(args, LDMTrainConfig))
    cfg.ema_decay = cfg.ema_decay or None
    cfg.validate()
    device = available_device(args.device)
    data = CachedLatents(args.data)
    # training on cached latents never runs the VAE: its weights stay in host RAM, off the GPU
    pipe = Text2CTPipeline.from_pretrained(args.model, device=device, vae_device="cpu")
    if pipe.text_encoder is None:
        raise ValueError(f"{args.model} has no text encoder (clip/ + tokenizer.json) to condition on")
    data.check_fits(pipe, args.model, args.allow_other_vae)
    if args.from_scratch:  # a fresh UNet drawn from --seed, so the run can be repeated
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            fresh = type(pipe.unet)(pipe.unet.config).to(device)
        pipe.unet.load_state_dict(fresh.state_dict())
    pipe.config.scale_factor = scale_factor(args, data, cfg.seed, pipe.config.scale_factor)
    train_ldm(pipe, data, cfg, args.out, resume=args.resume)


def scale_factor(args: argparse.Namespace, data: Dataset, seed: int, model_value: float) -> float:
    """The --scale-factor to train with: the resumed run's unless a number or 'model' is typed, else the model's
    (the default), a number, or 'auto' (measured)."""
    saved = ((checkpoint_state(args.out) or {}).get("config") or {}).get("scale_factor") if args.resume else None
    if saved is not None and args.scale_factor in (None, "auto"):
        print(f"scale_factor {saved:.6g} of the resumed run")
        return float(saved)
    if args.scale_factor in (None, "model"):
        return model_value
    if args.scale_factor == "auto":
        value, n = sample_scale_factor(data, seed)
        print(f"scale_factor {value:.6g} from {n} cached latents")
        return value
    try:
        value = float(args.scale_factor)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"--scale-factor must be model, auto or a positive number, got {args.scale_factor}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_guarded(lambda: getattr(args, "run", run)(args),
                       interrupted="the last checkpoint is whole: the same command with --resume goes on from it")


if __name__ == "__main__":
    sys.exit(main())
