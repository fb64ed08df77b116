"""Slab-wise VAE encoding equals ``vae.encode`` in every host-memory mode, for any slab size (1-row slabs,
tails, odd lengths that end the downsampling early), and holds the bytes it claims (its storage policy is
tested with the decoder's in test_tiling.py)."""
import math

import pytest
import torch

from test_tiling import TEXT2CT, TINY, random_vae
from text2ct_engine.models import AutoencoderKL
from text2ct_engine.tiling import SlabEncoder, tiled_encode

TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-11}


def random_image(seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A CT-like input in [0, 1] with a tail above it (never zeros)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) * 1.2 - 0.1).to(dtype)


def assert_exact(vae: AutoencoderKL, x: torch.Tensor, slab: int, host_memory: str) -> SlabEncoder:
    with torch.no_grad():
        ref_mu, ref_sigma = vae.encode(x)
    encoder = SlabEncoder(vae, slab, host_memory=host_memory)
    mu, sigma = encoder(x)
    tol = TOLERANCE[x.dtype]
    for out, ref in ((mu, ref_mu), (sigma, ref_sigma)):
        assert out.shape == ref.shape and out.dtype == ref.dtype
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol * ref.abs().max().item())
    assert encoder.ledger.live == x.numel() * x.element_size()  # the caller's image; every stored node let go
    return encoder


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("host_memory", ["low", "fast"])
@pytest.mark.parametrize("slab", [1, 3, 64])
def test_tiled_encode_is_exact_text2ct_layout(slab, host_memory, dtype):
    vae = random_vae(dtype, **TEXT2CT)
    # odd lengths (13 -> 6 -> 3, 9 -> 4 -> 2): the last downsampled row reads real rows only; batch 2
    x = random_image(slab, (2, 1, 13, 9, 6), dtype)
    encoder = assert_exact(vae, x, slab, host_memory)
    assert encoder.streamed == ([True, False, False] if host_memory == "low" else [False] * 3)


@pytest.mark.parametrize("host_memory", ["low", "fast"])
@pytest.mark.parametrize("layout", range(len(TINY)))
@pytest.mark.parametrize("slab", [1, 4, 7])
def test_tiled_encode_is_exact_tiny_layouts(slab, layout, host_memory):
    # even lengths: the last downsampled row of each level reads MAISI's padded zero row
    x = random_image(10 * slab + layout, (1, 1, 16, 8, 12))
    assert_exact(random_vae(**TINY[layout]), x, slab, host_memory)


def test_tiled_encode_bfloat16_close_to_float32():
    vae, x = random_vae(**TINY[1]), random_image(5, (1, 1, 12, 8, 8))
    with torch.no_grad():
        ref, _ = vae.encode(x)
    mu, sigma = tiled_encode(random_vae(torch.bfloat16, **TINY[1]), x, slab=3)
    assert mu.dtype == sigma.dtype == torch.bfloat16  # computed in the weights' dtype, from a float32 image
    assert ((mu.float() - ref).norm() / ref.norm()).item() < 3e-2


def nbytes(*shape: int) -> int:
    return math.prod(shape) * 4


def test_low_host_memory_stores_one_full_resolution_tensor():
    """Stored bytes at the peak against the design's figures, the image (the caller's, held throughout)
    included: fast holds the first conv's output and the first ResBlock's inner activation (2C channels at
    full resolution); low recomputes the first conv from the image and holds one C-channel tensor, and at
    the end of the level its downsampled result."""
    vae = random_vae(**TEXT2CT)
    n, c, full, half = 2, 8, (16, 8, 12), (8, 4, 6)
    x = random_image(2, (n, 1, *full))
    peaks = {}
    for host_memory in ("low", "fast"):
        encoder = SlabEncoder(vae, slab=3, host_memory=host_memory)
        encoder(x)
        peaks[host_memory] = encoder.peak_stored_bytes
    image = nbytes(n, 1, *full)
    assert peaks["fast"] == image + nbytes(n, 2 * c, *full)
    assert peaks["low"] == image + nbytes(n, c, *full) + nbytes(n, c, *half)
    assert peaks["low"] < 0.6 * peaks["fast"]


def test_tiled_encode_refuses_what_it_cannot_do_exactly():
    x = random_image(0, (1, 1, 8, 8, 8))
    vae = random_vae(num_channels=[8, 8], num_res_blocks=[1, 1], attention_levels=[True, False], norm_num_groups=2)
    with pytest.raises(ValueError, match="tiled encoding has no exact form for SpatialAttention.*without tiling"):
        tiled_encode(vae, x)
    vae = random_vae(num_channels=[8, 8], num_res_blocks=[1, 1], attention_levels=[False, False], norm_num_groups=2,
                     with_encoder_nonlocal_attn=True)
    with pytest.raises(ValueError, match="no exact form"):
        tiled_encode(vae, x)
    with pytest.raises(ValueError, match="slab"):
        tiled_encode(random_vae(**TINY[0]), x, slab=0)
