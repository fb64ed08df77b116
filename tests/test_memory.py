"""The memory planner: fake-tensor plans equal real measurements, and the memory savers save memory."""
import json
from functools import partial

import pytest
import torch

from text2ct_engine.memory import (MemoryTracker, Setup, clip_training_step, decode_step, encode_step, main,
                                   phases, plan, run_phase, sampling_step, track, training_step, vae_training_step,
                                   weight_bytes)

# Tiny networks of the Text2CT layout; head size 16 so the Triton attention op (16/32/64/128) serves them.
UNET = dict(num_channels=[16, 32], attention_levels=[False, True], num_head_channels=[0, 16], num_res_blocks=1,
            norm_num_groups=8, cross_attention_dim=16)
VAE = dict(num_channels=[8, 8, 16], num_res_blocks=[1, 1, 1], attention_levels=[False] * 3, norm_num_groups=4,
           latent_channels=4)


# a 1-layer text tower (also the sampling and UNet training phases' one) and a 1-layer volume tower
CLIP = dict(text_config=dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                             intermediate_size=32),
            vision_config=dict(patch_size=(4, 8, 8), hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                               intermediate_size=32), projection_dim=16)


def tiny(**kwargs) -> Setup:
    return Setup(UNET, VAE, **{"volume": (32, 32, 32), "slab": 4, "clip_config": CLIP, "context_length": 9,
                               "patch": (32, 32, 32), "clip_volume": (16, 16, 8), "clip_batch": 3, **kwargs})


WORKLOADS = {  # the _ckpt steps run every op of the plain ones, and the recomputation on top
    "sample": (sampling_step, "networks"),
    "decode": (decode_step, "networks"),
    "decode_tiled": (partial(decode_step, slab=4), "networks"),
    "decode_tiled_fast": (partial(decode_step, slab=4, host_memory="fast"), "networks"),
    "encode": (encode_step, "networks"),
    "encode_tiled": (partial(encode_step, slab=4), "networks"),
    "train_ckpt": (partial(training_step, checkpointing=True), "networks"),
    "train_vae_ckpt": (partial(vae_training_step, checkpointing=True), "vae_training_networks"),
    "train_clip_ckpt": (partial(clip_training_step, checkpointing=True), "clip_networks"),
}


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_fake_plan_equals_real_cpu_run(name):
    """Same tracker, same workload: fake tensors give exactly the bytes real CPU tensors take."""
    s = tiny(dtype=torch.float32, device="cpu", host="cpu", ema=True)
    workload, networks = WORKLOADS[name]
    fake = track(workload, s, *getattr(s, networks)(), fake=True, backend="torch")
    real = track(workload, s, *getattr(s, networks)(), fake=False, backend="torch")
    assert fake.peak["cpu"] > 0
    assert fake.peak == real.peak
    f, r = fake.peak_at["cpu"], real.peak_at["cpu"]
    assert (f.op, f.module, f.backward, f.source) == (r.op, r.module, r.backward, r.source)
    assert fake.live == real.live == {"cpu": 0}  # every storage freed again, in both runs


@pytest.fixture(scope="module")
def planned():
    """Planner phases (fake meta device, Triton custom ops) on shapes where activations dominate."""
    deep = {**CLIP, **{k: {**CLIP[k], "num_hidden_layers": 4} for k in ("text_config", "vision_config")}}
    train = tiny(volume=(128, 128, 64), patch=(64, 64, 32), clip_volume=(64, 64, 32), clip_batch=4, clip_config=deep)
    decode = tiny(volume=(64, 64, 32), slab=4)
    rows = plan(train, "train") + plan(train, "train-vae") + plan(train, "train-clip") + plan(decode, "sample") + \
        plan(decode, "cache")
    return {r.key: r for r in rows}


def test_plan_runs_the_triton_custom_ops_fake_impls(planned):
    """Planning on the fake meta device uses the GPU kernels' fake impls, not the torch fallback."""
    for phase in planned.values():
        assert phase.backend == "triton", phase.notes
        assert phase.device_bytes > 0


@pytest.mark.parametrize("key", ["train", "train_vae", "train_clip"])
def test_gradient_checkpointing_lowers_the_training_peak(planned, key):
    assert planned[f"{key}_ckpt"].device_bytes < 0.8 * planned[key].device_bytes


