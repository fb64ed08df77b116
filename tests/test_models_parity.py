"""The engine's VAE and UNet load MONAI MAISI state dicts with strict=True and give MONAI's outputs."""
import pytest
import torch

from text2ct_engine import ops
from text2ct_engine.models import AutoencoderKL, DiffusionUNet

maisi = pytest.importorskip("monai.apps.generation.maisi.networks.autoencoderkl_maisi")
maisi_unet = pytest.importorskip("monai.apps.generation.maisi.networks.diffusion_model_unet_maisi")


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random non-zero weights everywhere (MONAI zero-initialises some output convs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + 0.01)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# Text2CT's VAE layout (3 levels, 2 res blocks, no attention), channels scaled down; and variants.
VAE_CASES = {
    "text2ct_shape": dict(num_channels=[8, 16, 32], num_res_blocks=[2, 2, 2], attention_levels=[False] * 3,
                          norm_num_groups=4),
    "attention_nonlocal": dict(num_channels=[8, 16], num_res_blocks=[1, 2], attention_levels=[False, True],
                               norm_num_groups=4, with_encoder_nonlocal_attn=True,
                               with_decoder_nonlocal_attn=True, include_fc=True),
    "combined_linear_convtranspose": dict(num_channels=[8, 8], num_res_blocks=[1, 1],
                                          attention_levels=[True, False], norm_num_groups=2,
                                          use_combined_linear=True, use_convtranspose=True),
}


BACKEND_CASES = [(case, "torch") for case in VAE_CASES] + [("text2ct_shape", "cpp"), ("text2ct_shape", "triton")]


@pytest.mark.parametrize("case,backend", BACKEND_CASES)
def test_vae_matches_monai(case, backend):
    """Every CPU-runnable backend (triton under the interpreter) gives MONAI's outputs."""
    kw = dict(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4, norm_eps=1e-6, **VAE_CASES[case])
    ref = maisi.AutoencoderKlMaisi(**kw, num_splits=1, save_mem=False).eval()
    randomize(ref, 1)
    ours = AutoencoderKL(**kw).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 1, 12, 16, 8) * 0.5 + 0.3
    with torch.no_grad(), ops.backend(backend):
        mu_r, sig_r = ref.encode(x)
        mu, sig = ours.encode(x)
        assert rel_err(mu, mu_r) <= 1e-5 and rel_err(sig, sig_r) <= 1e-5
        z = torch.randn_like(mu) * 0.7 - 0.1
        assert rel_err(ours.decode(z), ref.decode(z)) <= 1e-5
        torch.manual_seed(3)
        s_r = ref.sampling(mu_r, sig_r)
        torch.manual_seed(3)
        s = ours.sampling(mu, sig)
        assert rel_err(s, s_r) <= 1e-5
        torch.manual_seed(5)
        rec_r, _, _ = ref(x)
        torch.manual_seed(5)
        rec, _, _ = ours(x)
        assert rel_err(rec, rec_r) <= 1e-5


def text2ct_unet_kwargs(**over):
    """Text2CT's UNet layout (4 levels, attention at the deep two, head size fixed), channels scaled down."""
    kw = dict(spatial_dims=3, in_channels=4, out_channels=4, num_res_blocks=2, num_channels=[8, 16, 16, 32],
              attention_levels=[False, False, True, True], norm_num_groups=4, norm_eps=1e-6,
              resblock_updown=True, num_head_channels=[0, 0, 4, 8], with_conditioning=True,
              cross_attention_dim=12, num_class_embeds=128, include_fc=True, include_spacing_input=True)
    kw.update(over)
    return kw


UNET_CASES = {
    "text2ct_shape": text2ct_unet_kwargs(),
    "no_updown_no_fc_int_heads": text2ct_unet_kwargs(resblock_updown=False, include_fc=False, num_head_channels=4),
    "self_attention_only": text2ct_unet_kwargs(with_conditioning=False, cross_attention_dim=None,
                                               num_class_embeds=None, include_spacing_input=False,
                                               num_res_blocks=[1, 2, 1, 1], use_combined_linear=True),
    "regions_two_layers": text2ct_unet_kwargs(include_top_region_index_input=True,
                                              include_bottom_region_index_input=True, transformer_num_layers=2,
                                              num_channels=[8, 16, 16], attention_levels=[False, True, True],
                                              num_head_channels=[0, 8, 4]),
}


