"""Latent-to-volume path: sampling with CFG, decoding, HU mapping, NIfTI writing, model directories."""
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from text2ct_engine.pipeline import Text2CTPipeline
from text2ct_engine.volume_io import preview_montage, save_nifti, save_preview

from tiny_models import CONTEXT_DIM, tiny_pipeline


def test_sampling_is_reproducible_and_in_hu_range():
    pipe = tiny_pipeline()
    ctx = torch.randn(2, 1, CONTEXT_DIM)
    a = pipe(context=ctx, seed=7)
    b = pipe(context=ctx, seed=7)
    c = pipe(context=ctx, seed=8)
    assert a.shape == (2, 16, 16, 8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= -1000 and a.max() <= 1000 and a.std() > 0
    # a sample does not depend on its batch-mates: the second volume alone, with its own seed
    alone = pipe(context=ctx[1:], seed=8)
    torch.testing.assert_close(alone[0], a[1], rtol=0, atol=0.05)


def test_batched_cfg_equals_two_separate_calls():
    pipe = tiny_pipeline()
    x = torch.randn(2, 4, 4, 4, 2)
    t = torch.tensor([700.0])
    ctx = torch.randn(2, 1, CONTEXT_DIM)
    spacing = torch.tensor([[150.0, 150.0, 300.0]])
    with torch.no_grad():
        guided = pipe.guided_velocity(x, t, ctx, 5.0, spacing)
        extra = dict(class_labels=torch.ones(2, dtype=torch.long), spacing_tensor=spacing.expand(2, 3))
        cond = pipe.unet(x, t.expand(2), context=ctx, **extra)
        uncond = pipe.unet(x, t.expand(2), context=torch.zeros_like(ctx), **extra)
    torch.testing.assert_close(guided, uncond + 5.0 * (cond - uncond), rtol=1e-4, atol=1e-5)


def test_sampler_follows_the_scheduler_by_hand():
    """One step by hand: x1 = x0 + v * dt with the guided velocity, then decode / scale_factor -> HU."""
    pipe = tiny_pipeline(steps=1, guidance=1.0)
    ctx = torch.randn(1, 1, CONTEXT_DIM)
    noise = torch.randn((4, 4, 4, 2), generator=torch.Generator().manual_seed(3))[None]
    with torch.no_grad():
        spacing = torch.tensor([[1.5, 1.5, 3.0]]) * 100
        v = pipe.guided_velocity(noise, torch.tensor([1000.0]), ctx, 1.0, spacing)
        latent = noise + v * 1.0
        expected = pipe.vae.decode(latent / 0.8)[:, 0].clamp(0, 1) * 2000 - 1000
        got = pipe(context=ctx, seed=3)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)


def test_bad_arguments_raise_one_line_errors():
    pipe = tiny_pipeline()
    ctx = torch.randn(1, 1, CONTEXT_DIM)
    with pytest.raises(ValueError, match="divisible by 8 \\(VAE x4 times UNet x2"):
        pipe(context=ctx, size=(16, 16, 6))
    with pytest.raises(ValueError, match="spacing"):
        pipe(context=ctx, spacing=(1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="context must be"):
        pipe(context=torch.randn(1, 1, CONTEXT_DIM + 1))
    with pytest.raises(ValueError, match="no text encoder"):
        pipe("Findings: normal.")


def test_model_directory_round_trip(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "model")
    names = sorted(os.listdir(tmp_path / "model"))
    assert names == ["pipeline.json", "unet", "vae"]
    assert sorted(os.listdir(tmp_path / "model" / "unet")) == ["config.json", "model.safetensors"]
    again = Text2CTPipeline.from_pretrained(tmp_path / "model", device="cpu")
    ctx = torch.randn(1, 1, CONTEXT_DIM)
    assert torch.equal(pipe(context=ctx, seed=1), again(context=ctx, seed=1))
    assert again.config == pipe.config


def test_model_directory_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Text2CTPipeline.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="pipeline.json is missing"):
        Text2CTPipeline.from_pretrained(tmp_path / "empty")
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "m")
    os.remove(tmp_path / "m" / "vae" / "model.safetensors")
    with pytest.raises(ValueError, match="no weights"):
        Text2CTPipeline.from_pretrained(tmp_path / "m")
    # weights of another architecture
    tiny_pipeline().vae.save_pretrained(tmp_path / "m" / "vae")
    cfg = (tmp_path / "m" / "vae" / "config.json").read_text().replace('"latent_channels": 4',
                                                                          '"latent_channels": 3')
    (tmp_path / "m" / "vae" / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match="does not fit"):
        Text2CTPipeline.from_pretrained(tmp_path / "m")


