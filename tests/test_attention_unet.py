"""The UNet's self- and cross-attention blocks run on the fused Triton kernels (interpreter) and still
match MONAI's ``DiffusionModelUNetMaisi``; gradients match the SDPA path."""
from __future__ import annotations

import importlib

import pytest
import torch

from text2ct_engine.models import DiffusionUNet

maisi_unet = pytest.importorskip("monai.apps.generation.maisi.networks.diffusion_model_unet_maisi")
attn_mod = importlib.import_module("text2ct_engine.ops.attention")

# Text2CT's UNet layout scaled down, head size 16 (the smallest the Triton kernel takes).
KW = dict(spatial_dims=3, in_channels=4, out_channels=4, num_res_blocks=1, num_channels=[8, 16, 32, 32],
          attention_levels=[False, False, True, True], norm_num_groups=4, norm_eps=1e-6, resblock_updown=True,
          num_head_channels=[0, 0, 16, 16], with_conditioning=True, cross_attention_dim=12,
          num_class_embeds=128, include_fc=True, include_spacing_input=True)


def test_unet_attention_on_triton_matches_monai(monkeypatch):
    ref = maisi_unet.DiffusionModelUNetMaisi(**KW).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + 0.01)
    ours = DiffusionUNet(**KW).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 4, 16, 16, 8)  # level 3: 4x4x2 = 32 tokens, level 4: 2x2x1 = 4 tokens
    args = dict(timesteps=torch.tensor([811.0]), context=torch.randn(1, 1, 12), class_labels=torch.tensor([1]),
                spacing_tensor=torch.tensor([[0.75, 0.75, 3.0]]))
    with torch.no_grad():
        want = ref(x, **args)

    calls = []
    real = attn_mod.attention_triton
    monkeypatch.setattr(attn_mod, "attention_triton", lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.setenv("TEXT2CT_ATTENTION", "triton")  # attention only; GroupNorm keeps its own backend
    xg = x.clone().requires_grad_()
    out = ours(xg, **args)
    assert calls and {s[-1] for s in calls} == {16}
    assert ((out - want).norm() / want.norm()).item() <= 1e-5
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, xg, grad_out)

    monkeypatch.setenv("TEXT2CT_ATTENTION", "torch")
    xt = x.clone().requires_grad_()
    (grad_ref,) = torch.autograd.grad(ours(xt, **args), xt, grad_out)
    assert ((grad - grad_ref).norm() / grad_ref.norm()).item() <= 1e-5
