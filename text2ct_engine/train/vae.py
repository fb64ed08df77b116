"""Train or fine-tune the MAISI-style 3D KL autoencoder on random patches, on one consumer GPU or the CPU.

Per step (MAISI's recipe, minus its perceptual loss): random ``patch_size`` crops x of volumes in [0, 1];
z ~ q(z|x) = N(mu, sigma^2); the loss is ``l1_weight * |decode(z) - x|`` + ``kl_weight * KL(q || N(0, 1))``
(MAISI: 1e-7) and, once ``adv_start`` steps have run, ``adv_weight`` (MAISI: 0.1) times a least-squares or
hinge adversarial loss against a small 3D PatchGAN discriminator, trained alternately with its own AdamW. There is no
perceptual (LPIPS / MedicalNet) loss: those need pretrained weights, and nothing here downloads anything.
Memory: gradient checkpointing of every encoder/decoder block, bf16 autocast on CUDA, patches instead of
whole volumes. Held-out whole volumes are reconstructed from the latent mean (exactly, slab by slab with
``eval_slab``, encoder and decoder) and scored by PSNR (dB, over the [0, 1] range) and mean absolute error in HU.

    python -m text2ct_engine.train vae --data data/phantom --out runs/vae --size 128 128 128 --spacing 3 3 3

writes ``out/model`` (a VAE directory: ``AutoencoderKL.from_pretrained``, or a model directory's ``vae/``),
``out/checkpoint`` (resumable with ``--resume``) and ``out/loss.jsonl``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from ..cli import path as cli_path
from ..data.errors import BadDataLog
from ..io_utils import atomic_dir
from ..models.discriminator import ADV_LOSSES, PatchDiscriminator, discriminator_adv_loss, generator_adv_loss
from ..models.vae import AutoencoderKL, AutoencoderKLConfig
from ..precision import bf16_autocast
from .common import (EMA, LossLog, add_config_flags, add_run_flags, apply_gradients, check_batch_size,
                     check_intervals, check_optimizer_settings, check_resumed_config, checkpoint_state,
                     device_resolved, for_device, held_out_split, load_training_state, log_taken, open_run,
                     resumable_batches, run_settings, save_training_state, skip_step, warmup_schedule)

# how the CLI makes its volumes (--val: without a valid split, the held-out volumes leave the training set)
DATA_DEFAULTS = {"size": (512, 512, 128), "spacing": (0.75, 0.75, 3.0), "mode": "crop_pad", "val": 4}
DISC_DIR = "discriminator"  # the discriminator's resumable state, inside out/checkpoint
FREE_ON_RESUME = ("steps", "log_every", "save_every", "eval_every", "eval_slab", "num_workers",
                  "gradient_checkpointing")  # settings a resume may change: they do not change the math


@dataclass
class VAETrainConfig:
    steps: int = 10000
    batch_size: int = 1
    patch_size: tuple[int, int, int] = (64, 64, 64)
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    l1_weight: float = 1.0
    kl_weight: float = 1e-7
    adv_weight: float | None = None  # None: 0.1 on CUDA, off (0) on CPU
    adv_start: int = 1000
    adv_loss: str = "least_squares"  # or "hinge"
    disc_lr: float = 1e-4
    disc_channels: int = 32
    disc_layers: int = 3
    ema_decay: float | None = None
    gradient_checkpointing: bool = True
    mixed_precision: str = "auto"  # "auto" (bf16 on CUDA, off on CPU), "bf16" or "no"
    log_every: int = 10
    save_every: int = 500
    eval_every: int = 500
    eval_slab: int = 0  # 0: held-out volumes in one piece; N: exact tiled encode and decode, N rows per slab
    seed: int = 0
    num_workers: int = 0

    def validate(self, vae: AutoencoderKL) -> None:
        check_intervals(self, ("steps", "batch_size"))
        f = vae.config.downsample_factor
        if len(self.patch_size) != 3 or any(p < f or p % f for p in self.patch_size):
            raise ValueError(f"patch size {tuple(self.patch_size)} must be three multiples of the VAE's "
                             f"downsampling factor {f}")
        if min(self.l1_weight, self.kl_weight, self.adv_weight or 0.0) < 0:
            raise ValueError("the loss weights (l1, kl, adv) must not be negative")
        if self.adv_loss not in ADV_LOSSES:
            raise ValueError(f"adv_loss must be one of {ADV_LOSSES}, got {self.adv_loss!r}")
        check_intervals(self, ("log_every", "save_every", "eval_every"))
        check_optimizer_settings(self, rates=("lr", "disc_lr"))
        if self.eval_slab < 0:
            raise ValueError(f"eval_slab (--eval-slab) must be 0 or more, got {self.eval_slab}")

    def adversarial_weight(self, device: torch.device) -> float:
        return self.adv_weight if self.adv_weight is not None else (0.1 if device.type == "cuda" else 0.0)


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent channels and voxels, averaged over the batch."""
    mu, sigma = z_mu.float(), z_sigma.float()
    return 0.5 * (mu.pow(2) + sigma.pow(2) - 2 * sigma.log() - 1).flatten(1).sum(1).mean()


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, cfg: VAETrainConfig, generator: torch.Generator | None = None,
             discriminator: PatchDiscriminator | None = None, autocast: bool = False
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """One training step's loss on patches ``x`` (B, 1, D, H, W) in [0, 1]: ``(loss, parts, reconstruction)``.

    ``parts`` holds the unweighted ``l1``, ``kl`` and (with a ``discriminator``) ``adv`` terms. Backward of
    ``loss`` is the VAE's whole training step but the optimizer (what a memory planner needs to run).
    """
    with bf16_autocast(x.device, autocast):
        z_mu, z_sigma = vae.encode(x)
        recon = vae.decode(vae.sampling(z_mu, z_sigma, generator))
    parts = {"l1": F.l1_loss(recon.float(), x.float()), "kl": kl_divergence(z_mu, z_sigma)}
    loss = cfg.l1_weight * parts["l1"] + cfg.kl_weight * parts["kl"]
    if discriminator is not None:
        with bf16_autocast(x.device, autocast):
            logits = discriminator(recon)
        parts["adv"] = generator_adv_loss(logits, cfg.adv_loss)
        loss = loss + cfg.adversarial_weight(x.device) * parts["adv"]
    return loss, parts, recon


