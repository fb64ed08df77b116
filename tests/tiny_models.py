"""Tiny random networks of the Text2CT shapes, for fast CPU tests."""
import torch

from text2ct_engine.models import AutoencoderKL, DiffusionUNet
from text2ct_engine.pipeline import PipelineConfig, Text2CTPipeline

CONTEXT_DIM = 16


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(num_channels=[8, 8, 16], num_res_blocks=[1, 1, 1], attention_levels=[False] * 3,
                         norm_num_groups=4, latent_channels=4).eval()


def tiny_unet() -> DiffusionUNet:
    torch.manual_seed(2)
    unet = DiffusionUNet(num_channels=[8, 16], attention_levels=[False, True], num_head_channels=[0, 8],
                         num_res_blocks=1, norm_num_groups=4, cross_attention_dim=CONTEXT_DIM).eval()
    with torch.no_grad():  # give the zero-initialised output conv a voice
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return unet


def tiny_pipeline(**config) -> Text2CTPipeline:
    defaults = dict(size=(16, 16, 8), spacing=(1.5, 1.5, 3.0), steps=3, scale_factor=0.8)
    defaults.update(config)
    return Text2CTPipeline(tiny_unet(), tiny_vae(), PipelineConfig(**defaults))
