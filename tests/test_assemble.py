"""python -m text2ct_engine.assemble: trained VAE + CLIP text side + a seeded new UNet -> a model directory that
loads, samples and trains; bad inputs are one line and write nothing."""
import json

import pytest
import torch
from safetensors.torch import load_file

from text2ct_engine.assemble import main
from text2ct_engine.pipeline import Text2CTPipeline

from tiny_models import CONTEXT_DIM, tiny_text_pipeline

UNET = dict(num_channels=[8, 16], attention_levels=[False, True], num_head_channels=[0, 8], num_res_blocks=1,
            norm_num_groups=4)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A trained-looking model directory (its vae/ and its clip/ + tokenizer.json are the inputs) and a UNet
    layout without a cross-attention width (assemble takes the CLIP's)."""
    root = tmp_path_factory.mktemp("assemble")
    tiny_text_pipeline().save_pretrained(root / "trained")
    (root / "unet.json").write_text(json.dumps(UNET))
    return root


def argv(parts, out, *extra):
    return ["--vae", str(parts / "trained" / "vae"), "--clip", str(parts / "trained"), "--out", str(out),
            "--unet-config", str(parts / "unet.json"), "--size", "32", "32", "16", "--spacing", "6", "6", "12",
            *extra]


def test_assembles_a_model_directory_that_samples(parts, tmp_path):
    assert main(argv(parts, tmp_path / "m")) == 0
    pipe = Text2CTPipeline.from_pretrained(tmp_path / "m")
    source = Text2CTPipeline.from_pretrained(parts / "trained")
    for mine, theirs in ((pipe.vae, source.vae), (pipe.text_encoder, source.text_encoder)):
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert pipe.unet.config.cross_attention_dim == CONTEXT_DIM == pipe.text_encoder.embed_dim
    assert tuple(pipe.config.size) == (32, 32, 16) and tuple(pipe.config.spacing) == (6.0, 6.0, 12.0)
    assert pipe.config.scale_factor == 1.0
    volume = pipe(["Findings: Bilateral pleural effusion."], steps=1, seed=0)
    assert volume.shape == (1, 32, 32, 16) and torch.isfinite(volume).all()


def test_the_same_seed_gives_the_same_unet_and_another_seed_another(parts, tmp_path):
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert main(argv(parts, tmp_path / name, "--seed", seed)) == 0
    a, b, c = (load_file(tmp_path / name / "unet" / "model.safetensors") for name in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def one_error_line(capsys, args) -> str:
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_inputs_are_one_line_and_write_nothing(parts, tmp_path, capsys):
    out = tmp_path / "m"
    assert "divisible by" in one_error_line(capsys, argv(parts, out, "--size", "30", "32", "16"))
    wide = tmp_path / "wide.json"
    wide.write_text(json.dumps({**UNET, "cross_attention_dim": 32}))
    line = one_error_line(capsys, argv(parts, out, "--unet-config", str(wide)))
    assert "cross_attention_dim 32" in line and f"{CONTEXT_DIM} wide" in line
    line = one_error_line(capsys, ["--vae", str(parts / "trained" / "vae"), "--clip", str(parts / "trained" / "vae"),
                                   "--out", str(out), "--size", "32", "32", "16", "--spacing", "6", "6", "12"])
    assert "holds no clip/" in line
    assert "--steps: steps must be at least 1" in one_error_line(capsys, argv(parts, out, "--steps", "0"))
    assert "--guidance" in one_error_line(capsys, argv(parts, out, "--guidance", "nan"))
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    assert "cannot read the UNet config" in one_error_line(capsys, argv(parts, out, "--unet-config", str(broken)))
    missing = argv(parts, out)
    missing[1] = str(tmp_path / "none")  # --vae
    assert "does not exist" in one_error_line(capsys, missing)
    assert not out.exists()
    assert main(argv(parts, out)) == 0
    before = (out / "pipeline.json").read_text()
    assert "--force" in one_error_line(capsys, argv(parts, out, "--seed", "5"))
    assert (out / "pipeline.json").read_text() == before
    assert main(argv(parts, out, "--seed", "5", "--force")) == 0
