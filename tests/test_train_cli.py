"""Phantom data set -> latent cache -> python -m text2ct_engine.train ldm, end to end on CPU: repeatable,
exactly resumable, and a cache that does not fit the model refused in one line."""
import json

import pytest
import torch
from safetensors.torch import load_file

from text2ct_engine.data.cache import main as cache_main
from text2ct_engine.data.phantom import main as phantom_main
from text2ct_engine.pipeline import Text2CTPipeline
from text2ct_engine.train.__main__ import main as train_main

from tiny_models import tiny_text_pipeline

SIZE, SPACING = ["32", "32", "16"], ["10", "10", "20"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny model directory, four phantoms and their latent cache."""
    root = tmp_path_factory.mktemp("train_cli")
    tiny_text_pipeline().save_pretrained(root / "base")
    assert phantom_main(["--n", "4", "--size", *SIZE, "--spacing", *SPACING, "--out", str(root / "data"),
                         "--seed", "1", "--workers", "1", "--quiet"]) == 0
    assert cache(root, root / "base", root / "cache") == 0
    return root


def cache(root, vae, out, size=SIZE):
    return cache_main(["--data", str(root / "data"), "--vae", str(vae), "--out", str(out), "--size", *size,
                       "--spacing", *SPACING, "--dtype", "float32", "--device", "cpu"])


def ldm_args(made, out, *extra, data=None):
    return ["ldm", "--model", str(made / "base"), "--data", str(data or made / "cache"), "--out", str(out),
            "--batch-size", "2", "--log-every", "1", "--scale-factor", "auto", *extra]


def loss_rows(run):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "loss.jsonl").read_text().splitlines()]


def same_checkpoint_weights(a, b):
    wa, wb = (load_file(run / "checkpoint" / "model.safetensors") for run in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def error_line(capsys, argv) -> str:
    capsys.readouterr()
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_phantoms_to_cache_to_trained_model(made, tmp_path, capsys):
    args = ldm_args(made, tmp_path / "run", "--steps", "3")
    assert train_main(args) == 0
    out = capsys.readouterr()
    assert out.err.count("truncated") <= 1  # long reports: one note, not one warning per batch
    rows = loss_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 for r in rows)
    trained = Text2CTPipeline.from_pretrained(tmp_path / "run" / "model")
    base = Text2CTPipeline.from_pretrained(made / "base")
    assert trained.config.scale_factor != base.config.scale_factor  # 'auto' measured the cached latents
    changed = [k for k, v in trained.unet.state_dict().items() if not torch.equal(v, base.unet.state_dict()[k])]
    assert changed
    # a second run into the same folder needs --resume; a missing cache is one line
    assert "--resume" in error_line(capsys, args)
    bad = ["ldm", "--model", str(made / "base"), "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r2")]
    error_line(capsys, bad)


def test_same_seed_same_run_and_resume_is_bit_exact(made, tmp_path, capsys):
    torch.manual_seed(123)  # the global RNG's state must not matter
    assert train_main(ldm_args(made, tmp_path / "a", "--steps", "4", "--save-every", "2")) == 0
    assert train_main(ldm_args(made, tmp_path / "b", "--steps", "4", "--save-every", "2")) == 0
    assert loss_rows(tmp_path / "a") == loss_rows(tmp_path / "b")
    assert same_checkpoint_weights(tmp_path / "a", tmp_path / "b")
    assert train_main(ldm_args(made, tmp_path / "c", "--steps", "2")) == 0
    capsys.readouterr()
    assert train_main(ldm_args(made, tmp_path / "c", "--steps", "4", "--resume")) == 0
    assert "of the resumed run" in capsys.readouterr().out  # auto's scale factor is kept, not measured again
    assert loss_rows(tmp_path / "c") == loss_rows(tmp_path / "a")
    assert same_checkpoint_weights(tmp_path / "a", tmp_path / "c")
    scale = [Text2CTPipeline.from_pretrained(tmp_path / r / "model").config.scale_factor for r in "ac"]
    assert scale[0] == scale[1]


def test_resume_needs_no_setting_typed_again(made, tmp_path, capsys):
    typed = ["--lr", "3e-4", "--cond-drop-prob", "0.25", "--no-gradient-checkpointing", "--save-every", "2"]
    assert train_main(ldm_args(made, tmp_path / "a", "--steps", "4", *typed)) == 0
    assert train_main(ldm_args(made, tmp_path / "b", "--steps", "2", *typed)) == 0
    capsys.readouterr()
    bare = ["ldm", "--model", str(made / "base"), "--data", str(made / "cache"), "--out", str(tmp_path / "b"),
            "--resume"]
    assert train_main([*bare, "--steps", "4"]) == 0  # batch size, lr, ..., auto's scale factor: the run's
    out = capsys.readouterr().out
    assert "the run's settings" in out and "batch_size 2" in out and "lr 0.0003" in out, out
    assert "steps" not in out.split("the run's settings")[1].splitlines()[0]  # typed: not taken
    assert "of the resumed run" in out
    assert loss_rows(tmp_path / "a") == loss_rows(tmp_path / "b")
    assert same_checkpoint_weights(tmp_path / "a", tmp_path / "b")
    line = error_line(capsys, [*bare, "--steps", "6", "--lr", "1e-3"])  # a typed change to the math: refused
    assert "lr 0.0003 -> 0.001" in line
    line = error_line(capsys, [*bare, "--steps", "6", "--scale-factor", "0.5"])
    assert "scale_factor" in line
    assert train_main([*bare, "--steps", "5", "--gradient-checkpointing", "--ema-offload"]) == 0  # free to switch
    state = tmp_path / "b" / "checkpoint" / "state.json"
    saved = json.loads(state.read_text())
    saved["config"]["mixed_precision"] = "bf16"  # as a run on a GPU records it
    state.write_text(json.dumps(saved))
    assert "mixed_precision bf16 -> no" in error_line(capsys, [*bare, "--steps", "6"])  # not switched silently


def test_auto_scale_factor_comes_from_the_checkpoint_on_resume(made, tmp_path):
    assert train_main(ldm_args(made, tmp_path, "--steps", "1")) == 0
    state = tmp_path / "checkpoint" / "state.json"
    saved = json.loads(state.read_text())
    saved["config"]["scale_factor"] = 0.625  # what the run started with, whatever a new measurement says
    state.write_text(json.dumps(saved))
    assert train_main(ldm_args(made, tmp_path, "--steps", "2", "--resume")) == 0
    assert Text2CTPipeline.from_pretrained(tmp_path / "model").config.scale_factor == 0.625


def test_a_cache_that_does_not_fit_the_model_is_one_line(made, tmp_path, capsys):
    from text2ct_engine.models import AutoencoderKL

    assert cache(made, made / "base", tmp_path / "odd", size=["20", "20", "16"]) == 0  # latents 5 x 5 x 4
    line = error_line(capsys, ldm_args(made, tmp_path / "r1", "--steps", "1", data=tmp_path / "odd"))
    assert "shape (4, 5, 5, 4)" in line and "sizes divisible by 2" in line
    def cache_with_vae(name, seed, latent_channels):  # a tiny VAE of its own, and a cache made with it
        torch.manual_seed(seed)
        AutoencoderKL(num_channels=[8, 8, 16], num_res_blocks=[1, 1, 1], attention_levels=[False] * 3,
                      norm_num_groups=4, latent_channels=latent_channels).save_pretrained(tmp_path / name)
        assert cache(made, tmp_path / name, tmp_path / f"c_{name}") == 0
        return tmp_path / f"c_{name}"

    c8 = cache_with_vae("vae8", 0, 8)
    line = error_line(capsys, ldm_args(made, tmp_path / "r2", "--steps", "1", data=c8))
    assert "shape (8, 8, 8, 4)" in line and "takes 4 channels" in line
    c_other = cache_with_vae("other", 5, 4)
    line = error_line(capsys, ldm_args(made, tmp_path / "r3", "--steps", "1", data=c_other))
    assert "encoded by another VAE" in line and "--allow-other-vae" in line
    assert not any((tmp_path / r).exists() for r in ("r1", "r2", "r3"))  # refused before any training
    assert train_main(ldm_args(made, tmp_path / "r3", "--steps", "1", "--allow-other-vae", data=c_other)) == 0
    # the same VAE under another path (a copy of the model directory) is fine
    import shutil
    shutil.copytree(made / "base", tmp_path / "copy")
    assert train_main(["ldm", "--model", str(tmp_path / "copy"), "--data", str(made / "cache"), "--out",
                       str(tmp_path / "r4"), "--steps", "1", "--batch-size", "2"]) == 0


@pytest.mark.parametrize("flag", ["--log-every", "--save-every", "--batch-size", "--steps"])
def test_zero_interval_is_one_line(made, tmp_path, capsys, flag):
    line = error_line(capsys, ldm_args(made, tmp_path / "run", *(["--steps", "2"] if flag != "--steps" else []),
                                       flag, "0"))
    assert "must be at least 1, got 0" in line and flag in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag,value,expected", [("--lr", "-1", "finite number > 0"), ("--lr", "nan", "> 0"),
                                                 ("--grad-clip", "0", "> 0"), ("--warmup-steps", "-3", ">= 0"),
                                                 ("--ema-decay", "1.5", "between 0 and 1")])
def test_bad_optimizer_setting_is_one_line_before_the_run_folder(made, tmp_path, capsys, flag, value, expected):
    line = error_line(capsys, ldm_args(made, tmp_path / "run", "--steps", "2", flag, value))
    assert expected in line and flag in line, line
    assert not (tmp_path / "run").exists()


def test_resume_without_a_checkpoint_says_it_starts_a_new_run(made, tmp_path, capsys):
    capsys.readouterr()
    assert train_main(ldm_args(made, tmp_path / "typo", "--steps", "1", "--resume")) == 0
    assert "holds no checkpoint yet: starting a new run" in capsys.readouterr().err


def test_ema_decay_zero_still_means_off(made, tmp_path):
    from text2ct_engine.train.common import check_optimizer_settings
    from text2ct_engine.train.ldm import LDMTrainConfig

    check_optimizer_settings(LDMTrainConfig(ema_decay=0.0))  # the trainers read 0 as "no EMA"
    with pytest.raises(ValueError, match="between 0 and 1"):
        check_optimizer_settings(LDMTrainConfig(ema_decay=-0.5))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("trainer", ["ldm", "vae", "clip"])
def test_cuda_device_without_a_gpu_is_one_line(made, tmp_path, capsys, trainer):
    run = tmp_path / "run"
    argv = {"ldm": ldm_args(made, run, "--steps", "1"),
            "vae": ["vae", "--data", str(made / "data"), "--out", str(run), "--size", *SIZE, "--spacing", *SPACING,
                    "--patch-size", "16", "16", "16", "--steps", "1"],
            "clip": ["clip", "--data", str(made / "data"), "--out", str(run), "--size", *SIZE, "--steps", "1",
                     "--batch-size", "2"]}[trainer]
    line = error_line(capsys, argv + ["--device", "cuda"])
    assert "--device cuda" in line and "no CUDA GPU is available here" in line, line
    assert not run.exists()


def test_less_data_than_one_batch_is_one_line_before_the_run_folder(made, tmp_path, capsys):
    run = tmp_path / "run"
    line = error_line(capsys, ldm_args(made, run, "--steps", "1", "--batch-size", "100"))
    assert "fewer than one batch of 100" in line and "--batch-size" in line, line
    assert not run.exists()


def test_out_that_is_a_file_is_one_line(made, tmp_path, capsys):
    out = tmp_path / "ct.nii.gz"
    out.write_bytes(b"kept")
    line = error_line(capsys, ldm_args(made, out, "--steps", "1"))
    assert "is a file, not a run folder" in line and out.read_bytes() == b"kept"


def test_a_bad_network_config_names_its_file(made, tmp_path, capsys):
    import shutil

    shutil.copytree(made / "base", tmp_path / "m")
    config = tmp_path / "m" / "unet" / "config.json"
    settings = json.loads(config.read_text())
    settings["norm_num_groups"] = 3  # divides no channel count of the tiny UNet
    config.write_text(json.dumps(settings))
    line = error_line(capsys, ["ldm", "--model", str(tmp_path / "m"), "--data", str(made / "cache"), "--out",
                               str(tmp_path / "run"), "--steps", "1"])
    assert str(config) in line, line
    missing = error_line(capsys, ["ldm", "--model", str(tmp_path / "none"), "--data", str(made / "cache"), "--out",
                                  str(tmp_path / "run"), "--steps", "1"])
    assert "does not exist" in missing, missing
