"""Train the 3D CLIP: a CT volume tower and a report tower in one embedding space (Text2CT's contrastive
vision-language pretraining, whose text tower then conditions the diffusion UNet).

Per step: a batch of (volume, report) pairs; both towers embed and L2-normalise, logits are
``exp(logit_scale) * t @ v^T`` and the loss is the symmetric InfoNCE (``clip_contrastive_loss``). AdamW
(no weight decay on biases, norms and the temperature), linear warm-up then cosine or constant learning
rate, bf16 autocast on CUDA, gradient checkpointing in every transformer block. Every ``eval_every`` steps
the held-out pairs are embedded and text -> volume recall@1 / @5 is printed and logged.

``label_weight`` > 0 (not in Text2CT, whose CLIP saw 50k pairs) adds a supervised term for small data sets:
one linear read-out shared by both towers (``LabelReadout``) must give the data's finding labels from
either embedding; the held-out evaluation then also reports how well each embedding gives them.

A run directory gets ``model/`` (``clip/`` = the whole CLIP3D, whose text tower the pipeline reads, and
``tokenizer.json``), ``checkpoint/`` (resumable; also a CLIP3D directory), ``loss.jsonl`` and ``eval.jsonl``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..cli import path as cli_path
from ..data.errors import BadDataLog
from ..data.labels import CTRATE_LABELS
from ..evaluate.probe import label_accuracy
from ..evaluate.retrieval import retrieval_recall
from ..io_utils import atomic_dir, atomic_path, read_json_object, write_json
from ..models import CLIP3D, CLIP3DConfig, CLIPTextConfig, CLIPTextModelWithProjection, VisionConfig3D
from ..models.clip3d import LOGIT_SCALE_MAX
from ..text import CLIP_DIR, TOKENIZER_FILE, check_text_side, save_text_side
from ..tokenizer import CLIPTokenizer
from ..precision import bf16_autocast
from .common import (EMA, LossLog, TruncationNote, add_config_flags, add_run_flags, apply_gradients,
                     autocast_enabled, check_batch_size, check_intervals, check_optimizer_settings, checkpoint_state,
                     device_resolved, for_device, held_out_split, load_training_state, open_run, resumable_batches,
                     run_settings, save_training_state, skip_step, typed_settings, warmup_schedule)

# settings a resume may change (they do not change the math); so may steps, with a constant lr schedule
FREE_ON_RESUME = ("log_every", "save_every", "eval_every", "num_workers", "gradient_checkpointing")


@dataclass
class CLIPTrainConfig:
    steps: int = 10000
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.2
    warmup_steps: int = 500
    lr_schedule: str = "cosine"  # "cosine" (to 0 at `steps`) or "constant" after the warm-up
    grad_clip: float = 1.0
    ema_decay: float | None = None
    gradient_checkpointing: bool = True
    mixed_precision: str = "auto"  # "auto" (bf16 on CUDA, off on CPU), "bf16" or "no"
    size: tuple[int, int, int] = (256, 256, 128)  # voxels (x, y, z) the volume tower sees
    spacing: tuple[float, float, float] | None = None  # resample to this many mm first (None: as stored)
    resize: str = "resize"  # "resize" (whole field of view to `size`, as Text2CT) or "crop_pad"
    eval_size: int = 64  # held-out pairs: the data's valid split, else taken out of train
    eval_every: int = 500
    log_every: int = 10
    save_every: int = 500
    seed: int = 0
    num_workers: int = 0
    label_weight: float = 0.0  # > 0: also read the finding labels out of both embeddings (LabelReadout)

    def __post_init__(self) -> None:
        self.size = tuple(int(s) for s in self.size)  # type: ignore[assignment]
        self.spacing = tuple(float(s) for s in self.spacing) if self.spacing else None  # type: ignore[assignment]
        self.ema_decay = self.ema_decay or None  # 0 means off

    def validate(self) -> None:
        check_intervals(self, ("steps",))
        if self.batch_size < 2:
            raise ValueError(f"batch_size (--batch-size) must be at least 2 (a contrastive batch needs negatives), "
                             f"got {self.batch_size}")
        if len(self.size) != 3 or min(self.size) < 1 or (self.spacing is not None and len(self.spacing) != 3):
            raise ValueError(f"size {self.size} and spacing {self.spacing} must be three positive numbers each")
        for name, allowed in (("lr_schedule", ("cosine", "constant")), ("resize", ("resize", "crop_pad"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        check_intervals(self, ("log_every", "save_every", "eval_every"))
        check_optimizer_settings(self)
        if not 0.0 <= self.label_weight < float("inf"):
            raise ValueError(f"label_weight must be a finite number >= 0, got {self.label_weight}")
        autocast_enabled(self.mixed_precision, torch.device("cpu"))  # checks the value

    def free_on_resume(self) -> tuple[str, ...]:
        """The settings a resume may change: see ``FREE_ON_RESUME``."""
        return FREE_ON_RESUME + (("steps",) if self.lr_schedule == "constant" else ())


# ----------------------------------------------------------------------------------------------- pieces
def volume_layout(volume: torch.Tensor) -> torch.Tensor:
    """Loader volumes (B, 1, X, Y, Z) -> the volume tower's (B, 1, D, H, W) = (B, 1, Z, Y, X)."""
    return volume.permute(0, 1, 4, 3, 2).contiguous()


