"""python -m text2ct_engine.convert: MONAI/Text2CT checkpoints -> model directory, and its one-line errors."""
import json
import os
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch

from text2ct_engine.convert import main
from text2ct_engine.pipeline import Text2CTPipeline

maisi_unet = pytest.importorskip("monai.apps.generation.maisi.networks.diffusion_model_unet_maisi")
maisi_vae = pytest.importorskip("monai.apps.generation.maisi.networks.autoencoderkl_maisi")

UNET_KW = dict(spatial_dims=3, in_channels=4, out_channels=4, num_res_blocks=1, num_channels=[8, 16],
               attention_levels=[False, True], norm_num_groups=4, resblock_updown=True, num_head_channels=[0, 8],
               with_conditioning=True, cross_attention_dim=16, num_class_embeds=128, include_fc=True,
               include_spacing_input=True)
VAE_KW = dict(spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=[1, 1], num_channels=[8, 8],
              attention_levels=[False, False], latent_channels=4, norm_num_groups=4)


class NotWeights:  # pickled as a class instance: needs code to load
    pass


@pytest.fixture
def checkpoints(tmp_path):
    torch.manual_seed(0)
    unet = maisi_unet.DiffusionModelUNetMaisi(**UNET_KW)
    vae = maisi_vae.AutoencoderKlMaisi(**VAE_KW, num_splits=1)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.1)
    torch.save({"unet_state_dict": unet.state_dict(), "scale_factor": torch.tensor(0.875), "epoch": 12},
               tmp_path / "unet.pt")
    torch.save(OrderedDict((f"module.{k}", v) for k, v in vae.state_dict().items()), tmp_path / "vae.pt")
    (tmp_path / "unet.json").write_text(json.dumps(UNET_KW))
    (tmp_path / "vae.json").write_text(json.dumps(VAE_KW))
    return tmp_path, unet.eval(), vae.eval()


def run(tmp, *extra):
    return main(["--unet", str(tmp / "unet.pt"), "--vae", str(tmp / "vae.pt"), "--unet-config",
                 str(tmp / "unet.json"), "--vae-config", str(tmp / "vae.json"), *extra])


def test_convert_round_trips_monai_outputs(checkpoints, capsys):
    tmp, unet, vae = checkpoints
    assert run(tmp, "--out", str(tmp / "model")) == 0
    out = capsys.readouterr().out
    assert "from unet_state_dict" in out and "module. prefix removed" in out and "scale_factor: 0.875" in out
    pipe = Text2CTPipeline.from_pretrained(tmp / "model")
    assert pipe.config.scale_factor == pytest.approx(0.875)
    x, t = torch.randn(1, 4, 8, 8, 8), torch.tensor([300.0])
    args = dict(context=torch.randn(1, 1, 16), class_labels=torch.tensor([1]),
                spacing_tensor=torch.tensor([[75.0, 75.0, 300.0]]))
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, **args), unet(x, t, **args), rtol=1e-5, atol=1e-6)
        z = torch.randn(1, 4, 4, 4, 4)
        torch.testing.assert_close(pipe.vae.decode(z), vae.decode(z), rtol=1e-5, atol=1e-6)