def test_training_holds_on_the_host_only_what_the_loaders_read(planned):
    for key in ("train", "train_ckpt"):
        assert planned[key].host_bytes == 0
    volumes = 4 * 64 * 64 * 32 * 4  # clip_batch fp32 volumes, read on the host and laid out (z, y, x) there
    assert planned["train_clip"].host_bytes == planned["train_clip_ckpt"].host_bytes == 2 * volumes
    whole = 128 * 128 * 64 * 4  # train vae: the whole fp32 volume, as read and as collated, cropped on the host
    assert planned["train_vae"].host_bytes == planned["train_vae_ckpt"].host_bytes == 2 * whole


def test_unet_training_plan_holds_the_frozen_text_tower():
    """train ldm encodes each batch's reports with the fp32 text tower on the device: its weights count."""
    s = tiny(volume=(64, 64, 32))
    unet, vae, text = s.networks()
    with_text = run_phase("train", "train", training_step, s)
    without = run_phase("train", "train", training_step, s, networks=lambda setup: setup.networks()[:2])
    assert with_text.device_bytes - without.device_bytes >= weight_bytes(text, torch.float32)
    assert "frozen fp32 text tower" in next(p.notes for p in phases(s, "train"))


def test_ema_offload_moves_the_ema_copy_to_the_host():
    s, off = tiny(volume=(64, 32, 32)), tiny(volume=(64, 32, 32), ema_offload=True)
    on_device, offloaded = (run_phase("train", "train", training_step, setup) for setup in (s, off))
    unet = s.networks()[0]
    ema = weight_bytes(unet, torch.float32)
    assert on_device.device_bytes - offloaded.device_bytes >= ema  # the peak loses at least the EMA copy
    assert offloaded.host_bytes >= ema and on_device.host_bytes == 0


def _clip_peak(**kwargs) -> int:
    s = tiny(**kwargs)
    return run_phase("train_clip", "train clip", clip_training_step, s, networks=Setup.clip_networks).device_bytes


def test_clip_training_grows_with_the_batch_and_the_volume():
    """Both towers' activations grow with the contrastive batch, the volume tower's with its token count."""
    base = _clip_peak(clip_volume=(32, 32, 16), clip_batch=2)
    assert _clip_peak(clip_volume=(32, 32, 16), clip_batch=4) > base
    assert _clip_peak(clip_volume=(64, 64, 16), clip_batch=2) > base


def test_tiled_decode_lowers_the_device_peak(planned):
    untiled, low, fast = planned["decode_untiled"], planned["decode_tiled"], planned["decode_tiled_fast"]
    for tiled in (low, fast):
        assert tiled.device_bytes < 0.5 * untiled.device_bytes
        assert tiled.host_bytes > untiled.host_bytes  # the activations moved to the host
    # this VAE's last level has C = 8 channels fed by 8 upsampled ones (not 2C as in Text2CT): fast holds
    # the upsampled tensor and one C-channel tensor (2 units), low the half-resolution input and one (1 + 1/8)
    assert low.host_bytes < 0.6 * fast.host_bytes


def test_tiled_decode_on_the_device_keeps_its_activations_there(planned):
    low, dev = planned["decode_tiled"], planned["decode_tiled_device"]
    volume = 64 * 64 * 32 * 4  # the fp32 HU volume: the host holds it and its stacked copy, nothing else
    assert dev.host_bytes <= 2 * volume < low.host_bytes
    assert low.device_bytes < dev.device_bytes <= low.device_bytes + low.host_bytes


def test_tiled_encode_lowers_the_device_peak(planned):
    """The latent cache's encode: tiled, the device holds slabs only (the image and activations stay on the
    host); stored on the device, it still holds less than the one-piece encode."""
    untiled, low, fast = planned["encode_untiled"], planned["encode_tiled"], planned["encode_tiled_fast"]
    dev = planned["encode_tiled_device"]
    image = 64 * 64 * 32 * 4  # float32, read on the host
    assert untiled.host_bytes <= image + 512
    for tiled in (low, fast):
        assert tiled.device_bytes < 0.3 * untiled.device_bytes
    # host: the float32 image, its bf16 copy, then (bf16, C = 8 channels at full resolution = 4 images) low
    # holds one C-channel tensor and its downsampled result (C/8), fast two C-channel tensors
    assert low.host_bytes == (1 + 0.5 + 4 + 0.5) * image
    assert fast.host_bytes == (1 + 0.5 + 8) * image
    assert dev.host_bytes == 1.5 * image  # the image and its bf16 copy, made on the host
    assert low.device_bytes < dev.device_bytes < untiled.device_bytes