def make_optimizer(modules: list[nn.Module], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not biases, norms, the class token, logit_scale)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def _tokens(tokenizer: CLIPTokenizer, texts: list[str], device: torch.device, note: TruncationNote):
    with note.watch():
        return tokenizer.encode(texts, allow_empty=True).to(device)


class LabelReadout(nn.Module):
    """Finding-label logits from an L2-normalised CLIP embedding: one linear map that both towers share.

    Training only (the pipeline never uses it). Why: with a few hundred pairs the contrastive loss is met by
    each tower memorising its own items; on the 400 phantoms of the demo model a linear probe read no finding
    out of either tower's held-out embeddings (no better than the majority label). A read-out shared by both
    towers asks each embedding to carry the findings on the same directions; there the text tower then did
    (held-out read-out 99.0 %), the small volume tower could not (79.5 %, majority 83.9 %).
    """

    def __init__(self, dim: int, num_labels: int = len(CTRATE_LABELS)) -> None:
        super().__init__()
        self.scale = dim ** 0.5  # unit embeddings have components ~ dim**-0.5: give the map unit-size inputs
        self.linear = nn.Linear(dim, num_labels)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.linear(embeds.float() * self.scale)


LABEL_READOUT_FILE = "label_readout.safetensors"  # in a checkpoint, beside the CLIP3D's model.safetensors


def new_label_readout(model: CLIP3D, seed: int) -> LabelReadout:
    """A seeded fresh read-out for ``model``'s embedding width (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = LabelReadout(model.config.projection_dim)
    return head.to(next(model.parameters()).device)


def clip_loss(model: CLIP3D, tokenizer: CLIPTokenizer, batch: dict, device: torch.device, autocast: bool,
              note: TruncationNote, readout: LabelReadout | None = None,
              label_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one batch ``{"volume": (B, 1, X, Y, Z), "text": [B reports], "labels": (B, L) or None}`` and
    its parts: the symmetric InfoNCE, plus ``label_weight`` x the mean binary cross-entropy of ``readout`` on
    the text and the volume embeddings when a read-out is given."""
    tokens = _tokens(tokenizer, list(batch["text"]), device, note)
    volume = volume_layout(batch["volume"]).to(device)
    with bf16_autocast(device, autocast):
        out = model(tokens.input_ids, volume, tokens.attention_mask)
    if readout is None:
        return out.loss, {}
    if batch.get("labels") is None:
        raise ValueError("label_weight > 0 needs finding labels for every training pair "
                         "(dataset/multi_abnormality_labels/<split>_predicted_labels.csv): a batch has none")
    labels = batch["labels"].to(device).float()
    label_loss = 0.5 * (F.binary_cross_entropy_with_logits(readout(out.text_embeds), labels)
                        + F.binary_cross_entropy_with_logits(readout(out.volume_embeds), labels))
    return out.loss + label_weight * label_loss, {"contrastive": out.loss.item(), "labels": label_loss.item()}


