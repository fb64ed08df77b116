"""Phantom data set -> latent cache -> python -m text2ct_engine.train ldm, end to end on CPU."""
import json

import torch

from text2ct_engine.data.cache import main as cache_main
from text2ct_engine.data.phantom import main as phantom_main
from text2ct_engine.pipeline import Text2CTPipeline
from text2ct_engine.train.__main__ import main as train_main

from tiny_models import tiny_text_pipeline


def test_phantoms_to_cache_to_trained_model(tmp_path, capsys):
    tiny_text_pipeline().save_pretrained(tmp_path / "base")
    assert phantom_main(["--n", "4", "--size", "32", "32", "16", "--spacing", "10", "10", "20",
                         "--out", str(tmp_path / "data"), "--seed", "1", "--workers", "1"]) == 0
    assert cache_main(["--data", str(tmp_path / "data"), "--vae", str(tmp_path / "base"), "--out",
                       str(tmp_path / "cache"), "--size", "32", "32", "16", "--spacing", "10", "10", "20",
                       "--dtype", "float32"]) == 0
    args = ["ldm", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "cache"), "--out",
            str(tmp_path / "run"), "--steps", "3", "--batch-size", "2", "--log-every", "1", "--scale-factor", "auto"]
    assert train_main(args) == 0
    out = capsys.readouterr()
    assert out.err.count("truncated") <= 1  # long reports: one note, not one warning per batch
    rows = [json.loads(l) for l in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 for r in rows)
    trained = Text2CTPipeline.from_pretrained(tmp_path / "run" / "model")
    base = Text2CTPipeline.from_pretrained(tmp_path / "base")
    assert trained.config.scale_factor != base.config.scale_factor  # 'auto' measured the cached latents
    changed = [k for k, v in trained.unet.state_dict().items() if not torch.equal(v, base.unet.state_dict()[k])]
    assert changed
    # a second run into the same folder needs --resume; a missing cache is one line
    assert train_main(args) == 2
    assert "--resume" in capsys.readouterr().err
    bad = ["ldm", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r2")]
    assert train_main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