def test_tracker_counts_each_storage_once_until_freed():
    before = torch.ones(100)
    with MemoryTracker(block=1) as t:
        t.add(before)  # made before the tracker: counted only when added
        a = torch.empty(1000)
        view = a[10:]
        b = a * 2
        del b
        c = torch.empty(10)
    assert t.peak["cpu"] == 400 + 4000 + 4000
    assert t.live["cpu"] == 400 + 4000 + 40
    # a free between ops shows at the next op
    assert [bytes_ for _, _, bytes_ in t.timeline][-3:] == [400 + 4000, 400 + 8000, 400 + 4040]
    del view, a, c
    assert t.live["cpu"] == 400


def test_tracker_rounds_like_the_cuda_allocator():
    with MemoryTracker() as t:
        x = torch.empty(10)  # 40 bytes -> one 512-byte block
        y = torch.empty(129)  # 516 bytes -> two blocks
    assert t.peak["cpu"] == 512 + 1024
    del x, y


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    unet, vae, out = tmp_path / "unet.json", tmp_path / "vae.json", tmp_path / "plan.json"
    unet.write_text(json.dumps(UNET))
    vae.write_text(json.dumps(VAE))
    (tmp_path / "clip.json").write_text(json.dumps(CLIP))
    tiny_clip = ["--clip-config", str(tmp_path / "clip.json"), "--context-length", "9"]
    rc = main(["--unet-config", str(unet), "--vae-config", str(vae), "--volume", "32", "32", "16", "--slab", "4",
               "--what", "sample", "--json", str(out), *tiny_clip])
    text = capsys.readouterr().out
    assert rc == 0
    assert "device peak GiB" in text and "not measured on a GPU" in text and "tiled decode" in text
    plan = json.loads(out.read_text())
    assert [p["key"] for p in plan["phases"]] == ["sample", "decode_untiled", "decode_tiled", "decode_tiled_fast",
                                                  "decode_tiled_device"]
    assert plan["latent"] == [4, 8, 8, 4] and "fake tensors" in plan["plan"]
    assert all(p["device_bytes"] > 0 for p in plan["phases"])
    # an existing --json file is kept unless --force is given
    argv = ["--unet-config", str(unet), "--vae-config", str(vae), "--volume", "32", "32", "16", "--slab", "4",
            "--what", "sample", "--json", str(out), *tiny_clip]
    out.write_text("kept")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--force" in err[0], err
    assert out.read_text() == "kept"
    assert main(argv + ["--force"]) == 0
    assert json.loads(out.read_text())["latent"] == [4, 8, 8, 4]


def test_all_skips_train_vae_where_its_default_patch_does_not_fit():
    s = tiny(volume=(32, 32, 16))  # the patch (32, 32, 32) does not fit: not planned under "all", an error alone
    assert not any(p.key.startswith("train_vae") for p in phases(s, "all"))
    with pytest.raises(ValueError, match="exceeds the --volume"):
        phases(s, "train-vae")


@pytest.mark.parametrize("argv", [
    ["--volume", "100", "512", "128"],
    ["--volume", "512", "512"],
    ["--dtype", "fp8"],
    ["--what", "everything"],
    ["--batch", "0"],
    ["--slab", "0"],
    ["--batch", "two"],
    ["--json", "/no/such/folder/plan.json"],
    ["--json", "/"],
    ["--unet-config", "/no/such/unet.json"],
    ["--frobnicate"],
    ["--what", "train-clip", "--clip-batch", "1"],
    ["--what", "train-vae", "--patch", "62", "64", "64"],
    ["--what", "train-vae", "--patch", "4", "4", "4"],
    ["--what", "train-vae", "--volume", "64", "64", "32", "--patch", "64", "64", "64"],
    ["--what", "train-clip", "--clip-volume", "100", "256", "128"],
    ["--context-length", "1"],
    ["--clip-config", "/no/such/clip.json"],
])
def test_bad_arguments_give_one_error_line(argv, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert captured.out == ""