@torch.no_grad()
def evaluate_retrieval(model: CLIP3D, tokenizer: CLIPTokenizer, pairs: Dataset, batch_size: int, autocast: bool,
                       note: TruncationNote, collate_fn: Callable | None = None, num_workers: int = 0,
                       readout: LabelReadout | None = None) -> dict[str, float]:
    """Embed every held-out pair; text -> volume recall@1/@5 over all of them, and their count ``n``.

    With ``readout`` and labelled pairs also ``label_acc_text`` / ``label_acc_volume`` (its accuracy from each
    embedding) and ``label_acc_majority`` (the majority answer's), see :func:`label_accuracy`."""
    device = next(model.parameters()).device
    texts, volumes, labels = [], [], []
    for batch in DataLoader(pairs, batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers):
        if batch["volume"] is None:
            continue
        tokens = _tokens(tokenizer, list(batch["text"]), device, note)
        with bf16_autocast(device, autocast):
            texts.append(model.encode_text(tokens.input_ids, tokens.attention_mask).float())
            volumes.append(model.encode_volume(volume_layout(batch["volume"]).to(device)).float())
        labels.append(batch.get("labels"))
    if not texts:
        return {"n": 0}
    t, v = torch.cat(texts), torch.cat(volumes)
    scores = {**retrieval_recall(t, v), "n": len(t)}
    if readout is not None and all(lb is not None for lb in labels):
        y = torch.cat(labels).to(device).float()
        scores["label_acc_text"], scores["label_acc_majority"] = label_accuracy(readout(t), y)
        scores["label_acc_volume"] = label_accuracy(readout(v), y)[0]
    return scores


def _weights(model: torch.nn.Module, ema: EMA | None):
    """The weights to evaluate and save: the EMA's when kept."""
    return ema.applied(model) if ema is not None else contextlib.nullcontext()


PREPROCESSOR_FILE = "preprocessor.json"  # how volumes were prepared for the volume tower, beside its config.json


def save_preprocessing(directory: str, cfg: CLIPTrainConfig) -> None:
    """Record the volume preprocessing the tower was trained with, so that scoring tools can repeat it."""
    write_json(os.path.join(directory, PREPROCESSOR_FILE),
               {"size": list(cfg.size), "spacing": list(cfg.spacing) if cfg.spacing else None, "resize": cfg.resize})


def read_preprocessing(directory: str) -> dict[str, Any]:
    """What :func:`save_preprocessing` wrote into a CLIP3D directory ({} when it holds none)."""
    path = os.path.join(directory, PREPROCESSOR_FILE)
    return read_json_object(path, "CLIP preprocessing") if os.path.isfile(path) else {}


def save_checkpoint(ckpt_dir: str, step: int, model: CLIP3D, tokenizer: CLIPTokenizer, optimizer: torch.optim.Optimizer,
                    ema: EMA | None, cfg: CLIPTrainConfig, readout: LabelReadout | None,
                    resolved_on_device: Sequence[str]) -> None:
    """The resumable state, plus ``config.json`` and ``tokenizer.json``: the folder is also a CLIP3D directory,
    so a resumed run rebuilds the same model from it. It is written beside ``ckpt_dir`` and swapped in whole."""
    with atomic_dir(ckpt_dir) as tmp:
        write_json(os.path.join(tmp, "config.json"), model.config_dict())
        tokenizer.save(os.path.join(tmp, TOKENIZER_FILE))
        save_preprocessing(tmp, cfg)
        run = {"config": asdict(cfg), "resolved_on_device": list(resolved_on_device)}
        save_training_state(tmp, step, model, optimizer, ema, run)
        if readout is not None:
            with atomic_path(os.path.join(tmp, LABEL_READOUT_FILE)) as path:
                save_file({k: v.detach().contiguous().cpu() for k, v in readout.state_dict().items()}, path)