def discriminator_loss(discriminator: PatchDiscriminator, real: torch.Tensor, fake: torch.Tensor, kind: str,
                       autocast: bool = False) -> torch.Tensor:
    """The discriminator's loss on real patches and (detached) reconstructions."""
    with bf16_autocast(real.device, autocast):
        real_logits, fake_logits = discriminator(real), discriminator(fake.detach())
    return discriminator_adv_loss(real_logits, fake_logits, kind)


def random_patches(volumes: torch.Tensor, patch: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """One uniformly placed ``patch``-sized crop of each volume of (B, C, X, Y, Z)."""
    size = volumes.shape[2:]
    if any(p > s for p, s in zip(patch, size)):
        raise ValueError(f"patch size {tuple(patch)} exceeds the volume size {tuple(size)}: lower --patch-size "
                         f"or raise --size")
    crops = []
    for v in volumes:
        lo = [int(torch.randint(0, s - p + 1, (1,), generator=generator)) for s, p in zip(size, patch)]
        crops.append(v[:, lo[0]:lo[0] + patch[0], lo[1]:lo[1] + patch[1], lo[2]:lo[2] + patch[2]])
    return torch.stack(crops)


@torch.no_grad()
def evaluate_vae(vae: AutoencoderKL, volumes: Sequence[torch.Tensor], hu_window: Sequence[float] = (-1000, 1000),
                 slab: int = 0, autocast: bool = False) -> dict[str, float]:
    """Mean PSNR (dB, range [0, 1]) and MAE (HU) of whole-volume reconstructions from the latent mean.

    ``volumes``: (1, X, Y, Z) tensors in [0, 1]. ``slab`` > 0 encodes and decodes exactly in slabs
    (``tiling``, in the weights' dtype), else in one piece; ``autocast`` runs a one-piece pass in bf16.
    """
    from ..tiling import tiled_decode, tiled_encode

    device, f = next(vae.parameters()).device, vae.config.downsample_factor
    psnr, mae = [], []
    for v in volumes:
        if any(s % f for s in v.shape[1:]):
            raise ValueError(f"held-out volume size {tuple(v.shape[1:])} is not a multiple of the VAE's "
                             f"downsampling factor {f}")
        x = v[None].to(device, torch.float32)
        with bf16_autocast(device, autocast and not slab):
            z = (tiled_encode(vae, x, slab) if slab else vae.encode(x))[0].float()
            recon = (tiled_decode(vae, z, slab) if slab else vae.decode(z)).float().clamp(0, 1)
        err = recon - x
        psnr.append(-10 * math.log10(max(err.pow(2).mean().item(), 1e-12)))
        mae.append(err.abs().mean().item() * (hu_window[1] - hu_window[0]))
    return {"val_psnr": sum(psnr) / len(psnr), "val_mae_hu": sum(mae) / len(mae)}


def fresh_vae(config: AutoencoderKLConfig, seed: int = 0) -> AutoencoderKL:
    """A randomly initialised VAE, the same for the same seed (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(config)


def train_vae(vae: AutoencoderKL, dataset: Dataset, cfg: VAETrainConfig, out_dir: str,
              val_volumes: Sequence[torch.Tensor] = (), hu_window: Sequence[float] = (-1000, 1000),
              resume: bool = False, collate_fn: Callable | None = None,
              log: Callable[[str], None] = print, data_settings: dict | None = None) -> LossLog:
    """Train ``vae`` (on its device) on ``dataset`` items ``{"volume": (1, X, Y, Z) in [0, 1]}``.

    ``collate_fn`` may return ``volume=None`` for a batch of only unreadable files: that step is skipped.
    ``out_dir/checkpoint`` holds the resumable state (every ``save_every`` steps and at the end, with the
    discriminator and its optimizer under ``discriminator/``), ``out_dir/model`` the finished VAE (EMA
    weights when kept), ``out_dir/loss.jsonl`` the training and held-out rows. ``data_settings`` (how the
    volumes were made, JSON) is recorded in the checkpoint's ``state.json`` under ``data``.
    """
    cfg.validate(vae)
    device = next(vae.parameters()).device
    resolved = device_resolved(cfg)
    cfg, autocast = for_device(cfg, device)
    cfg = dataclasses.replace(cfg, adv_weight=cfg.adversarial_weight(device))  # explicit too, as above
    adv_weight = cfg.adv_weight
    check_batch_size(dataset, cfg.batch_size)
    ckpt_dir, model_dir, resuming = open_run(out_dir, resume)
    vae.train().requires_grad_(True)
    vae.set_gradient_checkpointing(cfg.gradient_checkpointing)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = warmup_schedule(optimizer, cfg.warmup_steps)
    ema = EMA(vae, cfg.ema_decay) if cfg.ema_decay else None
    disc = d_opt = None
    if adv_weight > 0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            disc = PatchDiscriminator(vae.config.out_channels, cfg.disc_channels, cfg.disc_layers).to(device)
        if min(disc.output_size(cfg.patch_size)) < 1:
            raise ValueError(f"patch size {tuple(cfg.patch_size)} is too small for a {cfg.disc_layers}-layer "
                             f"discriminator: raise --patch-size or lower --disc-layers")
        d_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9))
    step = _resume(ckpt_dir, vae, optimizer, ema, schedule, disc, d_opt, cfg, log) if resuming else 0
    losses = LossLog(os.path.join(out_dir, "loss.jsonl"), step if resuming else None)
    start = time.perf_counter()
    batches = resumable_batches(dataset, cfg.batch_size, cfg.seed, step, cfg.num_workers, collate_fn)
    skipped = BadDataLog()  # unreadable volumes met: summed up once at the end, however often they came up
    for step, batch in zip(range(step, cfg.steps), batches):
        skipped.extend(batch.get("skipped", ()))
        done = step + 1
        if batch["volume"] is not None:
            seed = 2 * (cfg.seed * 1_000_003 + step)  # crops draw from seed, the latent noise from seed + 1
            x = random_patches(batch["volume"], cfg.patch_size, torch.Generator().manual_seed(seed))
            x = x.to(device, torch.float32)
            use_adv = disc is not None and step >= cfg.adv_start
            if disc is not None:
                disc.requires_grad_(False)  # the VAE's step needs no discriminator gradients
            loss, parts, recon = vae_loss(vae, x, cfg, torch.Generator(device=device).manual_seed(seed + 1),
                                          disc if use_adv else None, autocast)
            norm = apply_gradients(loss, optimizer, cfg.grad_clip, step, schedule)
            if use_adv:
                disc.requires_grad_(True)
                parts["disc"] = discriminator_loss(disc, x, recon, cfg.adv_loss, autocast)
                apply_gradients(parts["disc"], d_opt, cfg.grad_clip, step)
            if ema is not None:
                ema.update(vae)
            if done % cfg.log_every == 0 or done == cfg.steps:
                terms = {k: v.item() for k, v in parts.items()}
                losses.log(step=done, loss=loss.item(), **terms, grad_norm=norm, lr=schedule.get_last_lr()[0],
                           seconds=round(time.perf_counter() - start, 2))
                log(f"step {done}/{cfg.steps} loss {loss.item():.4f} "
                    + " ".join(f"{k} {v:.4g}" for k, v in terms.items()) + f" grad {norm:.3f}")
        else:
            log(f"step {done}: every volume of the batch was unreadable; step skipped")
            skip_step(schedule)
        if val_volumes and (done % cfg.eval_every == 0 or done == cfg.steps):
            with ema.applied(vae) if ema is not None else contextlib.nullcontext():
                scores = evaluate_vae(vae, val_volumes, hu_window, cfg.eval_slab, autocast)
            losses.log(step=done, **scores)
            log(f"step {done} held-out PSNR {scores['val_psnr']:.2f} dB, MAE {scores['val_mae_hu']:.1f} HU")
        if done % cfg.save_every == 0 or done == cfg.steps:
            with atomic_dir(ckpt_dir) as tmp:  # replaced as a whole, discriminator included
                if disc is not None:
                    save_training_state(os.path.join(tmp, DISC_DIR), done, disc, d_opt, None)
                run = {"config": asdict(cfg), "resolved_on_device": resolved, "vae": asdict(vae.config)}
                if data_settings:
                    run["data"] = data_settings
                save_training_state(tmp, done, vae, optimizer, ema, run)
    vae.eval().set_gradient_checkpointing(False)
    with ema.applied(vae) if ema is not None else contextlib.nullcontext(), atomic_dir(model_dir) as tmp:
        vae.save_pretrained(tmp)
    if len(skipped):
        log(skipped.summary())
    log(f"wrote {model_dir}")
    return losses


def _resume(ckpt_dir: str, vae: AutoencoderKL, optimizer: torch.optim.Optimizer, ema: EMA | None,
            schedule: torch.optim.lr_scheduler.LRScheduler, disc: PatchDiscriminator | None,
            d_opt: torch.optim.Optimizer | None, cfg: VAETrainConfig, log: Callable[[str], None]) -> int:
    """Load the checkpoint (VAE, optimizer, EMA and discriminator) made with ``cfg``'s settings; its step."""
    try:
        step = int(load_training_state(ckpt_dir, vae, optimizer, ema, schedule, asdict(cfg), FREE_ON_RESUME)["step"])
        disc_dir = os.path.join(ckpt_dir, DISC_DIR)
        if disc is not None and os.path.isdir(disc_dir):
            if int(load_training_state(disc_dir, disc, d_opt, None)["step"]) != step:
                raise ValueError(f"{disc_dir} is from another step than {ckpt_dir} (interrupted while saving): "
                                 f"delete {disc_dir} to resume with a fresh discriminator")
        elif disc is not None:
            log("note: the checkpoint has no discriminator: it starts fresh")
    except (RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"{ckpt_dir} does not fit this VAE or discriminator ({first}): resume with the "
                         f"settings the run started with") from None
    log(f"resumed at step {step} from {ckpt_dir}")
    return step


# ------------------------------------------------------------------------------------------------ CLI
def checkpoint_vae_config(out_dir: str) -> AutoencoderKLConfig | None:
    """The VAE config a run in ``out_dir`` was started with (None without a checkpoint)."""
    raw = (checkpoint_state(out_dir) or {}).get("vae")
    return AutoencoderKLConfig(**raw) if raw else None


def load_data(root: str, size: Sequence[int], spacing: Sequence[float], mode: str, val_count: int
              ) -> tuple[Dataset, list[torch.Tensor], tuple[float, float]]:
    """Training set, held-out whole volumes and HU window from a CT-RATE-layout folder (CT-RATE or phantoms);
    held out as :func:`common.held_out_split` says."""
    train, held = held_out_split(root, size, spacing, mode, val_count, require_report=False)
    items = [held[i] for i in range(len(held))] if held is not None else []
    base = train.dataset if isinstance(train, Subset) else train
    return train, [item["volume"] for item in items if not item.get("skip")], tuple(base.window)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``vae`` subcommand of ``python -m text2ct_engine.train``; sets ``args.run``."""
    p = sub.add_parser("vae", help="train or fine-tune the 3D VAE on random patches",
                       description=__doc__.split("\n\n")[0])
    add_run_flags(p)
    p.add_argument("--init", type=cli_path,
                   help="VAE directory, or model directory with vae/, to fine-tune (default: a fresh VAE)")
    p.add_argument("--channels", type=int, nargs="+", help="fresh VAE: channels per level (default 64 128 256)")
    p.add_argument("--res-blocks", type=int, help="fresh VAE: ResBlocks per level (default 2)")
    p.add_argument("--latent-channels", type=int, help="fresh VAE: latent channels (default 4)")
    p.add_argument("--norm-groups", type=int, help="fresh VAE: GroupNorm groups (default 32)")
    p.add_argument("--size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="volumes are resampled to --spacing and cropped/padded to this size (default 512 512 128)")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"), help="default 0.75 0.75 3.0")
    p.add_argument("--mode", choices=("crop_pad", "resize"), help="default crop_pad")
    p.add_argument("--val", type=int, help="held-out whole volumes scored every --eval-every steps (default 4; "
                                          "without a valid split they are the last training volumes)")
    add_config_flags(p, VAETrainConfig, choices={"adv_loss": ADV_LOSSES},
                     helps={"adv_weight": "default 0.1 on CUDA, 0 (off) on CPU", "ema_decay": "default: no EMA"})
    p.set_defaults(run=run)
    return p


def build_vae(args: argparse.Namespace, seed: int) -> AutoencoderKL:
    """The VAE to train: the checkpoint's layout on --resume, --init's weights, or a fresh one."""
    overrides = {k: v for k, v in {"num_channels": args.channels, "latent_channels": args.latent_channels,
                                   "norm_num_groups": args.norm_groups}.items() if v is not None}
    saved = checkpoint_vae_config(args.out) if args.resume else None
    if args.channels or args.res_blocks:
        n = len(args.channels or (saved or AutoencoderKLConfig()).num_channels)
        overrides.update(num_res_blocks=[args.res_blocks or 2] * n, attention_levels=[False] * n)
    sizes = {"--channels": min(args.channels or [1]), "--res-blocks": args.res_blocks,
             "--latent-channels": args.latent_channels, "--norm-groups": args.norm_groups}
    for flag, value in sizes.items():
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if args.init and overrides:
        raise ValueError("--init fine-tunes a VAE as it is: drop --channels/--res-blocks/--latent-channels/"
                         "--norm-groups, or drop --init to train a fresh VAE")
    if saved is not None:
        typed = {k: v for k, v in overrides.items() if k != "attention_levels"}
        if args.res_blocks is None:
            typed.pop("num_res_blocks", None)
        check_resumed_config(asdict(saved), typed, free=())  # a typed layout must be the run's
        return fresh_vae(saved, seed)  # the checkpoint's weights are loaded by train_vae
    if args.init:
        from ..data.cache import load_vae
        return load_vae(args.init)
    return fresh_vae(AutoencoderKLConfig(**overrides), seed)


def run(args: argparse.Namespace) -> None:
    from ..data.ctrate import collate
    from ..pipeline import available_device

    cfg = VAETrainConfig(**run_settings(args, VAETrainConfig))
    cfg = dataclasses.replace(cfg, patch_size=tuple(cfg.patch_size), ema_decay=cfg.ema_decay or None)
    data = data_settings(args)
    if data["val"] < 0:
        raise ValueError(f"--val must be 0 or more, got {data['val']}")
    vae = build_vae(args, cfg.seed).to(available_device(args.device))
    f = vae.config.downsample_factor
    if any(s % f for s in data["size"]) or any(p > s for p, s in zip(cfg.patch_size, data["size"])):
        raise ValueError(f"--size {data['size']} must be multiples of the VAE's factor {f} and at least "
                         f"--patch-size {cfg.patch_size}")
    train, held, window = load_data(args.data, data["size"], data["spacing"], data["mode"], data["val"])
    print(f"{len(train)} training volumes, {len(held)} held out; VAE "
          f"{sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M parameters")
    train_vae(vae, train, cfg, args.out, held, window, resume=args.resume, collate_fn=collate, data_settings=data)


def data_settings(args: argparse.Namespace) -> dict[str, Any]:
    """--size, --spacing, --mode and --val: as typed, else (on --resume) the run's, else the defaults. A resume
    that changes them (the training volumes) is refused, as a changed training setting is."""
    def plain(settings: dict) -> dict:
        return {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items() if v is not None}

    typed = plain({k: getattr(args, k) for k in DATA_DEFAULTS})
    state = checkpoint_state(args.out) if args.resume else None
    saved = plain(state.get("data") or {}) if state else {}
    if state and not saved:
        print("note: --resume: this checkpoint predates recorded data settings: --size, --spacing, --mode and "
              "--val must be the run's (defaults otherwise)")
    check_resumed_config(saved, typed, free=())
    log_taken("data settings", saved, typed)
    return {**DATA_DEFAULTS, **saved, **typed}
