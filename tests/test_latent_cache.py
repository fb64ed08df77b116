"""Latent cache: shards + index, round trip, resume after an interruption, bad volumes, config checks."""
import json
import os

import pytest
import torch
from torch import nn

from text2ct_engine.data.cache import INDEX, LatentCacheDataset, build_latent_cache, main
from text2ct_engine.data.ctrate import CTRATEDataset
from text2ct_engine.data.errors import DataError
from text2ct_engine.data.phantom import make_dataset


class TinyVAE(nn.Module):
    """Stand-in for AutoencoderKL: encode(x) -> (mu, sigma), 4x downsampling, 4 latent channels."""

    def __init__(self, fail_after: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 8, kernel_size=4, stride=4)
        self.calls, self.fail_after = 0, fail_after

    def encode(self, x):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt  # simulates a run stopped half-way
        h = self.conv(x)
        return h[:, :4], torch.exp(0.1 * h[:, 4:])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cache_data"))
    make_dataset(root, n=5, size=(32, 32, 16), seed=4, workers=1, progress=False)
    return root


def _ds(root, **kw):
    return CTRATEDataset(root, target_spacing=(12.0, 12.0, 24.0), target_size=(32, 32, 16), **kw)


def test_cache_round_trip(data_root, tmp_path):
    ds, vae = _ds(data_root), TinyVAE()
    out = str(tmp_path / "c")
    idx = build_latent_cache(ds, vae, out, shard_size=2, dtype=torch.float32, progress=False)
    assert len(idx["entries"]) == 5 and idx["shards"] == [f"shard-{i:05d}.safetensors" for i in range(3)]
    assert json.load(open(os.path.join(out, INDEX)))["entries"].keys() == idx["entries"].keys()
    lc = LatentCacheDataset(out)
    s = lc[lc.names.index("train_3_a_1.nii.gz")]
    with torch.no_grad():
        mu, sigma = vae.encode(ds[ds.index_of("train_3_a_1.nii.gz")]["volume"][None])
    assert s["mu"].shape == (4, 8, 8, 4) and torch.allclose(s["mu"], mu[0]) and torch.allclose(s["sigma"], sigma[0])
    assert s["text"].startswith("Findings:") and s["labels"].shape == (18,) and s["spacing"].tolist() == [12.0, 12.0, 24.0]
    drawn = LatentCacheDataset(out, sample=True)[0]
    assert drawn["latent"].shape == drawn["mu"].shape and not torch.equal(drawn["latent"], drawn["mu"])
    # rerun: nothing left to do
    again = TinyVAE()
    build_latent_cache(ds, again, out, shard_size=2, dtype=torch.float32, progress=False)
    assert again.calls == 0


def test_cache_resumes_after_interruption(data_root, tmp_path):
    out = str(tmp_path / "c")
    ds = _ds(data_root)
    with pytest.raises(KeyboardInterrupt):
        build_latent_cache(ds, TinyVAE(fail_after=3), out, shard_size=2, dtype=torch.float16, progress=False)
    idx = json.load(open(os.path.join(out, INDEX)))
    assert len(idx["entries"]) == 2 and idx["shards"] == ["shard-00000.safetensors"]  # the finished shard only
    assert not [f for f in os.listdir(out) if "tmp" in f]
    vae = TinyVAE()
    idx = build_latent_cache(ds, vae, out, shard_size=2, dtype=torch.float16, progress=False)
    assert vae.calls == 3 and len(idx["entries"]) == 5
    lc = LatentCacheDataset(out)
    assert len(lc) == 5 and lc[4]["mu"].dtype == torch.float32  # stored fp16, served fp32


def test_cache_skips_bad_volumes_and_refuses_other_settings(data_root, tmp_path):
    import shutil

    root = str(tmp_path / "d")
    shutil.copytree(data_root, root)
    bad = os.path.join(root, "dataset", "train_fixed", "train_2", "train_2_a", "train_2_a_1.nii.gz")
    with open(bad, "r+b") as fh:
        fh.truncate(200)
    out = str(tmp_path / "c")
    idx = build_latent_cache(_ds(root), TinyVAE(), out, shard_size=3, dtype=torch.float32, progress=False)
    assert len(idx["entries"]) == 4 and idx["skipped"][0][0] == bad
    other = CTRATEDataset(root, target_spacing=(6.0, 6.0, 12.0), target_size=(32, 32, 16))
    with pytest.raises(DataError, match="other settings"):
        build_latent_cache(other, TinyVAE(), out, dtype=torch.float32, progress=False)
    strict = str(tmp_path / "strict")  # stopped at the bad file before a shard: no folder left behind
    with pytest.raises(Exception, match="train_2_a_1"):
        build_latent_cache(_ds(root, strict=True), TinyVAE(), strict, shard_size=100, dtype=torch.float32,
                           progress=False)
    assert not os.path.exists(strict)
    (tmp_path / "plain").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):  # before any volume is encoded
        build_latent_cache(_ds(root), TinyVAE(), str(tmp_path / "plain" / "cache"), dtype=torch.float32,
                           progress=False)


