"""Rectified-flow UNet training: the loss by hand, learning, checkpointing equivalence, exact resume."""
import json

import pytest
import torch

from text2ct_engine.pipeline import Text2CTPipeline
from text2ct_engine.train.common import EMA
from text2ct_engine.train.ldm import LDMTrainConfig, compute_scale_factor, ldm_loss, train_ldm

from tiny_models import REPORTS, tiny_text_pipeline


class LatentSet(torch.utils.data.Dataset):
    def __init__(self, n=4):
        g = torch.Generator().manual_seed(0)
        self.latents = [torch.randn(4, 4, 4, 2, generator=g) * 1.5 + 0.3 for _ in range(n)]

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        return {"latent": self.latents[i], "text": REPORTS[i], "spacing": torch.tensor([1.5, 1.5, 3.0])}


def config(**kw):
    base = dict(steps=6, batch_size=2, lr=2e-3, warmup_steps=1, log_every=1, save_every=3, ema_decay=0.9)
    base.update(kw)
    return LDMTrainConfig(**base)


def test_loss_is_l1_to_the_velocity_by_hand():
    pipe = tiny_text_pipeline()
    x0 = torch.randn(2, 4, 4, 4, 2)
    ctx = torch.randn(2, 1, 16)
    spacing = torch.tensor([[1.5, 1.5, 3.0]] * 2)
    loss = ldm_loss(pipe, x0, ctx, spacing, torch.Generator().manual_seed(9), 0.0, autocast=False)
    g = torch.Generator().manual_seed(9)  # same draws in the same order: noise, t, drop
    noise = torch.randn(x0.shape, generator=g)
    t = pipe.scheduler.sample_timesteps(x0, generator=g)
    xt = (1 - t / 1000)[:, None, None, None, None] * x0 + (t / 1000)[:, None, None, None, None] * noise
    v = pipe.unet(xt, t, context=ctx, class_labels=torch.ones(2, dtype=torch.long), spacing_tensor=spacing * 100)
    torch.testing.assert_close(loss, (v - (x0 - noise)).abs().mean())
    # dropped conditions see the zero context
    dropped = ldm_loss(pipe, x0, ctx, spacing, torch.Generator().manual_seed(9), 1.0, autocast=False)
    zero = ldm_loss(pipe, x0, torch.zeros_like(ctx), spacing, torch.Generator().manual_seed(9), 0.0, autocast=False)
    torch.testing.assert_close(dropped, zero)


def held_out_loss(pipe) -> float:
    """The loss on fixed (noise, t) draws for every latent: comparable before and after training."""
    data = LatentSet()
    x0 = torch.stack(data.latents) * pipe.config.scale_factor
    spacing = torch.tensor([[1.5, 1.5, 3.0]] * len(data))
    with torch.no_grad():
        ctx = pipe.encode_prompts(REPORTS[:len(data)])
        return sum(ldm_loss(pipe, x0, ctx, spacing, torch.Generator().manual_seed(s), 0.0, False).item()
                   for s in range(8)) / 8


