"""python -m text2ct_engine.sample end to end on CPU with a tiny random model directory, and with the built-in
phantom demo model (the default when --model is omitted)."""
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from text2ct_engine.pipeline import Text2CTPipeline
from text2ct_engine import sample as sample_module
from text2ct_engine.sample import DEFAULT_MODEL, DEFAULT_MODEL_NOTE, main

from tiny_models import tiny_pipeline, tiny_text_pipeline

PROMPT = "Findings: Bilateral pleural effusion. Impression: Pleural effusion."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "model"
    tiny_text_pipeline().save_pretrained(d)
    return d


def sample(model_dir, out, *extra):
    return main(["--model", str(model_dir), "--out", str(out), "--no-progress", *extra])


def test_model_directory_holds_the_text_side(model_dir):
    assert sorted(os.listdir(model_dir)) == ["clip", "pipeline.json", "tokenizer.json", "unet", "vae"]
    pipe = Text2CTPipeline.from_pretrained(model_dir)
    ctx = pipe.encode_prompts([PROMPT, "Findings: Normal. Impression: Normal chest CT."])
    assert ctx.shape == (2, 1, 16)
    torch.testing.assert_close(ctx.norm(dim=-1), torch.ones(2, 1))
    assert not torch.allclose(ctx[0], ctx[1])
    empty = pipe.encode_prompts(["", PROMPT], allow_empty=True)
    assert torch.equal(empty[0], torch.zeros(1, 16)) and torch.equal(empty[1], ctx[0])


def test_sample_writes_reproducible_nifti_and_preview(model_dir, tmp_path, capsys):
    out = tmp_path / "ct.nii.gz"
    assert sample(model_dir, out, "--prompt", PROMPT, "--seed", "4", "--size", "16", "24", "8",
                  "--spacing", "0.8", "0.8", "2.5", "--preview", str(tmp_path / "ct.png")) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("done: 1 volume(s) of 16x24x8 in ") and "peak" in last
    img = nib.load(out)
    data = np.asarray(img.dataobj)
    assert data.shape == (16, 24, 8) and data.dtype == np.int16
    assert data.min() >= -1000 and data.max() <= 1000 and data.std() > 0
    np.testing.assert_allclose(img.header.get_zooms(), (0.8, 0.8, 2.5), rtol=1e-6)
    assert (tmp_path / "ct.png").stat().st_size > 0
    # same seed, same volume; another seed, another volume
    assert sample(model_dir, tmp_path / "again.nii.gz", "--prompt", PROMPT, "--seed", "4", "--size", "16", "24",
                  "8", "--spacing", "0.8", "0.8", "2.5") == 0
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "again.nii.gz").dataobj), data)
    assert sample(model_dir, tmp_path / "other.nii.gz", "--prompt", PROMPT, "--seed", "5", "--size", "16", "24",
                  "8", "--spacing", "0.8", "0.8", "2.5") == 0
    assert not np.array_equal(np.asarray(nib.load(tmp_path / "other.nii.gz").dataobj), data)


def test_tiled_decode_modes_give_the_untiled_volume(model_dir, tmp_path):
    """--decode-slab / --decode-host-memory / --decode-storage change memory and time, never the volume."""
    args = ("--prompt", PROMPT, "--seed", "2", "--size", "16", "24", "8", "--steps", "2")
    volumes = {}
    for name, extra in {"untiled": ("--decode-slab", "0"),
                        "low": ("--decode-slab", "3", "--decode-host-memory", "low"),
                        "fast": ("--decode-slab", "3", "--decode-host-memory", "fast"),
                        "host": ("--decode-slab", "3", "--decode-storage", "host"),
                        "device": ("--decode-slab", "3", "--decode-storage", "device")}.items():
        assert sample(model_dir, tmp_path / f"{name}.nii.gz", *args, *extra) == 0
        volumes[name] = np.asarray(nib.load(tmp_path / f"{name}.nii.gz").dataobj).astype(np.int32)
    assert volumes["untiled"].std() > 0
    for name in ("low", "fast", "host", "device"):  # equal up to float rounding at an int16 rounding boundary
        assert np.abs(volumes[name] - volumes["untiled"]).max() <= 1, name


