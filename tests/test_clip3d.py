"""3D ViT volume tower, CLIP3D (temperature, contrastive loss, directories) and the Text2CT CLIP converter."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import text2ct_engine.ops as ops
from text2ct_engine.models import (CLIP3D, CLIP3DConfig, CLIPTextConfig, CLIPTextModelWithProjection,
                                   CLIPVisionModel3D, VisionConfig3D, clip_contrastive_loss,
                                   convert_text2ct_clip_state_dict)

TEXT = CLIPTextConfig(vocab_size=40, max_position_embeddings=10, hidden_size=16, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=24, projection_dim=12, eos_token_id=1)


def vision_config(**kw):
    base = dict(in_channels=1, image_size=(8, 16, 16), patch_size=(4, 8, 8), hidden_size=16, num_hidden_layers=2,
                num_attention_heads=2, intermediate_size=24, projection_dim=12)
    base.update(kw)
    return VisionConfig3D(**base)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_forward_pooled_projected_normalised(pool):
    model = CLIPVisionModel3D(vision_config(pool=pool)).eval()
    vol = torch.randn(3, 1, 8, 16, 16)
    with torch.no_grad():
        out = model(vol)
        emb = model.encode(vol)
    tokens = 8 + (pool == "cls")
    assert out.last_hidden_state.shape == (3, tokens, 16)
    pooled = out.last_hidden_state[:, 0] if pool == "cls" else out.last_hidden_state.mean(1)
    torch.testing.assert_close(out.pooler_output, pooled)
    manual = pooled @ model.visual_projection.weight.t()
    torch.testing.assert_close(emb, manual / manual.norm(dim=-1, keepdim=True))
    # another grid resizes the position embeddings
    assert model.encode(torch.randn(2, 1, 12, 16, 32)).shape == (2, 12)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        model(torch.randn(1, 1, 8, 16, 15))
    with pytest.raises(ValueError, match=r"must be \(B, 1, D, H, W\)"):
        model(torch.randn(1, 2, 8, 16, 16))


def test_vit_attention_goes_through_ops(monkeypatch):
    calls = []
    real = ops.attention

    def spy(q, k, v, key_padding_mask=None, is_causal=False):
        calls.append(tuple(q.shape))
        return real(q, k, v, key_padding_mask, is_causal=is_causal)

    monkeypatch.setattr(ops, "attention", spy)
    CLIPVisionModel3D(vision_config())(torch.randn(2, 1, 8, 16, 16))
    assert calls == [(2, 2, 9, 8)] * 2


def test_vit_gradient_checkpointing_same_grads():
    a = CLIPVisionModel3D(vision_config())
    b = CLIPVisionModel3D(vision_config(gradient_checkpointing=True))
    b.load_state_dict(a.state_dict())
    assert b.vision_model.gradient_checkpointing and not a.vision_model.gradient_checkpointing
    vol = torch.randn(2, 1, 8, 16, 16)
    grads = []
    for m in (a, b):
        x = vol.clone().requires_grad_(True)
        (m.encode(x) * torch.linspace(-1, 1, 12)).sum().backward()
        grads.append([x.grad] + [p.grad for p in m.parameters()])
    for ga, gb in zip(*grads):
        assert ga is not None
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


def reference_loss(t, v, log_scale):
    """Symmetric InfoNCE written out with loops over the batch."""
    scale = math.exp(min(log_scale, math.log(100)))
    b = t.shape[0]
    sim = [[scale * float(t[i] @ v[j]) for j in range(b)] for i in range(b)]
    text_to_vol = -sum(sim[i][i] - math.log(sum(math.exp(sim[i][j]) for j in range(b))) for i in range(b)) / b
    vol_to_text = -sum(sim[j][j] - math.log(sum(math.exp(sim[i][j]) for i in range(b))) for j in range(b)) / b
    return (text_to_vol + vol_to_text) / 2


def test_contrastive_loss_by_hand():
    t = F.normalize(torch.randn(4, 6, dtype=torch.float64), dim=-1)
    v = F.normalize(torch.randn(4, 6, dtype=torch.float64), dim=-1)
    for log_scale in (math.log(1 / 0.07), 0.3, 7.0):  # 7.0 > log(100): capped
        got = clip_contrastive_loss(t, v, torch.tensor(log_scale))
        assert got.item() == pytest.approx(reference_loss(t, v, log_scale), rel=1e-5)
    # a perfect match with a sharp temperature has nearly zero loss
    assert clip_contrastive_loss(t, t.clone(), 4.6).item() < clip_contrastive_loss(t, v, 4.6).item()
    with pytest.raises(ValueError, match="must both be"):
        clip_contrastive_loss(t, v[:3], 1.0)


def test_contrastive_logits_stay_fp32_under_autocast():
    """Inside a training step's bf16 autocast the B x B logits (scaled up to 100) are still computed in fp32."""
    torch.manual_seed(0)
    t, v = (F.normalize(torch.randn(8, 64), dim=-1) for _ in range(2))
    scale = torch.tensor(math.log(100.0))
    plain = clip_contrastive_loss(t, v, scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (t @ v.t()).dtype == torch.bfloat16  # what autocast does to a matmul
        under = clip_contrastive_loss(t, v, scale)
    assert under.dtype == torch.float32 and torch.equal(under, plain)


def test_clip3d_forward_backward_and_round_trip(tmp_path):
    cfg = CLIP3DConfig(text_config=TEXT, vision_config=vision_config(projection_dim=None), projection_dim=12)
    model = CLIP3D(cfg)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    ids = torch.tensor([[0, 5, 6, 1, 1], [0, 7, 1, 1, 1], [0, 8, 9, 10, 1]])
    vol = torch.randn(3, 1, 8, 16, 16)
    out = model(ids, vol)
    assert out.logits_per_text.shape == (3, 3) and torch.equal(out.logits_per_volume, out.logits_per_text.t())
    torch.testing.assert_close(out.loss, clip_contrastive_loss(model.encode_text(ids), model.encode_volume(vol),
                                                               model.logit_scale))
    out.loss.backward()
    assert model.logit_scale.grad is not None
    assert model.text_model.embeddings.token_embedding.weight.grad.abs().sum() > 0
    assert model.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert model.encode_context(ids).shape == (3, 1, 12)

    model.eval()
    model.save_pretrained(tmp_path / "clip")
    assert sorted(os.listdir(tmp_path / "clip")) == ["config.json", "model.safetensors"]
    back = CLIP3D.from_pretrained(tmp_path / "clip")
    with torch.no_grad():
        torch.testing.assert_close(back.encode_text(ids), model.encode_text(ids), rtol=0, atol=0)
        torch.testing.assert_close(back.encode_volume(vol), model.encode_volume(vol), rtol=0, atol=0)
        # the pipeline needs only the text side: the tower loads from the same directory
        text = CLIPTextModelWithProjection.from_pretrained(tmp_path / "clip")
        torch.testing.assert_close(text.encode_context(ids), model.encode_context(ids), rtol=0, atol=0)
        torch.testing.assert_close(model.text_tower().encode(ids), model.encode_text(ids), rtol=0, atol=0)
        volume = CLIPVisionModel3D.from_pretrained(tmp_path / "clip")
        torch.testing.assert_close(volume.encode(vol), model.encode_volume(vol), rtol=0, atol=0)
    assert back.logit_scale.item() == model.logit_scale.item()


# ------------------------------------------------------------------------------------ converter

def text2ct_checkpoint(layout):
    """A Text2CT / CT-CLIP style checkpoint around a random text tower; returns (ckpt, reference tower)."""
    cfg = CLIPTextConfig(vocab_size=40, max_position_embeddings=12, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=24, projection_dim=20, eos_token_id=2)
    ref = CLIPTextModelWithProjection(cfg).eval()
    bare = {k[len("text_model."):]: v.clone() for k, v in ref.state_dict().items() if k.startswith("text_model.")}
    w = ref.text_projection.weight.detach().clone()
    if layout == "ctclip":  # CT-CLIP: text_transformer (HF v5 CLIPTextModel) + to_text_latent, inside "state_dict"
        sd = {"text_transformer." + k: v for k, v in bare.items()}
        sd["text_transformer.embeddings.position_ids"] = torch.arange(12)[None]  # old HF buffer: dropped
        sd.update({"to_text_latent.weight": w, "to_visual_latent.weight": torch.randn(20, 48),
                   "visual_transformer.patch.weight": torch.randn(48, 1, 2, 2, 2), "temperature": torch.tensor(1.0)})
        return {"state_dict": sd, "epoch": 3}, ref
    if layout == "hf_v4":  # wrapper around an HF v4 CLIPModel-like text part
        sd = {"model.text_model." + k: v for k, v in bare.items()}
        sd.update({"model.text_projection.weight": w, "model.logit_scale": torch.tensor(2.0),
                   "other.text_projection.weight": torch.randn(20, 32)})
        return sd, ref
    if layout == "openai":  # DataParallel prefix; OpenAI-style (hidden, P) projection parameter
        sd = {"module.text_model." + k: v for k, v in bare.items()}
        sd["module.text_projection"] = w.t().contiguous()
        return sd, ref
    if layout == "bare":  # HF v5 CLIPModel-like: tower keys at the top level, beside the vision side
        sd = dict(bare)
        sd.update({"text_projection.weight": w, "visual_projection.weight": torch.randn(20, 48),
                   "vision_model.embeddings.patch_embedding.weight": torch.randn(48, 1, 2, 2, 2)})
        return sd, ref
    raise AssertionError(layout)


@pytest.mark.parametrize("layout", ["ctclip", "hf_v4", "openai", "bare"])
def test_converter_on_synthetic_checkpoint(layout, tmp_path):
    ckpt, ref = text2ct_checkpoint(layout)
    cfg, sd = convert_text2ct_clip_state_dict(ckpt, num_attention_heads=2)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.max_position_embeddings, cfg.num_hidden_layers,
            cfg.intermediate_size, cfg.projection_dim) == (40, 32, 12, 2, 24, 20)
    model = CLIPTextModelWithProjection(cfg).eval()
    model.load_state_dict(sd, strict=True)
    ids = torch.tensor([[0, 5, 6, 39, 0], [0, 39, 0, 0, 0]])  # legacy pooling: highest id is the end token
    with torch.no_grad():
        torch.testing.assert_close(model.encode_context(ids), ref.encode_context(ids), rtol=0, atol=0)
    model.save_pretrained(tmp_path / "clip")  # what the convert CLI writes into <model>/clip
    assert CLIPTextModelWithProjection.from_pretrained(tmp_path / "clip").config == cfg


def test_converter_errors():
    ckpt, _ = text2ct_checkpoint("ctclip")
    sd = dict(ckpt["state_dict"])
    del sd["text_transformer.encoder.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(ValueError) as err:
        convert_text2ct_clip_state_dict(sd)
    msg = str(err.value)
    assert "missing 1 text tower key(s): text_transformer.encoder.layers.1.self_attn.k_proj.bias" in msg
    assert "\n" not in msg

    sd = dict(ckpt["state_dict"])
    del sd["to_text_latent.weight"]
    with pytest.raises(ValueError, match="missing the text projection weight"):
        convert_text2ct_clip_state_dict(sd)
    with pytest.raises(ValueError, match="no text tower found"):
        convert_text2ct_clip_state_dict({"visual.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="does not match the given config"):
        convert_text2ct_clip_state_dict(ckpt, config=TEXT)
    sd = dict(ckpt["state_dict"])
    sd["text_transformer.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(24, 31)
    with pytest.raises(ValueError, match=r"wrong shape for text_transformer.encoder.layers.0.mlp.fc1.weight \(24, 31"):
        convert_text2ct_clip_state_dict(sd)