def test_training_learns_and_writes_a_model(tmp_path):
    pipe = tiny_text_pipeline()
    before = held_out_loss(pipe)
    log = train_ldm(pipe, LatentSet(), config(steps=40, save_every=100, ema_decay=None, lr=1e-2), str(tmp_path),
                    log=lambda _: None)
    assert len(log.rows) == 40
    assert held_out_loss(pipe) < 0.9 * before
    rows = [json.loads(l) for l in (tmp_path / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    trained = Text2CTPipeline.from_pretrained(tmp_path / "model")
    for k, v in trained.unet.state_dict().items():
        torch.testing.assert_close(v, pipe.unet.state_dict()[k])
    assert trained.text_encoder is not None


def test_gradient_checkpointing_does_not_change_training(tmp_path):
    runs = []
    for ckpt in (False, True):
        runs.append(train_ldm(tiny_text_pipeline(), LatentSet(), config(steps=3, gradient_checkpointing=ckpt),
                              str(tmp_path / str(ckpt)), log=lambda _: None))
    a, b = ([r["loss"] for r in run.rows] for run in runs)
    assert a == pytest.approx(b, rel=1e-5)


def test_resume_is_exact(tmp_path):
    straight = tiny_text_pipeline()
    train_ldm(straight, LatentSet(), config(steps=6), str(tmp_path / "a"), log=lambda _: None)
    first = tiny_text_pipeline()
    train_ldm(first, LatentSet(), config(steps=3), str(tmp_path / "b"), log=lambda _: None)
    with pytest.raises(ValueError, match="--resume"):
        train_ldm(tiny_text_pipeline(), LatentSet(), config(steps=6), str(tmp_path / "b"), log=lambda _: None)
    resumed = tiny_text_pipeline()
    train_ldm(resumed, LatentSet(), config(steps=6), str(tmp_path / "b"), resume=True, log=lambda _: None)
    for k, v in straight.unet.state_dict().items():
        torch.testing.assert_close(resumed.unet.state_dict()[k], v, rtol=1e-6, atol=1e-7)


def test_ema_update_count_goes_through_a_checkpoint(tmp_path):
    """The warm-up's update count is saved with the EMA and restored on resume; a checkpoint written before the
    warm-up existed (no count) goes on without a warm-up, as it ran."""
    from safetensors.torch import load_file, save_file

    from text2ct_engine.train.common import load_training_state, save_training_state
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    ema = EMA(model, decay=0.999)
    for _ in range(7):
        ema.update(model)
    save_training_state(str(tmp_path), 9, model, opt, ema)  # 9 steps, 2 of them skipped: 7 updates
    resumed = EMA(model, decay=0.999)
    load_training_state(str(tmp_path), model, opt, resumed)
    assert resumed.updates == 7 and resumed.current_decay() == pytest.approx(8 / 17)
    path = tmp_path / "ema.safetensors"
    save_file(load_file(path), path)  # as written before the count was kept: no metadata
    old = EMA(model, decay=0.999)
    load_training_state(str(tmp_path), model, opt, old)
    assert old.current_decay() == 0.999


def test_ema_and_scale_factor():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.5)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update(model)  # warm-up: update 0 decays by min(0.5, 1/10)
    torch.testing.assert_close(ema.shadow["weight"], before + 1.8)
    assert ema.updates == 1 and ema.current_decay() == pytest.approx(2 / 11)
    ema.updates = 8  # 9/18: the warm-up reaches the decay
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["weight"], before + 0.5 * 1.8 + 0.5 * 4.0)
    with ema.applied(model):
        torch.testing.assert_close(model.weight, before + 2.9)
    torch.testing.assert_close(model.weight, before + 4.0)
    offloaded = EMA(model.to(torch.float64), decay=0.5, device="meta")  # kept on another device, in fp32
    offloaded.update(model)
    assert offloaded.device == torch.device("meta") and offloaded.shadow["weight"].dtype == torch.float32
    lat = torch.randn(10000) * 4.0
    assert compute_scale_factor(lat) == pytest.approx(1 / lat.std().item())
    with pytest.raises(ValueError, match="no spread"):
        compute_scale_factor(torch.zeros(10))


class SigmaLatentSet(LatentSet):
    """Cached-latent items: the mean and a sigma, so every step draws a fresh latent."""

    def __getitem__(self, i):
        return {**super().__getitem__(i), "sigma": torch.full((4, 4, 4, 2), 0.5)}


def quiet(_):
    pass