def test_prompt_file_gives_one_volume_per_prompt(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n\nFindings: Cardiomegaly. Impression: Enlarged heart.\n")
    assert sample(model_dir, tmp_path / "ct.nii.gz", "--prompt-file", str(prompts), "--steps", "2") == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ct_000.nii.gz", "ct_001.nii.gz", "prompts.txt"]
    a, b = (np.asarray(nib.load(tmp_path / n).dataobj) for n in names[:2])
    assert a.shape == b.shape == (16, 16, 8) and not np.array_equal(a, b)


ERRORS = {
    "no_model": (["--model", "{tmp}/absent", "--prompt", PROMPT], "does not exist"),
    "not_a_model": (["--model", "{tmp}", "--prompt", PROMPT], "pipeline.json is missing"),
    "exists": (["--prompt", PROMPT, "--out", "{tmp}/exists.nii.gz"], "already exists"),
    "unwritable": (["--prompt", PROMPT, "--out", "{tmp}/no/such/dir/ct.nii.gz"], "does not exist"),
    "bad_size": (["--prompt", PROMPT, "--size", "16", "16", "6"], "divisible by 8 (VAE x4 times UNet x2"),
    "bad_spacing": (["--prompt", PROMPT, "--spacing", "1", "0", "1"], "spacing"),
    "empty_file": (["--prompt-file", "{tmp}/empty.txt"], "holds no prompt"),
    "empty_prompt": (["--prompt", "  "], "prompt is empty"),
    "no_prompt": ([], "give a prompt"),
    "bad_extension": (["--prompt", PROMPT, "--out", "{tmp}/ct.mha"], "must end in .nii.gz"),
    "out_is_a_dir": (["--prompt", PROMPT, "--out", "{tmp}/dir.nii.gz"], "dir.nii.gz is a directory"),
    "preview_is_a_dir": (["--prompt", PROMPT, "--preview", "{tmp}/dir.png"], "dir.png is a directory"),
    "not_writable": (["--prompt", PROMPT, "--out", "/sys/ct.nii.gz"], "folder /sys is not writable"),
    "cpu_bfloat16": (["--prompt", PROMPT, "--device", "cpu", "--dtype", "bfloat16"], "CPU supports float32 only"),
    "cpu_float16": (["--prompt", PROMPT, "--dtype", "float16", "--device", "cpu"], "CPU supports float32 only"),
    "guidance_nan": (["--prompt", PROMPT, "--guidance", "nan"], "--guidance must be a finite number, got nan"),
    "guidance_inf": (["--prompt", PROMPT, "--guidance", "inf"], "--guidance must be a finite number, got inf"),
    "seed_too_big": (["--prompt", PROMPT, "--seed", "18446744073709551616"], "--seed must be between 0 and 2**63 - 1"),
    "seed_negative": (["--prompt", PROMPT, "--seed", "-1"], "--seed must be between 0 and 2**63 - 1"),
    "last_seed_too_big": (["--prompt", PROMPT, "--prompt", PROMPT, "--seed", str(2**63 - 1)],
                          "--seed must be between 0 and 2**63 - 2"),
    "device_meta": (["--prompt", PROMPT, "--device", "meta"], "--device meta: not a device this runs on"),
    "device_mps": (["--prompt", PROMPT, "--device", "mps"], "--device mps: not a device this runs on"),
    "steps_zero": (["--prompt", PROMPT, "--steps", "0"], "--steps must be at least 1, got 0"),
    "huge_size": (["--prompt", PROMPT, "--size", "65536", "65536", "65536"], "too large: at most 4096"),
    "unconditional_no_prompt": (["--unconditional"], "(for a volume without text: --unconditional --prompt '')"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_errors_are_one_line_and_write_nothing(case, model_dir, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "exists.nii.gz").write_bytes(b"keep")
    (tmp_path / "dir.nii.gz").mkdir()
    (tmp_path / "dir.png").mkdir()
    args, expected = ERRORS[case]
    args = [a.format(tmp=tmp_path) for a in args]
    full = ["--model", str(model_dir), "--out", str(tmp_path / "ct.nii.gz"), "--no-progress"]
    for flag in ("--model", "--out"):  # a case's own --model / --out replaces the default
        if flag in args:
            i = full.index(flag)
            del full[i:i + 2]
    before = sorted(os.listdir(tmp_path))
    assert main(full + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / "exists.nii.gz").read_bytes() == b"keep"


def test_prompt_file_with_a_bom_reads_as_without(model_dir, tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + PROMPT.encode() + b"\n")
    (tmp_path / "plain.txt").write_text(PROMPT + "\n")
    for name in ("bom", "plain"):
        args = sample_module.parse_args(["--prompt-file", str(tmp_path / f"{name}.txt"), "--out", "x.nii.gz"])
        assert sample_module.read_prompts(args) == [PROMPT]
        assert sample(model_dir, tmp_path / f"{name}.nii.gz", "--prompt-file", str(tmp_path / f"{name}.txt"),
                      "--steps", "1") == 0
    bom, plain = (np.asarray(nib.load(tmp_path / f"{n}.nii.gz").dataobj) for n in ("bom", "plain"))
    np.testing.assert_array_equal(bom, plain)


@pytest.fixture(scope="module")
def textless_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "textless"
    tiny_pipeline().save_pretrained(d)
    return d


def test_model_without_text_encoder_samples_unconditionally(textless_model_dir, tmp_path):
    out = tmp_path / "ct.nii.gz"
    assert sample(textless_model_dir, out, "--prompt", "", "--unconditional", "--seed", "3", "--steps", "1") == 0
    pipe = Text2CTPipeline.from_pretrained(textless_model_dir)
    expected = pipe(context=torch.zeros(1, 1, 16), seed=3, steps=1)[0]
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), np.rint(expected.numpy()).astype(np.int16))


def test_prompt_on_model_without_text_encoder_is_refused_before_loading(textless_model_dir, tmp_path, capsys,
                                                                         monkeypatch):
    def no_loading(*_args, **_kwargs):
        raise AssertionError("the weights were loaded")
    monkeypatch.setattr(Text2CTPipeline, "from_pretrained", no_loading)
    assert sample(textless_model_dir, tmp_path / "ct.nii.gz", "--prompt", PROMPT) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no text encoder (clip/)" in err[0] and "--clip and --tokenizer" in err[0], err
    assert os.listdir(tmp_path) == []


def test_out_of_memory_is_one_line(model_dir, tmp_path, capsys, monkeypatch):
    def oom(*_args, **_kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 2199023255552 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(Text2CTPipeline, "__call__", oom)
    assert sample(model_dir, tmp_path / "ct.nii.gz", "--prompt", PROMPT) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: out of memory: ") and \
        err[0].endswith("try a smaller --size or --decode-slab"), err
    assert os.listdir(tmp_path) == []


def test_cli_subprocess_error_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "text2ct_engine.sample", "--model", str(tmp_path), "--prompt", "x",
                        "--out", str(tmp_path / "a.nii.gz")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path} is not a model directory: pipeline.json is missing"]


# ------------------------------------------------------------------------------ the built-in demo model
DEMO_PROMPT = ("Findings: Heart size is increased (cardiomegaly). There is a pleural effusion on the right. "
               "Impression: Cardiomegaly. Right pleural effusion.")


def test_default_model_is_the_shipped_phantom_demo(tmp_path, capsys):
    assert os.path.isfile(os.path.join(DEFAULT_MODEL, "pipeline.json"))
    files = [os.path.join(r, f) for r, _, fs in os.walk(DEFAULT_MODEL) for f in fs]
    assert all(f.endswith((".json", ".safetensors")) for f in files)  # safe weights only
    assert sum(os.path.getsize(f) for f in files) < 20 * 2**20
    out = tmp_path / "ct.nii.gz"
    assert main(["--prompt", DEMO_PROMPT, "--out", str(out), "--steps", "2", "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == DEFAULT_MODEL_NOTE and "not a clinical model" in lines[0]
    assert lines[-1].startswith("done: 1 volume(s) of 64x64x32 in ")
    img = nib.load(out)
    hu = np.asarray(img.dataobj).astype(np.float32)
    assert hu.shape == (64, 64, 32) and img.get_data_dtype() == np.int16
    np.testing.assert_allclose(img.header.get_zooms(), (6.0, 6.0, 12.0), rtol=1e-6)
    assert hu.min() >= -1000 and hu.max() <= 1000  # real HU inside the model's window
    frame = np.ones(hu.shape[:2], bool)
    frame[3:-3, 3:-3] = False
    assert hu[frame].mean() < -850  # air around the patient (real phantoms: about -1000)
    centre = hu[24:40, 20:44, 8:24]  # mediastinum, heart and the lungs beside them
    assert centre.mean() > -700 and (centre > -300).mean() > 0.2  # a body, with soft tissue in it
    assert ((hu > -300) & (hu < 300)).mean() > 0.1  # soft tissue makes up a good part of the volume


def test_model_option_overrides_the_default(model_dir, tmp_path, capsys):
    assert sample(model_dir, tmp_path / "ct.nii.gz", "--prompt", PROMPT, "--steps", "2") == 0
    out = capsys.readouterr().out
    assert DEFAULT_MODEL_NOTE not in out
    assert np.asarray(nib.load(tmp_path / "ct.nii.gz").dataobj).shape == (16, 16, 8)  # the tiny model's size


def test_missing_default_model_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample_module, "DEFAULT_MODEL", str(tmp_path / "absent"))
    assert main(["--prompt", PROMPT, "--out", str(tmp_path / "ct.nii.gz"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "phantom demo model is missing" in err[0] and "--model" in err[0]
    assert os.listdir(tmp_path) == []
