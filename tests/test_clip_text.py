"""CLIP text tower: parity with transformers, pooling/projection/normalisation, directory round trips."""
import os

import pytest
import torch
import torch.nn.functional as F

from text2ct_engine.models.clip_text import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTextTransformer)

VOCAB = 99


class _LazyTransformers:
    """Import transformers (a test-only dependency) on first use; skip just the tests that need it."""

    def __getattr__(self, name):
        return getattr(pytest.importorskip("transformers"), name)


transformers = _LazyTransformers()


def hf_config(act="quick_gelu", ctx=77, eos=2, proj=24):
    return transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=ctx, hidden_act=act, projection_dim=proj, eos_token_id=eos, bos_token_id=1,
        pad_token_id=0, layer_norm_eps=1e-5, attn_implementation="eager")


def make_ids(n, eos, batch=3, pad=0):
    """Rows: [bos, words..., eos, pad...] with different lengths; one row fills the whole context."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 60, (batch, n), generator=g)
    mask = torch.zeros(batch, n, dtype=torch.long)
    lengths = [n, n // 2, 3][:batch]
    for i, length in enumerate(lengths):
        ids[i, 0] = 1
        ids[i, length - 1] = eos
        ids[i, length:] = pad if pad is not None else eos
        mask[i, :length] = 1
    return ids, mask


def ours_from(hf_model, hf_cfg):
    model = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(hf_cfg.to_dict())).eval()
    model.load_hf_state_dict(hf_model.state_dict())
    return model


@pytest.mark.parametrize("act,ctx,eos", [("quick_gelu", 77, 2), ("gelu", 512, 98), ("quick_gelu", 512, 5)])
def test_parity_with_transformers(act, ctx, eos):
    cfg = hf_config(act, ctx, eos)
    hf = transformers.CLIPTextModelWithProjection(cfg).eval()
    ours = ours_from(hf, cfg)
    # legacy rule (eos id 2) pools at the highest id: the end token must be the vocabulary's last
    end = VOCAB - 1 if eos == 2 else eos
    ids, mask = make_ids(ctx, end, pad=end if eos != 2 else 0)
    for am in (None, mask):
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=am, output_hidden_states=False)
            out = ours(ids, am)
            ref_last = hf.text_model(input_ids=ids, attention_mask=am).last_hidden_state
        torch.testing.assert_close(out.last_hidden_state, ref_last, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(out.text_embeds, ref.text_embeds, atol=2e-5, rtol=1e-4)
    # the mask only touches padded positions: the pooled output is the same with and without it
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(ids, mask), ours.encode(ids), atol=1e-6, rtol=0)


def test_bare_text_model_loads_strict():
    cfg = hf_config(proj=24)
    hf = transformers.CLIPTextModel(cfg).eval()
    ours = CLIPTextTransformer(CLIPTextConfig.from_dict(cfg.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)  # names are exactly HF's
    ids, _ = make_ids(20, VOCAB - 1)
    with torch.no_grad():
        ref = hf(input_ids=ids)
        out = ours(ids)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=2e-5, rtol=1e-4)


def test_pooled_projected_normalised_by_value():
    cfg = CLIPTextConfig(vocab_size=50, max_position_embeddings=16, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=40, projection_dim=12, eos_token_id=7)
    model = CLIPTextModelWithProjection(cfg).eval()
    ids = torch.tensor([[1, 9, 9, 7, 7, 7, 7, 7], [1, 9, 7, 3, 3, 3, 3, 3], [1, 9, 9, 9, 9, 9, 9, 9]])
    with torch.no_grad():
        out = model(ids)
        emb = model.encode(ids)
        ctx = model.encode_context(ids)
    pos = [3, 2, 7]  # first end token; a row without one pools its last position
    for i, p in enumerate(pos):
        torch.testing.assert_close(out.pooler_output[i], out.last_hidden_state[i, p])
    manual = out.pooler_output @ model.text_projection.weight.t()
    torch.testing.assert_close(out.text_embeds, manual)
    torch.testing.assert_close(emb, manual / manual.norm(dim=-1, keepdim=True))
    assert ctx.shape == (3, 1, 12)
    torch.testing.assert_close(ctx.norm(dim=-1), torch.ones(3, 1))
    # legacy rule: highest id
    legacy = CLIPTextTransformer(CLIPTextConfig(vocab_size=50, max_position_embeddings=16, hidden_size=32,
                                                num_hidden_layers=1, num_attention_heads=2, intermediate_size=40,
                                                eos_token_id=2))
    assert legacy.pooled_positions(torch.tensor([[1, 5, 49, 0, 0]])).tolist() == [2]


def test_input_checks():
    cfg = CLIPTextConfig(vocab_size=50, max_position_embeddings=8, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=20, projection_dim=8)
    model = CLIPTextModelWithProjection(cfg)
    with pytest.raises(ValueError, match="more than the context length 8"):
        model(torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.ones(1, 4))
    with pytest.raises(ValueError, match="not divisible"):
        CLIPTextConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig(hidden_act="swiglu")


def test_save_load_round_trip(tmp_path):
    cfg = CLIPTextConfig(vocab_size=50, max_position_embeddings=12, hidden_size=16, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=20, projection_dim=8, hidden_act="gelu",
                         eos_token_id=1)
    model = CLIPTextModelWithProjection(cfg).eval()
    model.save_pretrained(tmp_path / "clip")
    assert sorted(os.listdir(tmp_path / "clip")) == ["config.json", "model.safetensors"]  # no temp files left
    back = CLIPTextModelWithProjection.from_pretrained(tmp_path / "clip")
    assert back.config == cfg
    ids = torch.tensor([[0, 5, 6, 1, 1], [0, 1, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(back.encode_context(ids), model.encode_context(ids), rtol=0, atol=0)
    half = CLIPTextModelWithProjection.from_pretrained(tmp_path / "clip", dtype=torch.float64)
    assert half.text_projection.weight.dtype == torch.float64


def test_directories_interchange_with_transformers(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = hf_config("gelu", 40, 98)
    hf = transformers.CLIPTextModelWithProjection(cfg).eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours = CLIPTextModelWithProjection.from_pretrained(tmp_path / "hf").eval()
    ids, _ = make_ids(40, 98)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).text_embeds, hf(input_ids=ids).text_embeds, atol=2e-5, rtol=1e-4)
    ours.save_pretrained(tmp_path / "ours")
    again = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).text_embeds, hf(input_ids=ids).text_embeds,
                                   atol=2e-5, rtol=1e-4)


def test_load_errors_are_one_line(tmp_path):
    cfg = CLIPTextConfig(vocab_size=50, max_position_embeddings=12, hidden_size=16, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=20, projection_dim=8)
    model = CLIPTextModelWithProjection(cfg)
    sd = model.state_dict()
    del sd["text_model.encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(ValueError) as err:
        CLIPTextModelWithProjection(cfg).load_hf_state_dict(sd)
    assert "missing 1 key(s): text_model.encoder.layers.1.mlp.fc2.bias" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="config.json is missing"):
        CLIPTextModelWithProjection.from_pretrained(tmp_path)


def test_gradient_checkpointing_text_same_grads():
    cfg = CLIPTextConfig(vocab_size=50, max_position_embeddings=12, hidden_size=16, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=20, projection_dim=8, eos_token_id=1)
    a = CLIPTextModelWithProjection(cfg)
    b = CLIPTextModelWithProjection(cfg, gradient_checkpointing=True)
    b.load_state_dict(a.state_dict())
    ids = torch.tensor([[0, 5, 6, 1], [0, 7, 1, 1]])
    for m in (a, b):
        m.encode(ids).pow(3).sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_bare_hf_text_model_directory_loads_without_projection(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = hf_config("gelu", 20, 98)
    hf = transformers.CLIPTextModel(cfg).eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours = CLIPTextModelWithProjection.from_pretrained(tmp_path / "hf").eval()
    assert ours.text_projection is None and ours.embed_dim == 32
    ids, _ = make_ids(20, 98)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(ids), F.normalize(hf(input_ids=ids).pooler_output, dim=-1),
                                   atol=2e-5, rtol=1e-4)


def test_text_tower_attention_goes_through_ops(monkeypatch):
    from text2ct_engine import ops
    calls = []
    real = ops.attention

    def spy(q, k, v, key_padding_mask=None, is_causal=False):
        calls.append(is_causal)
        return real(q, k, v, key_padding_mask, is_causal=is_causal)

    monkeypatch.setattr(ops, "attention", spy)
    cfg = CLIPTextConfig(vocab_size=50, max_position_embeddings=12, hidden_size=16, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=32, projection_dim=8)
    CLIPTextModelWithProjection(cfg).encode(torch.randint(0, 50, (2, 12)))
    assert calls == [True, True]