# ----------------------------------------------------------------------------------------------- the loop
def train_clip(model: CLIP3D, tokenizer: CLIPTokenizer, dataset: Dataset, cfg: CLIPTrainConfig, out_dir: str,
               held_out: Dataset | None = None, resume: bool = False, collate_fn: Callable | None = None,
               log: Callable[[str], None] = print) -> LossLog:
    """Train ``model`` on ``dataset`` items ``{"volume": (1, X, Y, Z) in [0, 1], "text": report}``.

    ``collate_fn`` may drop unreadable items (``data.ctrate.collate`` sets ``volume`` None when none is
    left); a batch with fewer than two pairs is skipped (the step still counts, so resuming stays exact).
    """
    cfg.validate()
    text_cfg = model.config.text_config
    check_text_side(model.text_tower(), tokenizer, "the CLIP to train")
    if tokenizer.context_length > text_cfg.max_position_embeddings:
        raise ValueError(f"the tokenizer's context length {tokenizer.context_length} exceeds the text tower's "
                         f"{text_cfg.max_position_embeddings} positions")
    device = next(model.parameters()).device
    resolved = device_resolved(cfg)
    cfg, autocast = for_device(cfg, device)
    check_batch_size(dataset, cfg.batch_size)
    ckpt_dir, model_dir, resuming = open_run(out_dir, resume)
    model.train()
    model.set_gradient_checkpointing(cfg.gradient_checkpointing)
    readout = new_label_readout(model, cfg.seed) if cfg.label_weight > 0 else None
    optimizer = make_optimizer([model] + ([readout] if readout is not None else []), cfg.lr, cfg.weight_decay)
    schedule = warmup_schedule(optimizer, cfg.warmup_steps, cfg.steps if cfg.lr_schedule == "cosine" else None)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None
    step = 0
    if resuming:
        saved = (checkpoint_state(out_dir) or {}).get("config") or {}
        saved_steps = saved.get("steps", cfg.steps)
        if saved.get("lr_schedule", cfg.lr_schedule) == "cosine" and saved_steps != cfg.steps:
            raise ValueError(f"cannot take this run from {saved_steps} to {cfg.steps} steps: its cosine learning "
                             f"rate falls to 0 at step {saved_steps}; resume with --steps {saved_steps}, or go on from "
                             f"{ckpt_dir} with --init into a new --out (a --lr-schedule constant run can be extended)")
        state = load_training_state(ckpt_dir, model, optimizer, ema, schedule, asdict(cfg), cfg.free_on_resume())
        step = int(state["step"])
        if readout is not None:
            readout.load_state_dict(load_file(os.path.join(ckpt_dir, LABEL_READOUT_FILE), device=str(device)))
        log(f"resumed at step {step} from {ckpt_dir}")
    losses = LossLog(os.path.join(out_dir, "loss.jsonl"), step if resuming else None)
    evals = LossLog(os.path.join(out_dir, "eval.jsonl"), step if resuming else None)
    note = TruncationNote(log)
    start = time.perf_counter()
    batches = resumable_batches(dataset, cfg.batch_size, cfg.seed, step, cfg.num_workers, collate_fn)
    skipped = BadDataLog()  # unreadable volumes met: summed up once at the end, however often they came up
    for step, batch in zip(range(step, cfg.steps), batches):
        skipped.extend(batch.get("skipped", ()))
        done = step + 1
        if batch["volume"] is None or len(batch["text"]) < 2:
            log(f"step {done}: skipped, fewer than two readable pairs in the batch")
            skip_step(schedule)
        else:
            loss, parts = clip_loss(model, tokenizer, batch, device, autocast, note, readout, cfg.label_weight)
            norm = apply_gradients(loss, optimizer, cfg.grad_clip, step, schedule)
            with torch.no_grad():  # capped in place (as OpenCLIP): past the forward's cap it would get no gradient
                model.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)
            if ema is not None:
                ema.update(model)
            if done % cfg.log_every == 0 or done == cfg.steps:
                temperature = 1.0 / model.logit_scale.detach().exp().item()  # capped after each step
                losses.log(step=done, loss=loss.item(), **{f"{k}_loss": v for k, v in parts.items()}, grad_norm=norm,
                           lr=schedule.get_last_lr()[0], temperature=temperature,
                           seconds=round(time.perf_counter() - start, 2))
                shown = "".join(f" {k} {v:.4f}" for k, v in parts.items())
                log(f"step {done}/{cfg.steps} loss {loss.item():.4f}{shown} grad {norm:.3f} "
                    f"temperature {temperature:.4f}")
        if held_out is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
            model.eval()
            with _weights(model, ema):
                scores = evaluate_retrieval(model, tokenizer, held_out, cfg.batch_size, autocast, note, collate_fn,
                                            cfg.num_workers, readout)
            model.train()
            evals.log(step=done, **scores)
            if scores["n"]:
                shown = (f"; labels read from text {scores['label_acc_text']:.3f}, volume "
                         f"{scores['label_acc_volume']:.3f} (majority {scores['label_acc_majority']:.3f})"
                         if "label_acc_text" in scores else "")
                log(f"eval step {done}: text->volume recall top-1 {scores['top1']:.3f} top-5 {scores['top5']:.3f} "
                    f"over {scores['n']} held-out pairs{shown}")
        if done % cfg.save_every == 0 or done == cfg.steps:
            save_checkpoint(ckpt_dir, done, model, tokenizer, optimizer, ema, cfg, readout, resolved)
    model.eval()
    model.set_gradient_checkpointing(False)
    with _weights(model, ema), atomic_dir(model_dir) as tmp:
        save_text_side(tmp, model, tokenizer)
        save_preprocessing(os.path.join(tmp, CLIP_DIR), cfg)
    if len(skipped):
        log(skipped.summary())
    log(f"wrote {model_dir}")
    return losses


