"""VAE training: losses by hand, learning, exact resume (with the discriminator), saved model, checkpointing, CLI."""
import json

import pytest
import torch

from text2ct_engine.data.ctrate import CTRATEDataset
from text2ct_engine.data.phantom import main as phantom_main
from text2ct_engine.models import AutoencoderKL
from text2ct_engine.models.discriminator import PatchDiscriminator, discriminator_adv_loss, generator_adv_loss
from text2ct_engine.train.__main__ import main as train_main
from text2ct_engine.train.vae import VAETrainConfig, evaluate_vae, kl_divergence, train_vae, vae_loss

from tiny_models import tiny_vae

SIZE, SPACING = (32, 32, 16), (10.0, 10.0, 20.0)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    assert phantom_main(["--n", "5", "--size", *map(str, SIZE), "--spacing", *map(str, SPACING), "--out",
                         str(root), "--seed", "1", "--workers", "1", "--quiet"]) == 0
    return root


def dataset(root):
    return CTRATEDataset(str(root), "train", SPACING, SIZE, require_report=False, verbose=False)


def config(**kw):
    base = dict(steps=6, batch_size=2, patch_size=(16, 16, 16), lr=2e-3, warmup_steps=1, log_every=1,
                save_every=3, eval_every=100, adv_weight=0.0, disc_channels=4, disc_layers=2)
    base.update(kw)
    return VAETrainConfig(**base)


def quiet(_):
    pass


def test_losses_by_hand():
    mu, sigma = torch.randn(2, 4, 3, 3, 2), torch.rand(2, 4, 3, 3, 2) + 0.1
    q, p = torch.distributions.Normal(mu, sigma), torch.distributions.Normal(0.0, 1.0)
    torch.testing.assert_close(kl_divergence(mu, sigma), torch.distributions.kl_divergence(q, p).sum() / 2)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert discriminator_adv_loss(real, fake, "least_squares").item() == pytest.approx(0.5 * (0.625 + 2.125))
    assert discriminator_adv_loss(real, fake, "hinge").item() == pytest.approx(0.5 * (0.25 + 0.75))
    assert generator_adv_loss(fake, "least_squares").item() == pytest.approx(4.625)
    assert generator_adv_loss(fake, "hinge").item() == pytest.approx(0.75)
    assert PatchDiscriminator(1, 4, 2)(torch.rand(1, 1, 16, 16, 16)).shape[2:] == PatchDiscriminator(
        1, 4, 2).output_size((16, 16, 16))


def test_training_learns_and_the_saved_model_reconstructs_the_same(phantoms, tmp_path):
    data = dataset(phantoms)
    held = [data[4]["volume"]]
    train = torch.utils.data.Subset(data, range(4))
    vae = tiny_vae()
    before = evaluate_vae(vae, held)
    log = train_vae(vae, train, config(steps=40, save_every=100, eval_every=40), str(tmp_path), held, log=quiet)
    rows = [json.loads(line) for line in (tmp_path / "loss.jsonl").read_text().splitlines()]
    l1 = [r["l1"] for r in rows if "l1" in r]
    assert len(l1) == 40 and rows == log.rows
    assert sum(l1[-5:]) / 5 < 0.7 * sum(l1[:5]) / 5  # 0.48 here; <= 0.53 over training seeds 0-4
    scores = [r for r in rows if "val_psnr" in r]
    assert [r.pop("step") for r in scores] == [40]
    assert scores[0]["val_mae_hu"] < before["val_mae_hu"] and scores[0]["val_psnr"] > before["val_psnr"]
    # out/model is a VAE directory giving the in-memory model's reconstruction and held-out scores
    loaded = AutoencoderKL.from_pretrained(tmp_path / "model")
    x = held[0][None]
    with torch.no_grad():
        torch.testing.assert_close(loaded.reconstruct(x), vae.reconstruct(x), rtol=0, atol=0)
    assert evaluate_vae(loaded, held) == pytest.approx(scores[0])
    assert evaluate_vae(loaded, held, slab=2) == pytest.approx(scores[0], rel=1e-5)  # exact tiled passes