def test_nifti_written_atomically_with_spacing(tmp_path):
    vol = torch.linspace(-1000, 1000, 10 * 12 * 6).reshape(10, 12, 6)
    out = tmp_path / "ct.nii.gz"
    save_nifti(vol, (0.75, 0.8, 3.0), out)
    img = nib.load(out)
    assert img.get_data_dtype() == np.int16
    np.testing.assert_allclose(img.header.get_zooms(), (0.75, 0.8, 3.0))
    centre = np.diag([0.75, 0.8, 3.0, 1.0])
    centre[:3, 3] = -(np.array(img.shape) - 1) / 2 * [0.75, 0.8, 3.0]  # the volume's centre at world (0, 0, 0)
    np.testing.assert_allclose(img.affine, centre)
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.rint(vol.numpy()).astype(np.int16))
    before = out.read_bytes()
    with pytest.raises(ValueError, match="already exists"):
        save_nifti(vol * 0, (1, 1, 1), out)
    assert out.read_bytes() == before
    save_nifti(vol * 0 + 5, (1, 1, 1), out, overwrite=True)
    assert np.asarray(nib.load(out).dataobj).max() == 5
    assert [p.name for p in tmp_path.iterdir()] == ["ct.nii.gz"]  # no temp files left
    with pytest.raises(ValueError, match="does not exist"):
        save_nifti(vol, (1, 1, 1), tmp_path / "missing" / "a.nii.gz")


def test_preview_png(tmp_path):
    from PIL import Image
    vol = torch.full((20, 16, 8), -1000.0)
    vol[5:15, 4:12, 2:6] = 1000.0
    path = save_preview(vol, (1.0, 1.0, 2.0), tmp_path / "p.png")
    img = np.asarray(Image.open(path))
    assert img.dtype == np.uint8 and img.ndim == 2
    assert img.max() == 255 and img.min() == 0
    assert img.shape[0] == 16  # sagittal/coronal: z 8 slices x 2 mm = 16 px; axial: y 16 px
    # radiological convention: the patient's right (high x in RAS+) on the image's left, anterior (high y) up
    marked = torch.full((20, 16, 8), -1000.0)
    marked[17:19, 12:16, 4] = 1000.0  # right, anterior, in the axial mid-slice (z = 4)
    axial = preview_montage(marked, (1.0, 1.0, 2.0))[:16, :20]
    rows, cols = np.nonzero(axial > 127)
    assert set(cols) <= {0, 1, 2, 3} and set(rows) <= {0, 1, 2, 3, 4}, (sorted(set(rows)), sorted(set(cols)))