def test_convert_errors_are_one_line_and_write_nothing(checkpoints, capsys):
    tmp, _, _ = checkpoints
    out = str(tmp / "model")
    torch.save({"weights": NotWeights()}, tmp / "evil.pt")
    (tmp / "junk.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"epoch": 3, "optimizer": {"lr": torch.tensor(1.0)}}, tmp / "nosd.pt")
    sd = torch.load(tmp / "unet.pt", weights_only=True)
    sd["unet_state_dict"].pop("conv_in.conv.weight")
    torch.save(sd, tmp / "missing.pt")
    cases = {
        "refused, it needs code": ["--unet", str(tmp / "evil.pt")],
        "not a readable PyTorch checkpoint": ["--unet", str(tmp / "junk.pt")],
        "no state dict found": ["--unet", str(tmp / "nosd.pt")],
        "missing 1 key(s): conv_in.conv.weight": ["--unet", str(tmp / "missing.pt")],
        "no such file": ["--vae", str(tmp / "absent.pt")],
        "holds autoencoder weights (encoder./decoder. keys), not a diffusion UNet: are --unet and --vae swapped?":
            ["--unet", str(tmp / "vae.pt")],
    }
    for expected, swap in cases.items():
        args = ["--unet", str(tmp / "unet.pt"), "--vae", str(tmp / "vae.pt"), "--unet-config",
                str(tmp / "unet.json"), "--vae-config", str(tmp / "vae.json"), "--out", out]
        i = args.index(swap[0])
        args[i + 1] = swap[1]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, err
        assert not os.path.exists(out)
    # wrong architecture: the default (full Text2CT) UNet config against tiny weights
    assert main(["--unet", str(tmp / "unet.pt"), "--vae", str(tmp / "vae.pt"), "--vae-config",
                 str(tmp / "vae.json"), "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not fit DiffusionUNet" in err and "--unet-config" in err
    assert [p for p in os.listdir(tmp) if p.startswith(".tmp-")] == []


def test_convert_refuses_existing_output_without_force(checkpoints, capsys):
    tmp, _, _ = checkpoints
    (tmp / "model").mkdir()
    (tmp / "model" / "keep.txt").write_text("mine")
    assert run(tmp, "--out", str(tmp / "model")) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp / "model" / "keep.txt").read_text() == "mine"
    # --force replaces only a model directory (or an empty folder), never someone's other files
    assert run(tmp, "--out", str(tmp / "model"), "--force") == 2
    assert "holds no pipeline.json" in capsys.readouterr().err
    assert sorted(os.listdir(tmp / "model")) == ["keep.txt"]
    os.remove(tmp / "model" / "keep.txt")
    assert run(tmp, "--out", str(tmp / "model"), "--force") == 0  # empty: replaced
    (tmp / "model" / "stale.txt").write_text("old run")
    assert run(tmp, "--out", str(tmp / "model"), "--force") == 0  # a model directory: replaced, not merged
    assert sorted(os.listdir(tmp / "model")) == ["pipeline.json", "unet", "vae"]


def _one_error_before_loading(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "unet:" not in captured.out  # refused before any checkpoint was read
    return err[0]


def test_force_never_replaces_the_working_folder_or_the_inputs(checkpoints, capsys, monkeypatch):
    tmp, _, _ = checkpoints
    before = sorted(os.listdir(tmp))
    monkeypatch.chdir(tmp)
    for out in (".", "..", str(tmp), str(tmp.parent)):
        assert run(tmp, "--out", out, "--force") == 2
        assert "current folder or above it" in _one_error_before_loading(capsys), out
    store = tmp / "store"  # a model directory that also holds an input checkpoint
    store.mkdir()
    (store / "pipeline.json").write_text("{}")
    os.replace(tmp / "vae.pt", store / "vae.pt")
    assert main(["--unet", str(tmp / "unet.pt"), "--vae", str(store / "vae.pt"), "--unet-config",
                 str(tmp / "unet.json"), "--vae-config", str(tmp / "vae.json"), "--out", str(store), "--force"]) == 2
    assert f"holds the input {store / 'vae.pt'}" in _one_error_before_loading(capsys)
    assert sorted(os.listdir(store)) == ["pipeline.json", "vae.pt"]
    os.replace(store / "vae.pt", tmp / "vae.pt")
    (tmp / "afile").write_text("x")
    assert run(tmp, "--out", str(tmp / "afile"), "--force") == 2  # a file is not a model directory
    assert "it is a file" in _one_error_before_loading(capsys)
    assert sorted(os.listdir(tmp)) == sorted([*before, "store", "afile"])


def test_output_location_is_checked_before_loading(checkpoints, capsys):
    tmp, _, _ = checkpoints
    (tmp / "afile").write_text("x")
    assert run(tmp, "--out", str(tmp / "afile" / "sub")) == 2
    assert "afile is a file, not a folder" in _one_error_before_loading(capsys)
    if sys.platform.startswith("linux") and os.path.isdir("/sys"):  # sysfs: no new files, even for root
        assert run(tmp, "--out", "/sys/text2ct-model") == 2  # root passes os.access: the probe is for real
        assert "folder /sys is not writable" in _one_error_before_loading(capsys)


@pytest.mark.parametrize("value, expected", [("0", "must be > 0"), ("-1", "must be > 0"),
                                             ("nan", "finite number"), ("inf", "finite number")])
def test_bad_scale_factor_option_is_refused_up_front(checkpoints, capsys, value, expected):
    tmp, _, _ = checkpoints
    assert run(tmp, "--out", str(tmp / "model"), "--scale-factor", value) == 2
    err = _one_error_before_loading(capsys)
    assert err.startswith("error: --scale-factor: scale_factor") and expected in err, err
    assert not os.path.exists(tmp / "model")


@pytest.mark.parametrize("stored, expected", [
    (torch.tensor([1.0, 2.0]), "scale_factor is a tensor of shape (2,), not one number"),
    ("abc", "scale_factor must be a finite number, got 'abc'"),
    (float("nan"), "scale_factor must be a finite number, got nan"),
    (torch.tensor(0.0), "scale_factor must be > 0"),
])
def test_bad_scale_factor_in_checkpoint_is_named(checkpoints, capsys, stored, expected):
    tmp, _, _ = checkpoints
    ckpt = torch.load(tmp / "unet.pt", weights_only=True)
    ckpt["scale_factor"] = stored
    torch.save(ckpt, tmp / "unet.pt")
    assert run(tmp, "--out", str(tmp / "model")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and "--scale-factor" in err[0], err
    assert not os.path.exists(tmp / "model")


def test_convert_cli_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "text2ct_engine.convert", "--unet", str(tmp_path / "a.pt"),
                        "--vae", str(tmp_path / "b.pt"), "--out", str(tmp_path / "m")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: --unet {tmp_path / 'a.pt'}: no such file"]


def test_settings_and_inputs_are_checked_before_any_checkpoint_is_read(checkpoints, capsys, monkeypatch):
    """A bad --vae path, layout or size is one line before the (217 M-parameter) UNet checkpoint is loaded."""
    import text2ct_engine.convert as convert_mod

    tmp, _, _ = checkpoints
    loaded = []
    real_load = convert_mod.load_checkpoint
    monkeypatch.setattr(convert_mod, "load_checkpoint", lambda path: loaded.append(path) or real_load(path))
    bad_layout = tmp / "bad.json"
    bad_layout.write_text(json.dumps({**UNET_KW, "norm_num_groups": 3}))
    for extra, expected in ((["--vae", str(tmp / "none.pt")], "--vae"),
                            (["--unet-config", str(bad_layout)], "invalid DiffusionUNet settings"),
                            (["--size", "101", "64", "32"], "--size / --spacing"),
                            (["--spacing", "0", "1", "1"], "--size / --spacing"),
                            (["--clip", str(tmp / "unet.pt")], "pass --tokenizer")):
        assert run(tmp, "--out", str(tmp / "model"), *extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (extra, err)
    assert loaded == [] and not os.path.exists(tmp / "model")
    assert run(tmp, "--out", str(tmp / "model"), "--size", "64", "64", "32", "--spacing", "6", "6", "12") == 0
    config = json.loads((tmp / "model" / "pipeline.json").read_text())
    assert config["size"] == [64, 64, 32] and config["spacing"] == [6.0, 6.0, 12.0]


def test_convert_with_text2ct_clip_checkpoint(checkpoints, capsys):
    from tiny_models import tiny_text_side
    tmp, _, _ = checkpoints
    encoder, tok = tiny_text_side()
    # Text2CT / CT-CLIP layout: the HF text model under text_transformer., projection as to_text_latent
    sd = {f"text_transformer.{k}": v for k, v in encoder.text_model.state_dict().items()}
    sd["to_text_latent.weight"] = encoder.text_projection.weight.detach().clone()
    sd["visual_transformer.patch.weight"] = torch.randn(4, 4)  # the volume tower is not needed for sampling
    torch.save({"state_dict": sd}, tmp / "clip.pt")
    tok.save(tmp / "tokenizer.json")
    (tmp / "clip.json").write_text(json.dumps({"num_attention_heads": 2}))  # weights cannot tell the heads
    assert run(tmp, "--out", str(tmp / "model"), "--clip", str(tmp / "clip.pt"), "--tokenizer",
               str(tmp / "tokenizer.json"), "--clip-config", str(tmp / "clip.json")) == 0
    assert "clip text tower: a 1-layer text tower (16 wide, 2 heads of 8, as given)" in capsys.readouterr().out
    assert run(tmp, "--out", str(tmp / "guessed"), "--clip", str(tmp / "clip.pt"), "--tokenizer",
               str(tmp / "tokenizer.json")) == 0  # without --clip-config the log says where the head count came from
    assert "1 head of 16, CLIP's 64-wide rule" in capsys.readouterr().out
    pipe = Text2CTPipeline.from_pretrained(tmp / "model")
    prompt = ["Findings: Cardiomegaly. Impression: Heart."]
    ids = tok.encode(prompt)
    with torch.no_grad():
        torch.testing.assert_close(pipe.encode_prompts(prompt), encoder.encode_context(ids.input_ids))
    # a tokenizer smaller than the tower's table is taken, with a warning (a tower's own fills its table)
    from text2ct_engine.tokenizer import CLIPTokenizer
    from tiny_models import REPORTS
    CLIPTokenizer.train(REPORTS, vocab_size=270, min_frequency=1, context_length=64).save(tmp / "small.json")
    capsys.readouterr()
    assert run(tmp, "--out", str(tmp / "m3"), "--clip", str(tmp / "clip.pt"), "--tokenizer",
               str(tmp / "small.json"), "--clip-config", str(tmp / "clip.json")) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    expected = f"has 270 tokens, the text tower of {tmp / 'clip.pt'} embeds {tok.vocab_size}"
    assert len(warned) == 1 and expected in warned[0], warned
    # a CLIP checkpoint without its tokenizer is refused in one line
    assert run(tmp, "--out", str(tmp / "m2"), "--clip", str(tmp / "clip.pt")) == 2
    assert "needs its tokenizer" in capsys.readouterr().err
    assert not os.path.exists(tmp / "m2")
