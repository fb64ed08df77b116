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


REPORTS = [
    "Findings: Bilateral pleural effusion. No lung nodule. Impression: Pleural effusion on both sides.",
    "Findings: A 12 mm nodule in the right upper lobe. No pleural effusion. Impression: Right lung nodule.",
    "Findings: Cardiomegaly. Pericardial effusion. Impression: Enlarged heart with pericardial effusion.",
    "Findings: Lungs are clear. Heart size is normal. Impression: Normal chest CT.",
    "Findings: Emphysema in both lungs. Impression: Emphysematous changes, no consolidation.",
] * 3


def tiny_text_side():
    from text2ct_engine.models import CLIPTextConfig, CLIPTextModelWithProjection
    from text2ct_engine.tokenizer import CLIPTokenizer
    tok = CLIPTokenizer.train(REPORTS, vocab_size=300, min_frequency=1, context_length=64)
    torch.manual_seed(3)
    cfg = CLIPTextConfig(vocab_size=tok.vocab_size, max_position_embeddings=64, hidden_size=16,
                         num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         projection_dim=CONTEXT_DIM, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                         pad_token_id=tok.pad_id)
    return CLIPTextModelWithProjection(cfg).eval(), tok


def tiny_text_pipeline(**config) -> Text2CTPipeline:
    pipe = tiny_pipeline(**config)
    pipe.text_encoder, pipe.tokenizer = tiny_text_side()
    return pipe