def test_resume_is_exact_with_the_discriminator(phantoms, tmp_path):
    data = dataset(phantoms)
    # warm-up over 5 steps: the resume at step 3 lands inside it, so a repeated learning rate would show
    cfg = config(adv_weight=0.1, adv_start=2, ema_decay=0.9, adv_loss="hinge", warmup_steps=5)
    straight = tiny_vae()
    log = train_vae(straight, data, cfg, str(tmp_path / "a"), log=quiet)
    assert all("disc" in r and "adv" in r for r in log.rows[2:]) and "adv" not in log.rows[1]
    first = tiny_vae()
    train_vae(first, data, config(**{**vars(cfg), "steps": 3}), str(tmp_path / "b"), log=quiet)
    with pytest.raises(ValueError, match="--resume"):
        train_vae(tiny_vae(), data, cfg, str(tmp_path / "b"), log=quiet)
    resumed = tiny_vae()
    log_b = train_vae(resumed, data, cfg, str(tmp_path / "b"), resume=True, log=quiet)
    assert [r["lr"] for r in log_b.rows if "lr" in r] == [r["lr"] for r in log.rows[3:] if "lr" in r]
    from safetensors.torch import load_file
    for name in ("model.safetensors", "ema.safetensors", "discriminator/model.safetensors",
                 "discriminator/optimizer.pt"):
        a, b = tmp_path / "a" / "checkpoint" / name, tmp_path / "b" / "checkpoint" / name
        load = load_file if name.endswith("safetensors") else lambda p: torch.load(p)["state"][0]
        sa, sb = load(a), load(b)
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-6, atol=1e-7)
    ema_model = AutoencoderKL.from_pretrained(tmp_path / "b" / "model")  # EMA weights, not the raw ones
    assert not torch.equal(ema_model.post_quant_conv.conv.weight, resumed.post_quant_conv.conv.weight)


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.rand(2, 1, 8, 8, 8, dtype=torch.float64)
    grads = []
    for ckpt in (False, True):
        vae = tiny_vae().double().train()
        vae.set_gradient_checkpointing(ckpt)
        loss, _, _ = vae_loss(vae, x, VAETrainConfig(kl_weight=1e-3), torch.Generator().manual_seed(3))
        loss.backward()
        grads.append([p.grad.clone() for p in vae.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_bf16_autocast_step_with_the_discriminator():
    vae, disc = tiny_vae().train(), PatchDiscriminator(1, 4, 2)
    x = torch.rand(2, 1, 16, 16, 16)
    cfg = VAETrainConfig(adv_weight=0.1)
    ref, _, _ = vae_loss(vae, x, cfg, torch.Generator().manual_seed(0), disc)
    loss, parts, recon = vae_loss(vae, x, cfg, torch.Generator().manual_seed(0), disc, autocast=True)
    assert recon.dtype == torch.bfloat16 and set(parts) == {"l1", "kl", "adv"}
    assert loss.item() == pytest.approx(ref.item(), rel=0.05)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in vae.parameters())
    volume = [torch.rand(1, 16, 16, 8)]
    assert evaluate_vae(vae, volume, autocast=True) == pytest.approx(evaluate_vae(vae, volume), rel=0.02)


def test_cli_trains_fine_tunes_and_reports_bad_input(phantoms, tmp_path, capsys):
    def args(steps=2):
        return ["vae", "--data", str(phantoms), "--size", *map(str, SIZE), "--spacing", *map(str, SPACING),
                "--patch-size", "16", "16", "16", "--steps", str(steps), "--val", "1", "--log-every", "1"]

    base = args()
    tiny = ["--channels", "8", "8", "16", "--res-blocks", "1", "--norm-groups", "4"]
    assert train_main(base + tiny + ["--out", str(tmp_path / "run")]) == 0
    vae = AutoencoderKL.from_pretrained(tmp_path / "run" / "model")
    assert list(vae.config.num_channels) == [8, 8, 16]
    rows = [json.loads(line) for line in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 2] and "val_mae_hu" in rows[-1]
    capsys.readouterr()  # a resume needs no setting typed again: layout, training and data settings are the run's
    resume = ["vae", "--data", str(phantoms), "--out", str(tmp_path / "run"), "--resume"]
    assert train_main(resume + ["--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "patch_size 16 16 16" in out and "size 32 32 16, spacing 10.0 10.0 20.0, mode crop_pad, val 1" in out, out
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3
    assert state["data"] == {"size": list(SIZE), "spacing": list(SPACING), "mode": "crop_pad", "val": 1}
    assert state["resolved_on_device"] == ["mixed_precision", "adv_weight"]  # left to the device: not inherited
    assert "val 1 -> 2" in err_of(resume + ["--steps", "4", "--val", "2"], capsys)
    assert "size 32 32 16 -> 64 64 32" in err_of(resume + ["--steps", "4", "--size", "64", "64", "32"], capsys)
    assert "num_channels 8 8 16 -> 8 16 16" in err_of(resume + ["--steps", "4", "--channels", "8", "16", "16"], capsys)
    assert train_main(resume + ["--steps", "4", "--channels", "8", "8", "16"]) == 0  # the run's own: fine
    assert train_main(base + ["--init", str(tmp_path / "run" / "model"), "--out", str(tmp_path / "ft")]) == 0
    init, tuned = (AutoencoderKL.from_pretrained(tmp_path / d / "model") for d in ("run", "ft"))
    assert not torch.equal(tuned.encoder.blocks[0].conv.conv.weight, init.encoder.blocks[0].conv.conv.weight)
    capsys.readouterr()
    bad = [
        ["vae", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r2")] + tiny,
        base + tiny + ["--out", str(tmp_path / "run")],  # exists, no --resume
        base + tiny + ["--init", str(tmp_path / "run" / "model"), "--out", str(tmp_path / "r3")],
        base + ["--init", str(tmp_path / "missing"), "--out", str(tmp_path / "r4")],
        base + tiny + ["--patch-size", "48", "48", "16", "--out", str(tmp_path / "r5")],
        base + tiny + ["--latent-channels", "0", "--out", str(tmp_path / "r6")],
        base + tiny + ["--eval-every", "0", "--out", str(tmp_path / "r7")],
    ]
    for wrong in bad:
        assert train_main(wrong) == 2, wrong
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
    assert "--latent-channels must be at least 1, got 0" in err_of(bad[-2], capsys)
    assert not (tmp_path / "r6").exists()


def test_a_typed_adversarial_weight_is_taken_on_resume(phantoms, tmp_path, capsys):
    """Settings left to the device are resolved again on resume; typed ones (here --adv-weight) are the run's."""
    run = ["vae", "--data", str(phantoms), "--out", str(tmp_path / "run")]
    first = ["--size", *map(str, SIZE), "--spacing", *map(str, SPACING), "--patch-size", "16", "16", "16",
             "--channels", "8", "8", "16", "--res-blocks", "1", "--norm-groups", "4", "--val", "0",
             "--adv-weight", "0.05", "--adv-start", "1", "--disc-channels", "4", "--disc-layers", "2"]
    assert train_main(run + first + ["--steps", "2"]) == 0
    capsys.readouterr()
    assert train_main(run + ["--resume", "--steps", "3"]) == 0
    assert "adv_weight 0.05" in capsys.readouterr().out
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["config"]["adv_weight"] == 0.05 and state["resolved_on_device"] == ["mixed_precision"]
    assert (tmp_path / "run" / "checkpoint" / "discriminator" / "model.safetensors").is_file()


def err_of(argv, capsys):
    assert train_main(argv) == 2
    return capsys.readouterr().err


class Interrupted(Exception):
    pass


def test_interrupted_run_resumes_with_an_exact_log_and_checkpoint(phantoms, tmp_path):
    from safetensors.torch import load_file

    data = dataset(phantoms)
    held = [data[4]["volume"]]
    cfg = config(adv_weight=0.1, adv_start=2, eval_every=2)

    def crash(message):
        if message.startswith("step 5/"):  # after the step-3 checkpoint and the step-4 held-out score
            raise Interrupted

    train_vae(tiny_vae(), data, cfg, str(tmp_path / "a"), held, log=quiet)
    with pytest.raises(Interrupted):
        train_vae(tiny_vae(), data, cfg, str(tmp_path / "b"), held, log=crash)
    train_vae(tiny_vae(), data, cfg, str(tmp_path / "b"), held, resume=True, log=quiet)
    rows = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}
             for line in (tmp_path / run / "loss.jsonl").read_text().splitlines()] for run in "ab"]
    assert rows[0] == rows[1] and [r["step"] for r in rows[1] if "val_psnr" in r] == [2, 4, 6]
    for name in ("model.safetensors", "discriminator/model.safetensors"):
        a, b = (load_file(tmp_path / run / "checkpoint" / name) for run in "ab")
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="other settings than the run started with \\(kl_weight"):
        train_vae(tiny_vae(), data, config(**{**vars(cfg), "kl_weight": 1e-3}), str(tmp_path / "b"), held,
                  resume=True, log=quiet)