# ----------------------------------------------------------------------------------------------- models
def check_size(size: tuple[int, int, int], patch: tuple[int, int, int]) -> None:
    """Volumes of ``size`` (x, y, z) must tile into the volume tower's ``patch`` (z, y, x, as in its config)."""
    if any(int(s) % int(p) for s, p in zip(tuple(size)[::-1], patch)):
        raise ValueError(f"size {tuple(size)} (x, y, z) must be a multiple of the volume tower's patch "
                         f"{tuple(patch)[::-1]} (x, y, z)")


def new_clip(text: CLIPTextConfig, size: tuple[int, int, int], vision: dict[str, Any] | None, seed: int,
              **settings: Any) -> CLIP3D:
    """A CLIP3D with freshly initialised weights (seeded) for volumes of ``size`` (x, y, z)."""
    vision = {"image_size": tuple(size)[::-1], **(vision or {})}
    check_size(size, vision.get("patch_size", VisionConfig3D.patch_size))
    try:
        config = CLIP3DConfig(text_config=text, vision_config=VisionConfig3D(**vision), **settings)
    except TypeError as err:
        raise ValueError(f"invalid CLIP3D settings ({err})") from None
    torch.manual_seed(seed)
    return CLIP3D(config)


def fresh_clip(tokenizer: CLIPTokenizer, size: tuple[int, int, int], settings: dict[str, Any] | None = None,
               seed: int = 0) -> CLIP3D:
    """A new CLIP3D for ``tokenizer`` and volumes of ``size`` (x, y, z).

    ``settings``: CLIP3D settings over the defaults (Text2CT-sized towers, 768-wide embeddings), e.g.
    ``{"text_config": {"num_hidden_layers": 6}, "vision_config": {"patch_size": [8, 16, 16]},
    "projection_dim": 768}``; the text tower's vocabulary, context and special ids come from the tokenizer.
    """
    settings = dict(settings or {})
    unknown = sorted(set(settings) - {"text_config", "vision_config", "projection_dim", "logit_scale_init_value"})
    if unknown:
        raise ValueError(f"unknown CLIP3D settings {unknown}: use text_config, vision_config, projection_dim")
    text = {**settings.pop("text_config", {}), "vocab_size": tokenizer.vocab_size,
            "max_position_embeddings": tokenizer.context_length, "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    try:
        text_config = CLIPTextConfig(**text)
    except TypeError as err:
        raise ValueError(f"invalid CLIP3D text_config ({err})") from None
    return new_clip(text_config, size, settings.pop("vision_config", None), seed, **settings)


def clip_dir_of(path: str) -> str:
    """``path`` itself when it holds config.json, else its ``clip/`` (a model directory)."""
    sub = os.path.join(path, CLIP_DIR)
    return path if os.path.isfile(os.path.join(path, "config.json")) or not os.path.isdir(sub) else sub


def clip_from(path: str, size: tuple[int, int, int], settings: dict[str, Any] | None = None,
              seed: int = 0) -> CLIP3D:
    """The CLIP3D to fine-tune from ``path`` (a CLIP3D directory or a model directory's ``clip/``).

    A text tower alone (e.g. converted Text2CT weights) gets a fresh volume tower (``settings["vision_config"]``
    over the defaults) of its embedding width.
    """
    directory = clip_dir_of(path)
    if not os.path.isdir(directory):
        raise ValueError(f"--init {path} does not exist")
    config = os.path.join(directory, "config.json")
    if os.path.isfile(config) and "vision_config" in read_json_object(config, "model config"):
        return CLIP3D.from_pretrained(directory)
    text = CLIPTextModelWithProjection.from_pretrained(directory)
    if text.text_projection is None:
        raise ValueError(f"{directory}: the text tower has no projection to share an embedding space with")
    model = new_clip(text.config, size, (settings or {}).get("vision_config"), seed,
                      projection_dim=text.config.projection_dim)
    model.text_model.load_state_dict(text.text_model.state_dict())
    model.text_projection.load_state_dict(text.text_projection.state_dict())
    return model


def find_tokenizer(given: str | None, model_dir: str | None = None) -> str:
    """``given`` (a tokenizer.json, or a directory holding one), else the one of ``model_dir`` (in it, or
    beside its ``clip/``)."""
    if given is not None:
        path = os.path.join(given, TOKENIZER_FILE) if os.path.isdir(given) else given
        if not os.path.isfile(path):
            raise ValueError(f"--tokenizer {given}: no such tokenizer file")
        return path
    if model_dir is not None:
        for path in (os.path.join(model_dir, TOKENIZER_FILE),
                     os.path.join(os.path.dirname(os.path.normpath(model_dir)), TOKENIZER_FILE)):
            if os.path.isfile(path):
                return path
    raise ValueError("no tokenizer: pass --tokenizer tokenizer.json (python -m text2ct_engine.tokenizer train "
                     "--corpus <reports.csv> --out tokenizer.json makes one) or an --init model that has one")


# ----------------------------------------------------------------------------------------------- CLI
def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``clip`` subcommand of ``python -m text2ct_engine.train``; sets ``args.run``."""
    p = sub.add_parser("clip", help="train the 3D CLIP (volume + report towers) on paired data",
                       description=__doc__.split("\n\n")[0])
    add_run_flags(p, resume_help="continue the run in --out (its model and tokenizer)")
    p.add_argument("--tokenizer", type=cli_path,
                   help="tokenizer.json, or a model directory holding one (default: --init's)")
    p.add_argument("--init", type=cli_path,
                   help="CLIP3D directory or model directory (its clip/) to start from; a text "
                                  "tower alone gets a fresh volume tower (default: a fresh CLIP3D)")
    p.add_argument("--config", help="JSON file of training settings (the options below, with underscores) and "
                                    "an optional \"model\" object of CLIP3D settings for a fresh model")
    # unset flags fall back to --config, then (on --resume) the run's settings, then the dataclass
    add_config_flags(p, CLIPTrainConfig, choices={"lr_schedule": ("cosine", "constant"), "resize": ("resize", "crop_pad")},
                     elem_types={"size": int, "spacing": float})
    p.set_defaults(run=run)
    return p


def check_labelled(dataset: Dataset, root: str) -> None:
    """Every study of a (Subset of a) ``data.ctrate.CTRATEDataset`` must have finding labels."""
    indices = range(len(dataset))
    while isinstance(dataset, Subset):
        indices, dataset = [dataset.indices[i] for i in indices], dataset.dataset
    missing = [dataset.records[i].name for i in indices if dataset.records[i].labels is None]
    if missing:
        raise ValueError(f"--label-weight needs finding labels for every training pair, but {len(missing)} of "
                         f"{len(indices)} in {root} have none (first: {missing[0]}): add them to "
                         f"dataset/multi_abnormality_labels/train_predicted_labels.csv, or drop --label-weight")


def read_settings(path: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training settings, CLIP3D settings) from a ``--config`` JSON file."""
    if path is None:
        return {}, {}
    raw = read_json_object(path, "--config file")
    model = raw.pop("model", {})
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(CLIPTrainConfig)})
    if unknown:
        raise ValueError(f"--config {path}: unknown training settings {unknown}")
    if not isinstance(model, dict):
        raise ValueError(f"--config {path}: \"model\" must be a JSON object of CLIP3D settings, got {model!r}")
    return typed_settings(raw, CLIPTrainConfig, f"--config {path}"), model


