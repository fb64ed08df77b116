"""Assemble the starting model directory of the phantom demo model (step 6 of benchmarks/train_phantom_model.sh).

    python benchmarks/phantom_model/assemble.py --vae runs/vae/model --clip runs/clip/model \
        --unet-config benchmarks/phantom_model/unet.json --out runs/init --size 64 64 32 --spacing 6 6 12

Takes the trained VAE, the text tower of the trained CLIP3D (the volume tower is dropped: sampling needs only
the text side) with its tokenizer, and a freshly initialised UNet (seeded, so the LDM run that fine-tunes it
starts from the same weights every time) whose cross-attention width is the CLIP embedding width.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from text2ct_engine.models import AutoencoderKL, DiffusionUNet
from text2ct_engine.pipeline import PipelineConfig, Text2CTPipeline
from text2ct_engine.text import load_text_side


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vae", required=True, help="VAE directory (train vae's out/model)")
    p.add_argument("--clip", required=True, help="train clip's out/model (clip/ + tokenizer.json)")
    p.add_argument("--unet-config", required=True, help="JSON of DiffusionUNet keyword arguments")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, nargs=3, required=True)
    p.add_argument("--spacing", type=float, nargs=3, required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    with open(a.unet_config) as f:
        unet_kwargs = json.load(f)
    text_encoder, tokenizer = load_text_side(a.clip, torch.device("cpu"))
    if unet_kwargs.get("cross_attention_dim") != text_encoder.embed_dim:
        raise SystemExit(f"unet cross_attention_dim {unet_kwargs.get('cross_attention_dim')} != CLIP embedding "
                         f"width {text_encoder.embed_dim}")
    torch.manual_seed(a.seed)
    unet = DiffusionUNet(**unet_kwargs).eval()
    vae = AutoencoderKL.from_pretrained(a.vae)
    config = PipelineConfig(scale_factor=1.0, size=a.size, spacing=a.spacing, steps=a.steps, guidance=a.guidance)
    Text2CTPipeline(unet, vae, config, text_encoder, tokenizer).save_pretrained(a.out)
    n = {name: sum(p.numel() for p in m.parameters()) / 1e6
         for name, m in (("unet", unet), ("vae", vae), ("text tower", text_encoder))}
    print(f"wrote {a.out}: " + ", ".join(f"{k} {v:.2f} M" for k, v in n.items()) + " parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