def test_tiled_decode_in_pipeline_matches_plain():
    pipe = tiny_pipeline()
    ctx = torch.randn(1, 1, CONTEXT_DIM)
    plain = pipe(context=ctx, seed=2, decode_slab=None)
    tiled = pipe(context=ctx, seed=2, decode_slab=2)
    torch.testing.assert_close(tiled, plain, rtol=1e-5, atol=1e-2)  # HU: 2000 x the [0, 1] output
    assert pipe.auto_slab((1, 4, 128, 128, 32)) == 32  # Text2CT's full 512x512x128 volume is tiled
    assert pipe.auto_slab((1, 4, 4, 4, 2)) is None


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("edit, expected", [
    ({"scheduler": {"_class_name": "RFlowScheduler", "bogus": 1}}, "unexpected keyword argument 'bogus'"),
    ({"guidance": None}, "guidance must be a finite number, got None"),
    ({"size": ["a", 64, 32]}, "size must be a finite whole number, got 'a'"),
    ({"scale_factor": float("nan")}, "scale_factor must be a finite number, got nan"),
    ({"scale_factor": 0}, "scale_factor must be > 0"),
    ({"steps": 0}, "steps must be at least 1"),
    ({"spacing": [1, 1]}, "spacing must be a list of 3 numbers"),
    ({"colour": "red"}, "unknown key(s) ['colour']"),
])
def test_bad_pipeline_json_names_the_file_and_key(tmp_path, edit, expected):
    import json
    tiny_pipeline().save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "pipeline.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(ValueError) as err:
        Text2CTPipeline.from_pretrained(tmp_path / "m")
    assert str(err.value).startswith(str(path)) and expected in str(err.value), err.value


def test_non_utf8_pipeline_json_names_the_file(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "pipeline.json").write_bytes(b'{"guidance": "\xff"}')
    with pytest.raises(ValueError, match="pipeline.json: cannot read the pipeline config"):
        Text2CTPipeline.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("cut", [0.5, 0.0])
def test_truncated_weights_are_one_line(tmp_path, cut):
    tiny_pipeline().save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "unet" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:int(len(data) * cut)])
    with pytest.raises(ValueError, match="model.safetensors is corrupt or truncated"):
        Text2CTPipeline.from_pretrained(tmp_path / "m")


def test_weights_with_nan_are_refused_at_load(tmp_path):
    """Overwritten bytes inside a tensor pass safetensors' own checks; NaN weights must not reach sampling."""
    from safetensors.torch import load_file, save_file

    tiny_pipeline().save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "vae" / "model.safetensors"
    state = load_file(weights)
    name = sorted(state)[3]
    state[name].view(-1)[0] = float("nan")
    save_file(state, weights)
    with pytest.raises(ValueError, match=rf"vae/model.safetensors is damaged: 1 weight tensor\(s\) hold NaN or Inf "
                                         rf"\({name}\)"):
        Text2CTPipeline.from_pretrained(tmp_path / "m")


def test_call_refuses_non_finite_guidance_and_bad_steps_or_seeds():
    pipe = tiny_pipeline()
    ctx = torch.randn(1, 1, CONTEXT_DIM)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="guidance must be a finite number"):
            pipe(context=ctx, guidance=bad)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="steps must be at least 1"):
            pipe(context=ctx, steps=bad)
    with pytest.raises(ValueError, match="seeds must be between 0 and 2\\*\\*63 - 1"):
        pipe(context=torch.randn(2, 1, CONTEXT_DIM), seed=2**63 - 1)
    with pytest.raises(ValueError, match="seeds must be between"):
        pipe(context=ctx, seed=-1)
    calls = []
    pipe(context=ctx, steps=None, progress=lambda i, n: calls.append(n))  # None: the model's default (3)
    assert calls == [3, 3, 3]