def run(args: argparse.Namespace) -> None:
    from ..data.ctrate import collate
    from ..pipeline import available_device

    train_settings, model_settings = read_settings(args.config)
    cfg = CLIPTrainConfig(**run_settings(args, CLIPTrainConfig, train_settings))
    cfg.validate()
    device = available_device(args.device)
    train, held = held_out_split(args.data, cfg.size, cfg.spacing, cfg.resize, cfg.eval_size)
    if cfg.label_weight > 0:
        check_labelled(train, args.data)
    ckpt = os.path.join(args.out, "checkpoint")
    if args.resume and checkpoint_state(args.out) is not None:  # the run's own model and tokenizer
        model = CLIP3D.from_pretrained(ckpt)  # train_clip loads its weights again, with the optimizer's state
        tokenizer = CLIPTokenizer.from_file(find_tokenizer(None, ckpt))
    elif args.init:
        model = clip_from(args.init, cfg.size, model_settings, cfg.seed)
        tokenizer = CLIPTokenizer.from_file(find_tokenizer(args.tokenizer, args.init))
    else:
        tokenizer = CLIPTokenizer.from_file(find_tokenizer(args.tokenizer))
        model = fresh_clip(tokenizer, cfg.size, model_settings, cfg.seed)
    tokenizer.context_length = model.config.text_config.max_position_embeddings
    check_size(cfg.size, model.config.vision_config.patch_size)
    model = model.to(device)
    print(f"{len(train)} training pairs, {len(held) if held is not None else 0} held out; CLIP3D "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    train_clip(model, tokenizer, train, cfg, args.out, held, resume=args.resume, collate_fn=collate)