@pytest.mark.parametrize("case,backend", [(case, "torch") for case in UNET_CASES] + [("text2ct_shape", "cpp")])
def test_unet_matches_monai(case, backend):
    kw = UNET_CASES[case]
    ref = maisi_unet.DiffusionModelUNetMaisi(**kw).eval()
    randomize(ref, 2)
    ours = DiffusionUNet(**kw).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    b = 2
    x = torch.randn(b, 4, 8, 8, 16)
    args = dict(timesteps=torch.tensor([3.5, 811.0]))
    if kw["with_conditioning"]:
        args["context"] = torch.randn(b, 1, 12)
    if kw.get("num_class_embeds"):
        args["class_labels"] = torch.tensor([1, 7])
    if kw.get("include_spacing_input"):
        args["spacing_tensor"] = torch.tensor([[0.75, 0.75, 3.0], [1.5, 1.5, 1.5]])
    if kw.get("include_top_region_index_input"):
        args["top_region_index_tensor"] = torch.rand(b, 4)
        args["bottom_region_index_tensor"] = torch.rand(b, 4)
    with torch.no_grad(), ops.backend(backend):
        out_r = ref(x, **args)
        out = ours(x, **args)
    assert out.shape == out_r.shape
    assert rel_err(out, out_r) <= 1e-5


@pytest.mark.parametrize("case", list(UNET_CASES))
def test_fresh_unet_zeroes_the_parameters_monai_zeroes(case):
    """MONAI zero-initialises each residual branch's last conv and the output conv: a fresh UNet predicts 0."""
    def zeroed(model: torch.nn.Module) -> set[str]:
        return {k for k, p in model.state_dict().items() if p.numel() and not p.any()}
    kw = UNET_CASES[case]
    ref, ours = maisi_unet.DiffusionModelUNetMaisi(**kw), DiffusionUNet(**kw)
    assert zeroed(ours) == zeroed(ref) and any(k.endswith("conv2.conv.weight") for k in zeroed(ours))
    x = torch.randn(1, 4, 8, 8, 16)
    args = dict(context=torch.randn(1, 1, 12)) if kw["with_conditioning"] else {}
    if kw.get("num_class_embeds"):
        args["class_labels"] = torch.tensor([1])
    if kw.get("include_spacing_input"):
        args["spacing_tensor"] = torch.tensor([[0.75, 0.75, 3.0]])
    if kw.get("include_top_region_index_input"):
        args["top_region_index_tensor"] = args["bottom_region_index_tensor"] = torch.rand(1, 4)
    with torch.no_grad():
        assert not ours(x, torch.tensor([500.0]), **args).any()


def test_unet_without_context_when_dims_match():
    kw = text2ct_unet_kwargs(num_channels=[8, 16], attention_levels=[False, True], num_head_channels=[0, 8],
                             cross_attention_dim=16, num_class_embeds=None, include_spacing_input=False)
    ref = maisi_unet.DiffusionModelUNetMaisi(**kw).eval()
    randomize(ref, 4)
    ours = DiffusionUNet(**kw).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t = torch.randn(1, 4, 8, 8, 8), torch.tensor([500.0])
    with torch.no_grad():
        assert rel_err(ours(x, t), ref(x, t)) <= 1e-5


def test_unet_2d_matches_monai():
    kw = text2ct_unet_kwargs(spatial_dims=2)
    ref = maisi_unet.DiffusionModelUNetMaisi(**kw).eval()
    randomize(ref, 6)
    ours = DiffusionUNet(**kw).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    args = dict(timesteps=torch.tensor([10.0]), context=torch.randn(1, 1, 12), class_labels=torch.tensor([1]),
                spacing_tensor=torch.tensor([[1.0, 1.0, 2.0]]))
    x = torch.randn(1, 4, 16, 24)
    with torch.no_grad():
        assert rel_err(ours(x, **args), ref(x, **args)) <= 1e-5


def test_gradient_checkpointing_gives_same_gradients():
    kw = text2ct_unet_kwargs(num_channels=[8, 16], attention_levels=[False, True], num_head_channels=[0, 8])
    model = DiffusionUNet(**kw)
    randomize(model, 7)
    x = torch.randn(1, 4, 8, 8, 8)
    args = dict(timesteps=torch.tensor([250.0]), context=torch.randn(1, 1, 12), class_labels=torch.tensor([1]),
                spacing_tensor=torch.tensor([[0.75, 0.75, 3.0]]))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.set_gradient_checkpointing(ckpt)
        model(x, **args).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    assert grads[0].abs().sum() > 0


def test_full_text2ct_configs_match_monai_keys_and_size():
    """At full size (on the meta device: no memory), every key and shape matches; the UNet has 217.7 M params."""
    with torch.device("meta"):
        unet = DiffusionUNet()  # defaults are Text2CT's configuration
        ref = maisi_unet.DiffusionModelUNetMaisi(**{k: v for k, v in vars(unet.config).items()})
        vae = AutoencoderKL()
        ref_vae = maisi.AutoencoderKlMaisi(**vars(vae.config))
    for a, b in ((unet, ref), (vae, ref_vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(sa[k].shape == sb[k].shape for k in sa)
    n = sum(p.numel() for p in unet.parameters())
    assert abs(n / 1e6 - 217.7) < 0.05, n