def test_non_finite_scale_factor_and_volume_are_refused(tmp_path):
    from text2ct_engine.pipeline import PipelineConfig
    for bad in (float("nan"), float("inf"), 0.0, -2.0):
        with pytest.raises(ValueError, match="scale_factor must be"):
            PipelineConfig(scale_factor=bad)
    vol = torch.zeros(4, 4, 4)
    vol[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        save_nifti(vol, (1, 1, 1), tmp_path / "ct.nii.gz")
    assert os.listdir(tmp_path) == []


def test_unconditional_sampling_needs_no_text_encoder():
    pipe = tiny_pipeline()
    got = pipe(["", " "], allow_empty=True, seed=3, steps=1)
    torch.testing.assert_close(got, pipe(context=torch.zeros(2, 1, CONTEXT_DIM), seed=3, steps=1))
    with pytest.raises(ValueError, match="convert it with --clip and --tokenizer"):
        pipe(["", "Findings: normal."], allow_empty=True)


def test_sizes_and_devices_are_bounded():
    from text2ct_engine.pipeline import resolve_device
    pipe = tiny_pipeline()
    for size in ((65536, 65536, 65536), (2048, 2048, 1024), (8192, 8, 8)):
        with pytest.raises(ValueError, match="too large: at most 4096 voxels per side"):
            pipe.check_size(size)
    assert pipe.check_size((1024, 1024, 1024)) == (1024, 1024, 1024)
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("cuda:1") == torch.device("cuda:1")
    for bad in ("meta", "mps", "nonsense"):
        with pytest.raises(ValueError, match=f"device {bad} is not"):
            resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_loading_onto_cuda_without_a_gpu_is_one_value_error(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="no CUDA GPU is available here"):
        Text2CTPipeline.from_pretrained(tmp_path / "m", device="cuda")


def test_half_precision_on_the_cpu_is_refused_at_load(tmp_path):
    """torch's CPU avg_pool3d has no bf16/fp16 kernel: refused at load, not as a NotImplementedError mid-run."""
    tiny_pipeline().save_pretrained(tmp_path / "m")
    for dtype in (torch.bfloat16, torch.float16):
        with pytest.raises(ValueError, match="no half precision"):
            Text2CTPipeline.from_pretrained(tmp_path / "m", device="cpu", dtype=dtype)
    assert Text2CTPipeline.from_pretrained(tmp_path / "m", device="cpu", dtype=torch.float32).dtype == torch.float32


def test_sampler_state_stays_float32_when_the_unet_runs_in_bf16(monkeypatch):
    """Only the UNet's inputs are rounded to its dtype; the Euler state and the guided velocity stay float32."""
    pipe = tiny_pipeline()
    real = pipe.unet.forward
    seen = []

    def as_fp32(v):
        return v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    def bf16_unet(x, *args, **kwargs):  # stands in for a UNet computing in bf16 on a GPU
        seen.append(x.dtype)
        out = real(x.float(), *map(as_fp32, args), **{k: as_fp32(v) for k, v in kwargs.items()})
        return out.to(torch.bfloat16)

    monkeypatch.setattr(pipe.unet, "forward", bf16_unet)
    monkeypatch.setattr(type(pipe), "dtype", property(lambda self: torch.bfloat16))
    assert pipe.state_dtype == torch.float32
    ctx = torch.randn(2, 1, CONTEXT_DIM)
    lat = pipe.sample_latents(ctx, (16, 16, 8), (1.5, 1.5, 3.0), steps=3, guidance=3.0, seeds=[0, 1])
    assert lat.dtype == torch.float32 and len(seen) == 3 and set(seen) == {torch.bfloat16}


def test_a_cuda_index_past_the_machines_devices_is_one_value_error(monkeypatch):
    from text2ct_engine.pipeline import available_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert available_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"--device cuda:2 asked for, but this machine has 2 CUDA device\(s\), "
                                         r"cuda:0 to cuda:1"):
        available_device("cuda:2")


def test_the_vae_loads_on_its_own_device(tmp_path, monkeypatch):
    from text2ct_engine.models import AutoencoderKL
    tiny_pipeline().save_pretrained(tmp_path / "m")
    seen, real = [], AutoencoderKL.from_pretrained.__func__

    def spy(cls, directory, device="cpu", dtype=None):  # records where the pipeline asks for the VAE
        seen.append(torch.device(device))
        return real(cls, directory, "cpu", dtype)

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", classmethod(spy))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as far as the checks see
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    Text2CTPipeline.from_pretrained(tmp_path / "m", device="cpu", vae_device="cuda")
    Text2CTPipeline.from_pretrained(tmp_path / "m", device="cpu")
    assert seen == [torch.device("cuda"), torch.device("cpu")]
    with pytest.raises(ValueError, match="device cuda:3 asked for, but this machine has 1 CUDA device"):
        Text2CTPipeline.from_pretrained(tmp_path / "m", device="cpu", vae_device="cuda:3")