def test_an_unreadable_volume_is_named_once_and_summed_up_at_the_end(phantoms, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file

    from text2ct_engine.data import ctrate

    root = tmp_path / "d"
    shutil.copytree(phantoms, root)
    bad = next((root / "dataset" / "train_fixed").rglob("*.nii.gz"))
    with open(bad, "r+b") as fh:
        fh.truncate(100)
    ctrate._REPORTED.discard(str(bad))
    lines = []
    # 5 volumes, batch 1, 10 steps: two epochs, so the bad file comes up twice
    cfg = config(steps=10, batch_size=1, save_every=1, warmup_steps=12, ema_decay=0.9)  # lr moves each step
    train_vae(tiny_vae(), dataset(root), cfg, str(tmp_path / "run"), log=lines.append, collate_fn=ctrate.collate)
    err = capsys.readouterr().err
    assert err.count(f"skipped {bad}") == 1, err
    assert sum("every volume of the batch was unreadable" in line for line in lines) == 2
    summary = [line for line in lines if line.startswith("1 bad file(s) skipped:")]
    assert len(summary) == 1 and f"  {bad}: " in summary[0]

    # a run interrupted after a skipped step resumes on the same learning rates (the schedule counts skips)
    def crash(message):
        if message.startswith("step 9/"):  # the step-8 checkpoint is saved, the first epoch's skip is behind
            raise Interrupted
    with pytest.raises(Interrupted):
        train_vae(tiny_vae(), dataset(root), cfg, str(tmp_path / "b"), log=crash, collate_fn=ctrate.collate)
    train_vae(tiny_vae(), dataset(root), cfg, str(tmp_path / "b"), resume=True, log=quiet, collate_fn=ctrate.collate)
    rows = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}
             for line in (tmp_path / run / "loss.jsonl").read_text().splitlines()] for run in ("run", "b")]
    assert rows[0] == rows[1] and len({r["lr"] for r in rows[0]}) == len(rows[0]) == 8
    a, b = (load_file(tmp_path / run / "checkpoint" / "ema.safetensors") for run in ("run", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the EMA's warm-up counted 8 updates in 10 steps, both ways


def test_checkpoint_records_the_precision_and_adversarial_weight_that_ran(phantoms, tmp_path):
    """"auto" precision and the device-dependent adversarial default are stored as what they meant here, so
    a resume on another kind of device (bf16 and adv 0.1 on CUDA) is refused instead of changing the math."""
    run = tmp_path / "run"
    train_vae(tiny_vae(), dataset(phantoms), config(steps=1, batch_size=1, adv_weight=None, save_every=1), str(run),
              log=quiet)
    saved = json.loads((run / "checkpoint" / "state.json").read_text())["config"]
    assert saved["mixed_precision"] == "no" and saved["adv_weight"] == 0.0
    cuda_like = dict(saved, mixed_precision="bf16", adv_weight=0.1)  # what the same command records on a GPU
    from text2ct_engine.train.common import check_resumed_config
    with pytest.raises(ValueError, match="mixed_precision bf16 -> no"):
        check_resumed_config(cuda_like, saved, ())