def rows_of(run_dir):
    """loss.jsonl rows without the wall-clock seconds."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run_dir / "loss.jsonl").read_text().splitlines()]


def weights(run_dir):
    from safetensors.torch import load_file
    return load_file(run_dir / "checkpoint" / "model.safetensors")


def assert_same_weights(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sampled_latents_are_drawn_from_the_step_seed(tmp_path):
    from text2ct_engine.train.ldm import draw_latents
    batch = {"latent": torch.zeros(2, 4, 4, 4, 2), "sigma": torch.full((2, 4, 4, 4, 2), 2.0)}
    a = draw_latents(batch, torch.Generator().manual_seed(5), torch.device("cpu"))
    b = draw_latents(batch, torch.Generator().manual_seed(5), torch.device("cpu"))
    assert torch.equal(a, b) and torch.equal(a, 2.0 * torch.randn(a.shape, generator=torch.Generator().manual_seed(5)))
    torch.manual_seed(0)  # the global RNG plays no part
    for name in ("a", "b"):
        train_ldm(tiny_text_pipeline(), SigmaLatentSet(), config(steps=4), str(tmp_path / name), log=quiet)
    assert rows_of(tmp_path / "a") == rows_of(tmp_path / "b")
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    straight = tiny_text_pipeline()  # the noise is drawn: not the run on the means
    train_ldm(straight, LatentSet(), config(steps=4), str(tmp_path / "mean"), log=quiet)
    assert rows_of(tmp_path / "mean") != rows_of(tmp_path / "a")


class Interrupted(Exception):
    pass


def crash_at(step):
    def log(message):
        if message.startswith(f"step {step}/"):
            raise Interrupted
    return log


def test_resume_after_an_interruption_keeps_the_log_exact(tmp_path):
    train_ldm(tiny_text_pipeline(), SigmaLatentSet(), config(), str(tmp_path / "a"), log=quiet)
    with pytest.raises(Interrupted):  # after the step-3 checkpoint, with steps 4 and 5 logged
        train_ldm(tiny_text_pipeline(), SigmaLatentSet(), config(), str(tmp_path / "b"), log=crash_at(5))
    assert [r["step"] for r in rows_of(tmp_path / "b")] == [1, 2, 3, 4, 5]
    train_ldm(tiny_text_pipeline(), SigmaLatentSet(), config(), str(tmp_path / "b"), resume=True, log=quiet)
    assert rows_of(tmp_path / "b") == rows_of(tmp_path / "a")  # steps 4 and 5 once, as in the straight run
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    # a run that died before its first checkpoint: the next one starts a fresh log
    with pytest.raises(Interrupted):
        train_ldm(tiny_text_pipeline(), SigmaLatentSet(), config(), str(tmp_path / "c"), log=crash_at(2))
    assert not (tmp_path / "c" / "checkpoint").exists()
    train_ldm(tiny_text_pipeline(), SigmaLatentSet(), config(), str(tmp_path / "c"), log=quiet)
    assert rows_of(tmp_path / "c") == rows_of(tmp_path / "a")


def test_a_failed_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    import text2ct_engine.train.common as common

    train_ldm(tiny_text_pipeline(), SigmaLatentSet(), config(), str(tmp_path / "a"), log=quiet)
    train_ldm(tiny_text_pipeline(), SigmaLatentSet(), config(steps=3), str(tmp_path / "three"), log=quiet)
    write_json = common.write_json

    def fail_at_step_6(path, obj):  # the weights and optimizer of step 6 are written, then the save dies
        if obj.get("step") == 6:
            raise Interrupted
        write_json(path, obj)

    monkeypatch.setattr(common, "write_json", fail_at_step_6)
    with pytest.raises(Interrupted):
        train_ldm(tiny_text_pipeline(), SigmaLatentSet(), config(), str(tmp_path / "b"), log=quiet)
    monkeypatch.undo()
    ckpt = tmp_path / "b" / "checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 3
    assert_same_weights(weights(tmp_path / "b"), weights(tmp_path / "three"))  # not step 6's weights
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoint", "loss.jsonl"]  # no leftovers
    train_ldm(tiny_text_pipeline(), SigmaLatentSet(), config(), str(tmp_path / "b"), resume=True, log=quiet)
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_resume_refuses_settings_that_change_the_math(tmp_path):
    train_ldm(tiny_text_pipeline(), LatentSet(), config(steps=3), str(tmp_path), log=quiet)
    for changed in (dict(lr=1e-3), dict(batch_size=1), dict(seed=1)):
        with pytest.raises(ValueError, match=f"other settings than the run started with \\({next(iter(changed))}"):
            train_ldm(tiny_text_pipeline(), LatentSet(), config(steps=6, **changed), str(tmp_path), resume=True,
                      log=quiet)
    with pytest.raises(ValueError, match="scale_factor 0.8 -> 0.5"):
        train_ldm(tiny_text_pipeline(scale_factor=0.5), LatentSet(), config(steps=6), str(tmp_path), resume=True,
                  log=quiet)
    train_ldm(tiny_text_pipeline(), LatentSet(), config(steps=6, log_every=2, save_every=6), str(tmp_path),
              resume=True, log=quiet)  # more steps, other intervals: fine
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 6


@pytest.mark.parametrize("field", ["log_every", "save_every"])
def test_zero_intervals_are_refused_before_training(field, tmp_path):
    with pytest.raises(ValueError, match=f"{field} \\(--{field.replace('_', '-')}\\) must be at least 1, got 0"):
        train_ldm(tiny_text_pipeline(), LatentSet(), config(**{field: 0}), str(tmp_path / "run"), log=quiet)
    assert not (tmp_path / "run").exists()
