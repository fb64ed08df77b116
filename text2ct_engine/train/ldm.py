"""Train the diffusion UNet on cached VAE latents with rectified flow, as Text2CT does.

Per step: latents x0 (scaled by ``scale_factor``), noise n, t from the scheduler's (shifted) training
distribution, x_t = (1 - t/T) x0 + (t/T) n; the UNet predicts the velocity x0 - n from x_t, t, the CLIP text
context (zeroed with probability ``cond_drop_prob`` so classifier-free guidance has an unconditional model),
the CT class and the spacing; the loss is L1. Memory: gradient checkpointing in every ResBlock and attention
block, bf16 autocast on CUDA, and the frozen text tower run without gradients.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..pipeline import Text2CTPipeline
from ..schedulers import RFlowScheduler
from ..io_utils import atomic_dir
from ..precision import bf16_autocast
from .common import (EMA, LossLog, TruncationNote, apply_gradients, check_batch_size, check_intervals,
                     check_optimizer_settings, device_resolved, for_device, load_training_state, open_run,
                     resumable_batches, save_training_state, warmup_schedule)

FREE_ON_RESUME = ("steps", "log_every", "save_every", "num_workers", "gradient_checkpointing",
                  "ema_offload")  # no effect on the math (ema_offload: up to the float rounding of the EMA update)
SCALE_SAMPLE = 64  # cached latents that --scale-factor auto measures


@dataclass
class LDMTrainConfig:
    steps: int = 10000
    batch_size: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    cond_drop_prob: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float | None = 0.999
    ema_offload: bool = False  # keep the EMA copy in host RAM (its fp32 weights off the GPU)
    gradient_checkpointing: bool = True
    mixed_precision: str = "auto"  # "auto" (bf16 on CUDA, off on CPU), "bf16" or "no"
    log_every: int = 10
    save_every: int = 500
    seed: int = 0
    num_workers: int = 0

    def validate(self) -> None:
        check_intervals(self, ("steps", "batch_size"))
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must lie in [0, 1], got {self.cond_drop_prob}")
        check_intervals(self)
        check_optimizer_settings(self)


def compute_scale_factor(latents: torch.Tensor) -> float:
    """1 / std of (a sample of) the training latents, so scaled latents have unit variance."""
    std = latents.float().std().item()
    if not math.isfinite(std) or std <= 0:
        raise ValueError("latents have no spread: cannot compute a scale factor")
    return 1.0 / std


def draw_latents(batch: dict, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """The batch's latents: ``latent`` (the mean), plus ``sigma`` times noise from ``generator`` when the
    items carry a ``sigma`` (a draw of q(z|x) that depends only on the generator's seed)."""
    latent = batch["latent"].to(device, torch.float32)
    if batch.get("sigma") is None:
        return latent
    noise = torch.randn(latent.shape, generator=generator, device=device, dtype=latent.dtype)
    return latent + batch["sigma"].to(device, torch.float32) * noise


def sample_scale_factor(dataset: Dataset, seed: int, count: int = SCALE_SAMPLE) -> tuple[float, int]:
    """``(compute_scale_factor of the first count items' latents, how many)``, each drawn as
    :func:`draw_latents` does from a generator seeded with ``seed``: the same value for the same seed."""
    items = [dataset[i] for i in range(min(len(dataset), count))]
    batch = {"latent": torch.stack([it["latent"] for it in items])}
    if all(it.get("sigma") is not None for it in items):
        batch["sigma"] = torch.stack([it["sigma"] for it in items])
    generator = torch.Generator().manual_seed(seed)
    return compute_scale_factor(draw_latents(batch, generator, torch.device("cpu"))), len(items)


def ldm_loss(pipe: Text2CTPipeline, x0: torch.Tensor, context: torch.Tensor, spacing: torch.Tensor,
             generator: torch.Generator, cond_drop_prob: float, autocast: bool) -> torch.Tensor:
    """One rectified-flow L1 loss on scaled latents ``x0`` (B, C, x, y, z)."""
    sched = pipe.scheduler
    if not isinstance(sched, RFlowScheduler):
        raise ValueError("training supports the rectified-flow scheduler only")
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    t = sched.sample_timesteps(x0, generator=generator)
    drop = torch.rand(b, generator=generator, device=x0.device) < cond_drop_prob
    context = context.masked_fill(drop[:, None, None], 0.0)
    xt = sched.add_noise(x0, noise, t)
    extra = {}
    unet = pipe.unet
    if unet.config.num_class_embeds is not None and pipe.config.class_label is not None:
        extra["class_labels"] = torch.full((b,), pipe.config.class_label, dtype=torch.long, device=x0.device)
    if unet.config.include_spacing_input:
        extra["spacing_tensor"] = spacing.to(x0.device, x0.dtype) * pipe.config.spacing_scale
    with bf16_autocast(x0.device, autocast):
        v = unet(xt, t.to(x0.dtype), context=context, **extra)
    return F.l1_loss(v.float(), sched.velocity_target(x0, noise).float())


def train_ldm(pipe: Text2CTPipeline, dataset: Dataset, cfg: LDMTrainConfig, out_dir: str,
              resume: bool = False, log: Callable[[str], None] = print) -> LossLog:
    """Train ``pipe.unet`` on ``dataset`` items ``{"latent", "text" or "context", "spacing"}`` (and ``sigma``:
    each step then draws latent + sigma * noise from the step's seeded generator).

    ``out_dir/checkpoint`` holds the resumable state (every ``save_every`` steps and at the end),
    ``out_dir/model`` the finished model directory (EMA weights when kept), ``out_dir/loss.jsonl`` the log.
    A resume must use the settings (and scale factor) the run started with.
    """
    cfg.validate()
    device, unet = pipe.device, pipe.unet
    resolved = device_resolved(cfg)
    cfg, autocast = for_device(cfg, device)
    check_batch_size(dataset, cfg.batch_size)
    ckpt_dir, model_dir, resuming = open_run(out_dir, resume)
    unet.train()
    unet.set_gradient_checkpointing(cfg.gradient_checkpointing)
    for frozen in (pipe.vae, pipe.text_encoder):
        if frozen is not None:
            frozen.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = warmup_schedule(optimizer, cfg.warmup_steps)
    ema = EMA(unet, cfg.ema_decay, "cpu" if cfg.ema_offload else None) if cfg.ema_decay else None
    settings = {**asdict(cfg), "scale_factor": pipe.config.scale_factor}
    step = 0
    if resuming:
        step = int(load_training_state(ckpt_dir, unet, optimizer, ema, schedule, settings, FREE_ON_RESUME)["step"])
        log(f"resumed at step {step} from {ckpt_dir}")
    losses = LossLog(os.path.join(out_dir, "loss.jsonl"), step if resuming else None)
    start = time.perf_counter()
    note = TruncationNote(log)
    batches = resumable_batches(dataset, cfg.batch_size, cfg.seed, step, cfg.num_workers)
    for step, batch in zip(range(step, cfg.steps), batches):
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step)
        x0 = draw_latents(batch, gen, device) * pipe.config.scale_factor
        if "context" in batch:  # precomputed text contexts
            context = batch["context"].to(device)
        else:
            with torch.no_grad(), note.watch():
                context = pipe.encode_prompts(list(batch["text"]), allow_empty=True)
        loss = ldm_loss(pipe, x0, context.float(), batch["spacing"].float(), gen, cfg.cond_drop_prob, autocast)
        norm = apply_gradients(loss, optimizer, cfg.grad_clip, step, schedule)
        if ema is not None:
            ema.update(unet)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            losses.log(step=done, loss=loss.item(), grad_norm=norm, lr=schedule.get_last_lr()[0],
                       seconds=round(time.perf_counter() - start, 2))
            log(f"step {done}/{cfg.steps} loss {loss.item():.4f} grad {norm:.3f}")
        if done % cfg.save_every == 0 or done == cfg.steps:
            with atomic_dir(ckpt_dir) as tmp:
                run = {"config": settings, "resolved_on_device": resolved}
                save_training_state(tmp, done, unet, optimizer, ema, run)
    unet.eval()
    unet.set_gradient_checkpointing(False)
    with ema.applied(unet) if ema is not None else contextlib.nullcontext(), atomic_dir(model_dir) as tmp:
        pipe.save_pretrained(tmp)
    log(f"wrote {model_dir}")
    return losses
