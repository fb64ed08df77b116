"""The linear probe reads labels an embedding carries and no more than the majority from one that does not."""
import pytest
import torch

from text2ct_engine.evaluate.probe import linear_probe


def make(n, gen, informative):
    y = (torch.rand(n, 3, generator=gen) < torch.tensor([0.3, 0.5, 0.2])).double()
    noise = torch.randn(n, 9, generator=gen, dtype=torch.float64)
    if informative:  # labels 0 and 1 written (noisily) into two dimensions, label 2 nowhere
        noise[:, :2] += 4.0 * (y[:, :2] - 0.5)
    return noise, y


def test_probe_reads_what_is_there_and_nothing_else():
    gen = torch.Generator().manual_seed(3)
    (xa, ya), (xb, yb) = make(300, gen, True), make(200, gen, True)
    out = linear_probe(xa, ya, xb, yb)
    assert out["kept"] == [0, 1, 2]
    acc, maj = out["accuracy"], out["majority"]
    assert acc[0] > 0.95 and acc[1] > 0.95  # separable up to the noise: Phi(2) ~ 0.977
    assert abs(acc[2] - maj[2]) < 0.06  # carries nothing: about the majority answer
    assert maj[1] == pytest.approx(max(yb[:, 1].mean().item(), 1 - yb[:, 1].mean().item()), abs=0.2)


def test_constant_labels_are_left_out_and_bad_shapes_refused():
    gen = torch.Generator().manual_seed(4)
    x, y = make(50, gen, True)
    y[:, 2] = 0.0
    assert linear_probe(x, y, x, y)["kept"] == [0, 1]
    with pytest.raises(ValueError, match="must be \\(N, L\\)"):
        linear_probe(x, y[:, :2], x, y)
    with pytest.raises(ValueError, match="nothing to probe"):
        linear_probe(x, torch.zeros_like(y), x, y)


def load_script():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "phantom_model",
                        "probe_text.py")
    spec = importlib.util.spec_from_file_location("probe_text", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_probe_script_on_a_tiny_text_tower(tmp_path, capsys):
    import json

    from text2ct_engine.data.phantom import make_dataset
    from text2ct_engine.text import save_text_side
    from text2ct_engine.tokenizer import CLIPTokenizer
    from text2ct_engine.train.clip import fresh_clip
    from text2ct_engine.train.common import held_out_split

    size = (16, 16, 8)
    make_dataset(str(tmp_path / "data"), 12, size, spacing=(24.0, 24.0, 48.0), seed=0, progress=False)
    make_dataset(str(tmp_path / "data"), 6, size, spacing=(24.0, 24.0, 48.0), seed=1, split="valid", force=True,
                 progress=False)
    train, _ = held_out_split(str(tmp_path / "data"), size, None, "resize", 0)
    tok = CLIPTokenizer.train([r.text for r in train.records], vocab_size=400, min_frequency=1, context_length=512)
    model = fresh_clip(tok, size, {"text_config": dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=32),
                                   "vision_config": dict(patch_size=[4, 8, 8], hidden_size=16, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=32),
                                   "projection_dim": 16})
    save_text_side(tmp_path / "m", model, tok)
    script = load_script()
    argv = ["--model", str(tmp_path / "m"), "--data", str(tmp_path / "data"), "--json", str(tmp_path / "p.json")]
    assert script.main(argv) == 0
    out = json.loads((tmp_path / "p.json").read_text())
    assert (out["n_train"], out["n_valid"]) == (12, 6) and out["rows"]
    for row in out["rows"]:  # a majority over 6 held-out reports is a multiple of 1/6
        assert 0.0 <= row["accuracy"] <= 1.0 and round(row["majority"] * 6, 6) % 1 == 0
    assert "mean" in capsys.readouterr().out
    assert script.main(argv) == 2  # an existing --json needs --force
    assert "already exists" in capsys.readouterr().err
    assert script.main(argv + ["--force"]) == 0
