"""The planner's training steps against the real trainers: ``train_vae`` and ``train_clip`` run for a few
steps under the same tracker (real CPU tensors, fp32, torch ops) peak where the planned step peaks, with the
bytes the plan gives (the plan leaves out the tokenizer's tensors and the CLIP loader's collation: a few
percent at these tiny sizes; train vae's loader reads whole volumes larger than its patches, as the plan
counts)."""
from functools import partial

import pytest
import torch

from text2ct_engine import ops
from text2ct_engine.memory import MemoryTracker, Setup, clip_training_step, track, vae_training_step
from text2ct_engine.models import AutoencoderKL
from text2ct_engine.tokenizer import CLIPTokenizer
from text2ct_engine.train.clip import CLIPTrainConfig, fresh_clip, train_clip
from text2ct_engine.train.vae import VAETrainConfig, train_vae

from tiny_models import REPORTS

VAE = dict(num_channels=[8, 8, 16], num_res_blocks=[1, 1, 1], attention_levels=[False] * 3, norm_num_groups=4,
           latent_channels=4)
TEXT = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=1, intermediate_size=32)
VISION = dict(patch_size=(4, 8, 8), hidden_size=16, num_hidden_layers=2, num_attention_heads=1, intermediate_size=32)


class WholeVolumes(torch.utils.data.Dataset):
    """Volumes made when an item is read, as a loader reads a file."""

    def __init__(self, n: int, size: tuple[int, int, int]) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"volume": torch.rand(1, *self.size, generator=torch.Generator().manual_seed(i))}


def measured(train, *modules) -> MemoryTracker:
    tracker = MemoryTracker()
    tracker.name_modules(*modules)
    with ops.backend("torch"), tracker:
        train()
    return tracker


def planned(step, setup: Setup, networks) -> MemoryTracker:
    return track(step, setup, *networks(setup), fake=True, backend="torch")


def assert_plan_matches(real: MemoryTracker, plan: MemoryTracker, within: float) -> None:
    r, p = real.peak_at["cpu"], plan.peak_at["cpu"]
    assert (p.module, p.op, p.backward) == (r.module, r.op, r.backward)
    assert 1 - within <= plan.peak["cpu"] / real.peak["cpu"] <= 1.0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_vae_training_step_plans_what_train_vae_takes(tmp_path, checkpointing):
    torch.manual_seed(0)
    volumes = WholeVolumes(2, (64, 64, 32))  # read inside the tracked run, cropped to 32^3 patches
    vae = AutoencoderKL(**VAE)
    cfg = VAETrainConfig(steps=3, patch_size=(32, 32, 32), adv_weight=0.1, adv_start=0, save_every=100,
                         log_every=100, eval_every=100, gradient_checkpointing=checkpointing)
    real = measured(lambda: train_vae(vae, volumes, cfg, str(tmp_path / "run"), log=lambda _: None), vae)
    s = Setup(vae_config=VAE, dtype=torch.float32, device="cpu", host="cpu", volume=(64, 64, 32), patch=(32, 32, 32))
    assert_plan_matches(real, planned(partial(vae_training_step, checkpointing=checkpointing), s,
                                      Setup.vae_training_networks), within=0.005)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_clip_training_step_plans_what_train_clip_takes(tmp_path, checkpointing):
    tokenizer = CLIPTokenizer.train(REPORTS, vocab_size=300, min_frequency=1, context_length=64)
    settings = dict(text_config=TEXT, vision_config=VISION, projection_dim=16)
    torch.manual_seed(0)
    pairs = [{"volume": torch.rand(1, 32, 32, 16), "text": REPORTS[i]} for i in range(4)]
    model = fresh_clip(tokenizer, (32, 32, 16), settings)
    cfg = CLIPTrainConfig(steps=3, batch_size=2, size=(32, 32, 16), warmup_steps=0, eval_every=100, save_every=100,
                          log_every=100, gradient_checkpointing=checkpointing)
    real = measured(lambda: train_clip(model, tokenizer, pairs, cfg, str(tmp_path / "run"), log=lambda _: None),
                    model)
    s = Setup(dtype=torch.float32, device="cpu", host="cpu", volume=(64, 64, 32), context_length=64, clip_batch=2,
              clip_volume=(32, 32, 16),
              clip_config={**settings, "text_config": {**TEXT, "vocab_size": tokenizer.vocab_size}})
    assert_plan_matches(real, planned(partial(clip_training_step, checkpointing=checkpointing), s,
                                      Setup.clip_networks), within=0.07)
