"""``python -m text2ct_engine.train ldm``: train the diffusion UNet on a latent cache.

    python -m text2ct_engine.data.cache --data data/phantom --vae models/base --out cache/phantom ...
    python -m text2ct_engine.train ldm --model models/base --data cache/phantom --out runs/ldm --steps 20000

``--model`` supplies the networks (its UNet is fine-tuned, or re-initialised with ``--from-scratch``; the
VAE and text tower stay frozen); ``out/model`` is the trained model directory, ``out/checkpoint`` the
resumable state (``--resume``), ``out/loss.jsonl`` the loss log.

``python -m text2ct_engine.train clip``: train the 3D CLIP (volume + report towers, InfoNCE) on paired data::

    python -m text2ct_engine.train clip --data data/phantom --tokenizer tokenizer.json --out runs/clip

``out/model`` holds ``clip/`` + ``tokenizer.json``: copy both into a model directory (replacing its text
side) before ``train ldm --model``; ``out/eval.jsonl`` logs held-out text -> volume recall@1/@5.

``python -m text2ct_engine.train vae``: train or fine-tune the 3D VAE on random patches (``train/vae.py``);
``out/model`` is a VAE directory (a model directory's ``vae/``).
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.data import Dataset

from ..cli import run_guarded
from ..pipeline import Text2CTPipeline, resolve_device
from .clip import add_parser as add_clip_parser
from .common import add_config_flags, add_run_flags
from .ldm import LDMTrainConfig, compute_scale_factor, train_ldm
from .vae import add_parser as add_vae_parser


class CachedLatents(Dataset):
    """A latent cache as training items ``{"latent", "text", "spacing"}`` (latent = a fresh draw of q(z|x))."""

    def __init__(self, cache_dir: str) -> None:
        from ..data.cache import LatentCacheDataset
        from ..data.errors import DataError
        try:
            self.cache = LatentCacheDataset(cache_dir, sample=True)
        except (DataError, OSError) as err:
            raise ValueError(str(err)) from None
        if len(self.cache) == 0:
            raise ValueError(f"{cache_dir} holds no latents")

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict:
        item = self.cache[i]
        return {"latent": item["latent"], "text": item["text"], "spacing": item["spacing"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m text2ct_engine.train", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    ldm = sub.add_parser("ldm", help="train the diffusion UNet on cached latents")
    ldm.add_argument("--model", required=True, help="model directory with unet/, vae/, clip/, tokenizer.json")
    add_run_flags(ldm, data_help="latent cache directory (python -m text2ct_engine.data.cache)")
    ldm.add_argument("--from-scratch", action="store_true", help="re-initialise the UNet instead of fine-tuning")
    ldm.add_argument("--scale-factor", default="model",
                     help="'model' (from pipeline.json), 'auto' (1/std of the cached latents) or a number")
    add_config_flags(ldm, LDMTrainConfig, helps={"ema_decay": "default 0.999; 0 turns EMA off"})
    add_vae_parser(sub)
    add_clip_parser(sub)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    cfg = LDMTrainConfig(**{k: getattr(args, k) for k in vars(LDMTrainConfig())})
    cfg.ema_decay = cfg.ema_decay or None
    device = resolve_device(args.device)
    data = CachedLatents(args.data)
    pipe = Text2CTPipeline.from_pretrained(args.model, device=device)
    if pipe.text_encoder is None:
        raise ValueError(f"{args.model} has no text encoder (clip/ + tokenizer.json) to condition on")
    if args.from_scratch:  # a fresh UNet drawn from --seed, so the run can be repeated
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            fresh = type(pipe.unet)(pipe.unet.config).to(device)
        pipe.unet.load_state_dict(fresh.state_dict())
    if args.scale_factor == "auto":
        sample = torch.stack([data[i]["latent"] for i in range(min(len(data), 64))])
        pipe.config.scale_factor = compute_scale_factor(sample)
        print(f"scale_factor {pipe.config.scale_factor:.6g} from {len(sample)} cached latents")
    elif args.scale_factor != "model":
        try:
            pipe.config.scale_factor = float(args.scale_factor)
        except ValueError:
            raise ValueError(f"--scale-factor must be model, auto or a number, got {args.scale_factor}") from None
    train_ldm(pipe, data, cfg, args.out, resume=args.resume)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_guarded(lambda: getattr(args, "run", run)(args))


if __name__ == "__main__":
    sys.exit(main())
