"""Slab-wise VAE decoding equals the untiled decode, for any slab size, including 1-row slabs and tails."""
import pytest
import torch

from text2ct_engine.models import AutoencoderKL
from text2ct_engine.tiling import tiled_decode


def random_vae(**kw) -> AutoencoderKL:
    torch.manual_seed(0)
    vae = AutoencoderKL(**kw).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(torch.randn_like(p) * 0.15 + 0.02)
    return vae


@pytest.mark.parametrize("slab", [1, 3, 5, 64])
def test_tiled_decode_is_exact(slab):
    # Text2CT's decoder layout (3 levels, 2 res blocks, channel change with 1x1 shortcut), scaled down
    vae = random_vae(num_channels=[8, 16, 16], num_res_blocks=[2, 1, 1], attention_levels=[False] * 3,
                     norm_num_groups=4)
    z = torch.randn(2, 4, 5, 3, 4) * 1.3 + 0.2  # odd latent sizes: slabs end in tails
    with torch.no_grad():
        ref = vae.decode(z)
    out = tiled_decode(vae, z, slab=slab)
    assert out.shape == ref.shape == (2, 1, 20, 12, 16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_tiled_decode_bfloat16_close_to_float32():
    vae = random_vae(num_channels=[8, 8], num_res_blocks=[1, 1], attention_levels=[False, False], norm_num_groups=2)
    z = torch.randn(1, 4, 6, 4, 4)
    with torch.no_grad():
        ref = vae.decode(z)
    out = tiled_decode(vae.to(torch.bfloat16), z.bfloat16(), slab=4).float()
    assert ((out - ref).norm() / ref.norm()).item() < 3e-2


def test_tiled_decode_refuses_what_it_cannot_do_exactly():
    vae = random_vae(num_channels=[8, 8], num_res_blocks=[1, 1], attention_levels=[False, True], norm_num_groups=2)
    with pytest.raises(ValueError, match="no exact form for SpatialAttention"):
        tiled_decode(vae, torch.randn(1, 4, 2, 2, 2))
    vae = random_vae(num_channels=[8, 8], num_res_blocks=[1, 1], attention_levels=[False, False], norm_num_groups=2,
                     use_convtranspose=True)
    with pytest.raises(ValueError, match="use_convtranspose"):
        tiled_decode(vae, torch.randn(1, 4, 2, 2, 2))
    with pytest.raises(ValueError, match="slab"):
        tiled_decode(vae, torch.randn(1, 4, 2, 2, 2), slab=0)