def test_cache_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["--data", str(tmp_path / "missing"), "--vae", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err


def test_cache_cli_with_the_engine_vae(data_root, tmp_path, capsys):
    from text2ct_engine.models import AutoencoderKL

    vae = AutoencoderKL(num_channels=[8, 8, 8], num_res_blocks=[1, 1, 1], norm_num_groups=4)
    vae.save_pretrained(str(tmp_path / "model" / "vae"))
    out = str(tmp_path / "c")
    argv = ["--data", data_root, "--vae", str(tmp_path / "model"), "--out", out, "--size", "32", "32", "16",
            "--spacing", "12", "12", "24", "--device", "cpu", "--shard-size", "4"]
    assert main(argv) == 0
    lc = LatentCacheDataset(out)
    assert len(lc) == 5 and lc[0]["mu"].shape == (4, 8, 8, 4) and lc[0]["sigma"] is not None
    assert "5 latents" in capsys.readouterr().out


def test_cache_refuses_another_split_or_data_folder(data_root, tmp_path):
    import shutil

    out = str(tmp_path / "c")
    build_latent_cache(_ds(data_root), TinyVAE(), out, dtype=torch.float32, progress=False)
    make_dataset(str(tmp_path / "v"), n=2, size=(32, 32, 16), seed=5, split="valid", progress=False)
    shutil.copytree(data_root, tmp_path / "copy")  # the same names, another data set
    with pytest.raises(DataError, match="split: 'train' there, 'valid' here"):
        build_latent_cache(_ds(str(tmp_path / "v"), split="valid"), TinyVAE(), out, dtype=torch.float32,
                           progress=False)
    with pytest.raises(DataError, match="data: .* there, .*copy/dataset' here"):
        build_latent_cache(_ds(str(tmp_path / "copy")), TinyVAE(), out, dtype=torch.float32, progress=False)
    other_weights = TinyVAE()
    with torch.no_grad():
        other_weights.conv.bias.add_(1.0)
    with pytest.raises(DataError, match="vae_weights"):
        build_latent_cache(_ds(data_root), other_weights, out, dtype=torch.float32, progress=False)
    assert len(json.load(open(os.path.join(out, INDEX)))["entries"]) == 5  # nothing was added
    build_latent_cache(_ds(os.path.join(data_root, "dataset")), TinyVAE(), out, dtype=torch.float32,
                       progress=False)  # the same folder, named through dataset/: the same cache


def test_sampled_latents_depend_only_on_the_seed(data_root, tmp_path):
    out = str(tmp_path / "c")
    build_latent_cache(_ds(data_root), TinyVAE(), out, dtype=torch.float32, progress=False)
    torch.manual_seed(0)
    a = LatentCacheDataset(out, sample=True, seed=3)[1]["latent"]
    torch.manual_seed(1)  # the global RNG plays no part
    b = LatentCacheDataset(out, sample=True, seed=3)[1]["latent"]
    c = LatentCacheDataset(out, sample=True, seed=4)[1]["latent"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cache_cli_refuses_a_size_the_vae_cannot_encode_whole(data_root, tmp_path, capsys):
    from text2ct_engine.models import AutoencoderKL

    AutoencoderKL(num_channels=[8, 8, 8], num_res_blocks=[1, 1, 1], norm_num_groups=4).save_pretrained(
        str(tmp_path / "vae"))
    argv = ["--data", data_root, "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "c"), "--size", "30", "30",
            "14", "--spacing", "12", "12", "24", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "multiples of the VAE's downsampling factor 4" in err[0] and "28 28 12" in err[0]
    assert not os.path.exists(tmp_path / "c" / INDEX)


def test_cache_refuses_a_folder_that_is_not_a_cache(data_root, tmp_path):
    """A non-empty folder without an index (generated volumes, say) is not written into; nor is a file."""
    folder = tmp_path / "generated"
    folder.mkdir()
    (folder / "ct_000.nii.gz").write_bytes(b"keep")
    with pytest.raises(DataError, match="not a latent cache"):
        build_latent_cache(_ds(data_root), TinyVAE(), str(folder), dtype=torch.float32, progress=False)
    assert sorted(os.listdir(folder)) == ["ct_000.nii.gz"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="is not a folder"):
        build_latent_cache(_ds(data_root), TinyVAE(), str(tmp_path / "afile"), dtype=torch.float32, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    idx = build_latent_cache(_ds(data_root), TinyVAE(), str(empty), dtype=torch.float32, progress=False)
    assert len(idx["entries"]) == 5 and os.path.isfile(empty / INDEX)


def test_cache_cli_out_of_memory_is_one_line(data_root, tmp_path, capsys, monkeypatch):
    from text2ct_engine.data import cache
    from text2ct_engine.models import AutoencoderKL

    AutoencoderKL(num_channels=[8, 8, 8], num_res_blocks=[1, 1, 1], norm_num_groups=4).save_pretrained(
        str(tmp_path / "model" / "vae"))

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(cache, "build_latent_cache", oom)
    argv = ["--data", data_root, "--vae", str(tmp_path / "model"), "--out", str(tmp_path / "c"), "--size", "32",
            "32", "16", "--spacing", "12", "12", "24", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: out of memory: CUDA out of memory"), err
    assert "encoding at --size 32 32 16" in err[0] and "--batch-size 1" in err[0] and "rerun resumes" in err[0]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "build_latent_cache", interrupted)
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["interrupted: the shards written so far are complete; the same command resumes from them"]


def test_tiled_encoder_gives_the_cache_the_same_latents(data_root, tmp_path, capsys):
    """--encode-slab changes memory and time, not the latents: a cache made with the exact tiled encoder
    (3-row slabs, both host-memory modes) holds what the one-piece encode gives."""
    from text2ct_engine.models import AutoencoderKL

    vae = AutoencoderKL(num_channels=[8, 8, 16], num_res_blocks=[1, 1, 1], norm_num_groups=4)
    vae.save_pretrained(str(tmp_path / "model" / "vae"))
    common = ["--data", data_root, "--vae", str(tmp_path / "model"), "--size", "32", "32", "16", "--spacing", "12",
              "12", "24", "--device", "cpu", "--dtype", "float32"]
    caches = {}
    for name, extra in {"whole": ["--encode-slab", "0"], "low": ["--encode-slab", "3"],
                        "fast": ["--encode-slab", "3", "--encode-host-memory", "fast"]}.items():
        assert main([*common, "--out", str(tmp_path / name), *extra]) == 0
        caches[name] = LatentCacheDataset(str(tmp_path / name))
    whole = caches.pop("whole")
    for cache in caches.values():
        assert cache.names == whole.names and len(whole) == 5
        for i in range(len(whole)):
            for key in ("mu", "sigma"):
                torch.testing.assert_close(cache[i][key], whole[i][key], rtol=1e-5, atol=1e-5)
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main([*common, "--out", str(tmp_path / "bad"), "--encode-slab", "3x"])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--encode-slab" in err[0] and "0 (no tiling) or auto" in err[0], err


def test_encoder_choice():
    """auto tiles the engine's VAE only where its widest activation is large; a stand-in VAE is never tiled
    by auto, and asking to tile it is refused in one line."""
    from text2ct_engine.data.cache import volume_encoder
    from text2ct_engine.models import AutoencoderKL
    from text2ct_engine.tiling import auto_slab

    assert auto_slab((512, 512, 128), 64, 2) == 32  # 4 GiB of bf16 at full resolution
    assert auto_slab((32, 32, 16), 8, 4) is None
    cpu = torch.device("cpu")
    x = torch.rand(1, 1, 32, 32, 16) + 0.1
    vae = AutoencoderKL(num_channels=[8, 8], num_res_blocks=[1, 1], attention_levels=[False, False],
                        norm_num_groups=4)
    with torch.no_grad():
        ref = vae.encode(x)[0]
        for slab in ("auto", None, 4):
            torch.testing.assert_close(volume_encoder(vae, cpu, (32, 32, 16), slab)(x)[0], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(volume_encoder(TinyVAE(), cpu, (512, 512, 128), "auto")(x)[0],
                                   TinyVAE().encode(x)[0])
    with pytest.raises(ValueError, match="needs the engine's AutoencoderKL.*--encode-slab 0"):
        volume_encoder(TinyVAE(), cpu, (32, 32, 16), 4)
    # a VAE with attention has no slab form: auto encodes it whole, an explicit slab is refused up front
    attn = AutoencoderKL(num_channels=[8, 8], num_res_blocks=[1, 1], attention_levels=[False, True],
                         norm_num_groups=4)
    with torch.no_grad():
        ref = attn.encode(x)[0]
        torch.testing.assert_close(volume_encoder(attn, cpu, (512, 512, 128), "auto")(x)[0], ref)
    with pytest.raises(ValueError, match="no exact form for SpatialAttention.*--encode-slab 0"):
        volume_encoder(attn, cpu, (32, 32, 16), 4)


def test_a_cache_encoded_under_bf16_autocast_resumes(data_root, tmp_path):
    """Caches made on a GPU before 2026-12-01 recorded compute "bf16-autocast"; today's bf16 VAE copy gives
    the same latents to rounding, so resuming such a cache is allowed; another real difference is not."""
    from text2ct_engine.data.cache import _check_same_config

    today = {"split": "train", "compute": "bf16"}
    _check_same_config(str(tmp_path), {"split": "train", "compute": "bf16-autocast"}, today)
    with pytest.raises(DataError, match="compute"):
        _check_same_config(str(tmp_path), {"split": "train"}, today)  # a CPU-made cache resumed on a GPU
