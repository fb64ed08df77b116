"""Pieces every training loop shares: EMA weights, resumable checkpoints (swapped in whole), the loss log,
run folders, resumable batch order, mixed precision, the optimizer step, the truncation note, held-out data,
config checks (intervals, --config value types, a resume's settings)."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import typing
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Subset

from ..cli import path as cli_path
from ..io_utils import atomic_path, read_json_object, recover_dir, write_json


class EMA:
    """Exponential moving average of a model's floating-point parameters: ema = d * ema + (1 - d) * w, in fp32,
    on the model's device or on ``device`` (``"cpu"``: in host RAM, off the GPU, for one device-to-host copy of
    the weights per update).

    Warm-up (as diffusers' ``EMAModel``): update n (from 0) uses d = min(decay, (1 + n) / (10 + n)), so a short
    run from scratch does not keep its random initial weights (0.999 ** 1000 = 37 % of them without it)."""

    NO_WARMUP = 10 ** 12  # an update count past any warm-up

    def __init__(self, model: torch.nn.Module, decay: float = 0.999, device: str | torch.device | None = None
                 ) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay, self.updates = decay, 0
        self.shadow = {k: p.detach().to(p.device if device is None else device, torch.float32, copy=True)
                       for k, p in model.named_parameters()}

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @property
    def device(self) -> torch.device | None:
        return next(iter(self.shadow.values())).device if self.shadow else None

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        for k, p in model.named_parameters():
            shadow = self.shadow[k]
            shadow.lerp_(p.detach().to(shadow.device, torch.float32), weight)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """Temporarily swap the EMA weights into ``model`` (for sampling or saving)."""
        saved = {k: p.detach().clone() for k, p in model.named_parameters()}
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in model.named_parameters():
                    p.copy_(saved[k])


def save_training_state(directory: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        ema: EMA | None, extra: dict | None = None) -> None:
    """Write ``model.safetensors``, ``ema.safetensors``, ``optimizer.pt`` and ``state.json`` into ``directory``.

    Write into the folder that :func:`io_utils.atomic_dir` yields, so that the checkpoint is replaced as a whole.
    """
    os.makedirs(directory, exist_ok=True)
    with atomic_path(os.path.join(directory, "model.safetensors")) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp)
    if ema is not None:
        with atomic_path(os.path.join(directory, "ema.safetensors")) as tmp:
            save_file({k: v.contiguous().cpu() for k, v in ema.shadow.items()}, tmp,
                      metadata={"updates": str(ema.updates)})
    with atomic_path(os.path.join(directory, "optimizer.pt")) as tmp:
        torch.save(optimizer.state_dict(), tmp)
    write_json(os.path.join(directory, "state.json"), {"step": step, **(extra or {})})


def checkpoint_state(out_dir: str) -> dict | None:
    """``state.json`` of the run in ``out_dir`` (after :func:`io_utils.recover_dir`), None without a checkpoint."""
    ckpt_dir = os.path.join(out_dir, "checkpoint")
    if os.path.isdir(out_dir):
        recover_dir(ckpt_dir)
    path = os.path.join(ckpt_dir, "state.json")
    return read_json_object(path, "checkpoint state") if os.path.isfile(path) else None


def load_training_state(directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        ema: EMA | None, schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
                        config: dict | None = None, free: Sequence[str] = ()) -> dict:
    """Restore what :func:`save_training_state` wrote; returns ``state.json`` (with ``step``).

    ``schedule`` (created before this call) is moved to the checkpoint's step, so the next ``schedule.step()``
    gives the learning rate of the step after it, as in an uninterrupted run. With ``config`` (this run's
    settings), a checkpoint made with other settings (but those in ``free``) is refused first
    (:func:`check_resumed_config`).
    """
    path = os.path.join(directory, "state.json")
    if not os.path.isfile(path):
        raise ValueError(f"cannot resume: {directory} holds no state.json (not a training checkpoint)")
    state = read_json_object(path, "checkpoint state")
    if config is not None:
        check_resumed_config(state.get("config"), config, free)
    device = next(model.parameters()).device
    model.load_state_dict(load_file(os.path.join(directory, "model.safetensors"), device=str(device)))
    ema_path = os.path.join(directory, "ema.safetensors")
    if ema is not None and os.path.isfile(ema_path):
        ema.shadow = load_file(ema_path, device=str(ema.device or device))
        with safe_open(ema_path, "pt") as f:  # a checkpoint from before the warm-up goes on without one, as it ran
            ema.updates = int((f.metadata() or {}).get("updates", EMA.NO_WARMUP))
    optimizer.load_state_dict(torch.load(os.path.join(directory, "optimizer.pt"), map_location=device,
                                         weights_only=True))
    if schedule is not None:
        schedule.last_epoch = int(state["step"])
    return state


class LossLog:
    """Appends one JSON line per logged step to ``path`` (and keeps this run's values for callers and tests).

    ``resume_step``: the step a resumed run continues from; rows past it (written after the checkpoint by
    an interrupted run) are dropped. None (a fresh run) starts an empty log.
    """

    def __init__(self, path: str | None, resume_step: int | None = None) -> None:
        self.path, self.rows = path, []
        if path:
            kept = _rows_until(path, resume_step) if resume_step is not None else []
            with atomic_path(path) as tmp, open(tmp, "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in kept)

    def log(self, **row) -> None:
        self.rows.append(row)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def _rows_until(path: str, step: int) -> list[dict]:
    """The rows of the log ``path`` up to ``step`` (a half-written last line is dropped)."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                rows.append(row)
    return rows


def open_run(out_dir: str, resume: bool) -> tuple[str, str, bool]:
    """``(out/checkpoint, out/model, whether there is a checkpoint to resume)``; creates ``out_dir``.

    Refuses a folder that already holds a run unless ``resume`` is set; finishes an interrupted checkpoint
    swap first (:func:`io_utils.recover_dir`).
    """
    ckpt_dir, model_dir = os.path.join(out_dir, "checkpoint"), os.path.join(out_dir, "model")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} is a file, not a run folder: pick another --out")
    if os.path.isdir(out_dir):
        recover_dir(ckpt_dir)
        recover_dir(model_dir)
    if os.path.exists(ckpt_dir) and not resume:
        raise ValueError(f"{out_dir} already holds a training run: pass --resume to continue it, or pick "
                         f"another --out")
    if resume and not os.path.exists(ckpt_dir):  # fine for a job that is always started with --resume,
        # but a mistyped --out should not go unnoticed
        print(f"note: --resume: {out_dir} holds no checkpoint yet: starting a new run there", file=sys.stderr)
    os.makedirs(out_dir, exist_ok=True)
    return ckpt_dir, model_dir, resume and os.path.exists(ckpt_dir)


def check_intervals(cfg: Any, names: Sequence[str] = ("log_every", "save_every")) -> None:
    """Every field ``names`` of ``cfg`` (intervals, counts; and ``num_workers`` >= 0) must be a whole number >= 1."""
    for name in names:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} (--{name.replace('_', '-')}) must be at least 1, got {getattr(cfg, name)}")
    if getattr(cfg, "num_workers", 0) < 0:
        raise ValueError(f"num_workers (--num-workers) must be 0 or more, got {cfg.num_workers}")


def check_optimizer_settings(cfg: Any, rates: Sequence[str] = ("lr",)) -> None:
    """The optimizer numbers every training config has, checked before a run folder is made: learning
    rates (``rates``) and ``grad_clip`` finite and > 0, ``weight_decay`` and ``warmup_steps`` >= 0,
    ``ema_decay`` off (None or 0) or in (0, 1)."""
    def flag(name: str) -> str:
        return f"{name} (--{name.replace('_', '-')})"

    for name in (*rates, "grad_clip"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag(name)} must be a finite number > 0, got {value}")
    for name in ("weight_decay", "warmup_steps"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{flag(name)} must be a finite number >= 0, got {value}")
    if cfg.ema_decay and not 0.0 < cfg.ema_decay < 1.0:  # 0 and None both mean no EMA, as in the trainers
        raise ValueError(f"{flag('ema_decay')} must lie strictly between 0 and 1 (0: off), got {cfg.ema_decay}")


def check_resumed_config(saved: dict | None, current: dict, free: Sequence[str]) -> None:
    """Refuse to resume with settings that change the math: every key of ``current`` but those in ``free``
    must equal the checkpoint's ``saved`` config (as JSON)."""
    if not saved:
        return
    now = json.loads(json.dumps(current))
    changed = [k for k in now if k not in free and k in saved and json.loads(json.dumps(saved[k])) != now[k]]
    if changed:
        diff = ", ".join(f"{k} {shown_setting(saved[k])} -> {shown_setting(now[k])}" for k in changed)
        raise ValueError(f"cannot resume with other settings than the run started with ({diff}): resume with "
                         f"the run's settings, or start a new run in another --out")


# settings a trainer resolves for its device ("auto", None): where the run left them to the device, a resume does
# not take them from the checkpoint, so one on another kind of device that would compute differently is refused
# (for_device), not switched; typed ones are taken. The checkpoint's state.json lists the resolved ones.
RESOLVED_ON_DEVICE = ("mixed_precision", "adv_weight")


def device_resolved(cfg: Any) -> list[str]:
    """The settings of ``cfg`` left to the device (``"auto"`` or None), for the checkpoint's ``resolved_on_device``."""
    return [k for k in RESOLVED_ON_DEVICE if hasattr(cfg, k) and getattr(cfg, k) in ("auto", None)]


def run_settings(args: argparse.Namespace, config_cls: type, file_settings: dict[str, Any] | None = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """The settings of a training command, as keyword arguments of the dataclass ``config_cls``: on
    ``--resume`` the checkpoint's (so that a resume needs no setting typed again), over them ``file_settings``
    (a ``--config`` file), over those the flags typed (:func:`add_config_flags`); the rest take the
    dataclass's defaults. The settings taken from the checkpoint that differ from the defaults are logged."""
    names = [f.name for f in dataclasses.fields(config_cls)]
    given = {**(file_settings or {}), **{k: getattr(args, k) for k in names if hasattr(args, k)}}
    saved: dict[str, Any] = {}
    if args.resume:
        state = checkpoint_state(args.out) or {}
        raw = state.get("config") or {}
        left_to_device = state.get("resolved_on_device", RESOLVED_ON_DEVICE)  # older checkpoints: all of them
        inherited = [k for k in names if k not in left_to_device]
        saved = typed_settings({k: v for k, v in raw.items() if k in inherited}, config_cls,
                               f"{os.path.join(args.out, 'checkpoint', 'state.json')}")
        log_taken("settings", saved, given, log, vars(config_cls()))
    return {**saved, **given}


def log_taken(what: str, saved: dict[str, Any], given: dict[str, Any], log: Callable[[str], None] = print,
              defaults: dict[str, Any] | None = None) -> None:
    """One line naming the ``saved`` settings a resume takes because they were not ``given`` (with
    ``defaults``: only those that differ from them)."""
    taken = [f"{k} {shown_setting(v)}" for k, v in saved.items()
             if k not in given and (defaults is None or v != defaults[k])]
    if taken:
        log(f"--resume: the run's {what} {', '.join(taken)}")


def shown_setting(value: Any) -> str:
    """A setting as a command line would type it."""
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def typed_settings(raw: dict[str, Any], config_cls: type, where: str) -> dict[str, Any]:
    """``raw`` (e.g. a JSON file's values for fields of the dataclass ``config_cls``) with each value checked
    against its field's type (ints, floats, strings, booleans, triples, None where allowed)."""
    hints = typing.get_type_hints(config_cls)
    return {k: _typed(v, hints[k], f"{where}: {k}") for k, v in raw.items()}


_KINDS = {bool: ("true or false", lambda v: isinstance(v, bool)), str: ("a string", lambda v: isinstance(v, str)),
          int: ("a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool)),
          float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))}


def _typed(value: Any, hint: Any, name: str) -> Any:
    """``value`` checked against the type ``hint`` (``X | None``, ``tuple[X, X, X]`` or one of ``_KINDS``)."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is tuple:
        n = len(typing.get_args(hint))
        if not isinstance(value, (list, tuple)) or len(value) != n:
            raise ValueError(f"{name} must be a list of {n} numbers, got {value!r}")
        return tuple(_typed(v, typing.get_args(hint)[0], name) for v in value)
    kind, fits = _KINDS.get(hint, (None, lambda v: True))
    if not fits(value):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return float(value) if hint is float else value


def autocast_enabled(mixed_precision: str, device: torch.device) -> bool:
    """bf16 autocast for ``"bf16"``, and for ``"auto"`` on CUDA; ``"no"`` computes in the weights' dtype."""
    if mixed_precision not in ("auto", "bf16", "no"):
        raise ValueError(f"mixed_precision must be auto, bf16 or no, got {mixed_precision!r}")
    return mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")


def for_device(cfg: Any, device: torch.device) -> tuple[Any, bool]:
    """``cfg`` with its device-dependent ``mixed_precision="auto"`` made explicit ("bf16" or "no"), and
    whether to autocast: the checkpoint records what ran, so a resume on another kind of device that would
    compute differently is refused instead of silently switching precision."""
    autocast = autocast_enabled(cfg.mixed_precision, device)
    return dataclasses.replace(cfg, mixed_precision="bf16" if autocast else "no"), autocast


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int,
                    cosine_steps: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the optimizer's lr over ``warmup_steps``, then constant, or with ``cosine_steps``
    a cosine decay that reaches 0 at step ``cosine_steps``.

    Create it before loading the optimizer's state and pass it to :func:`load_training_state` on a resume.
    """
    def factor(s: int) -> float:
        warm = min(1.0, (s + 1) / max(1, warmup_steps))
        if cosine_steps is None or s < warmup_steps:
            return warm
        progress = min(1.0, (s - warmup_steps) / max(1, cosine_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_batch_size(dataset: Dataset, batch_size: int) -> None:
    """A one-line ``ValueError`` when ``dataset`` holds less than one batch (before a run folder is made)."""
    if len(dataset) < batch_size:
        raise ValueError(f"the data set has {len(dataset)} items, fewer than one batch of {batch_size}: lower "
                         f"--batch-size or add data")


def resumable_batches(dataset: Dataset, batch_size: int, seed: int, start_step: int = 0, num_workers: int = 0,
                      collate_fn: Callable[[list], Any] | None = None) -> Iterator[Any]:
    """Endless shuffled batches for steps ``start_step, start_step + 1, ...`` (incomplete batches dropped).

    Epoch e is a permutation drawn from ``seed + e``, so a resumed run gets exactly the batches the
    uninterrupted run would have, without loading the ones it skips.
    """
    check_batch_size(dataset, batch_size)
    per_epoch = len(dataset) // batch_size
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        plan = [order[i * batch_size:(i + 1) * batch_size] for i in range(skip, per_epoch)]
        yield from DataLoader(dataset, batch_sampler=plan, num_workers=num_workers, collate_fn=collate_fn)
        epoch, skip = epoch + 1, 0


def apply_gradients(loss: torch.Tensor, optimizer: torch.optim.Optimizer, grad_clip: float, step: int,
                    schedule: torch.optim.lr_scheduler.LRScheduler | None = None) -> float:
    """Backward, clip the gradient norm, step the optimizer (and schedule), clear the gradients.

    Returns the gradient norm before clipping; a non-finite loss is a ``ValueError`` naming the step.
    """
    if not torch.isfinite(loss):
        raise ValueError(f"the loss became {loss.item()} at step {step}: lower --lr, or check the data")
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    if schedule is not None:
        schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def skip_step(schedule: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Advance ``schedule`` over a step whose batch was unreadable: it counts steps, skipped or not, as a resume
    sets it (``last_epoch = step``). Without torch's warning about a schedule step before any optimizer step."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        schedule.step()


class TruncationNote:
    """Turns the tokenizer's per-report truncation warnings into one note per run."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log, self.given = log, False

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """Run tokenization inside this; other warnings pass through."""
        from ..tokenizer import PromptTruncatedWarning

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PromptTruncatedWarning)
            yield
        truncated = [w for w in caught if issubclass(w.category, PromptTruncatedWarning)]
        for w in caught:
            if w not in truncated:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        if truncated and not self.given:
            self.given = True
            self.log(f"note: reports longer than the text context are truncated ({truncated[0].message}); "
                     f"further truncations are not reported")


def held_out_split(root: str, size: Sequence[int] | None, spacing: Sequence[float] | None, mode: str, count: int,
                   require_report: bool = True) -> tuple[Dataset, Dataset | None]:
    """Training and held-out data from a CT-RATE-layout folder (CT-RATE or phantoms); items as
    ``data.ctrate.CTRATEDataset`` gives them (pair with ``data.ctrate.collate``).

    Held out: the first ``count`` items of the ``valid`` split when there is one, else the last ``count`` of
    ``train`` (then left out of training); None for ``count`` 0. Problems are one-line ``ValueError``s.
    """
    from ..data.ctrate import CTRATEDataset, dataset_root, find_volume_dir
    from ..data.errors import DataError

    if not os.path.isdir(root):
        raise ValueError(f"data directory {root} does not exist: point --data at a CT-RATE-layout folder "
                         f"(python -m text2ct_engine.data.phantom writes one)")
    try:
        train = CTRATEDataset(root, "train", spacing, size, mode, require_report=require_report)
        valid = (CTRATEDataset(root, "valid", spacing, size, mode, require_report=require_report)
                 if count > 0 and find_volume_dir(dataset_root(root), "valid") else None)
    except DataError as err:
        raise ValueError(str(err)) from None
    if len(train) == 0:
        raise ValueError(f"{root} holds no usable training {'pair' if require_report else 'volume'}")
    if count <= 0:
        return train, None
    if valid is not None and len(valid) > 0:
        return train, Subset(valid, range(min(count, len(valid))))
    if len(train) <= count:
        raise ValueError(f"{root} has {len(train)} training items and no valid split to hold {count} out of: "
                         f"hold out fewer (or 0)")
    return Subset(train, range(len(train) - count)), Subset(train, range(len(train) - count, len(train)))


PRECISIONS = ("auto", "bf16", "no")
CTRATE_DATA_HELP = "CT-RATE-layout folder (CT-RATE, or python -m ...data.phantom)"


def add_run_flags(parser: argparse.ArgumentParser, data_help: str = CTRATE_DATA_HELP,
                  resume_help: str = "continue the run in --out") -> None:
    """The flags every training command has: --data, --out (the run directory), --device, --resume."""
    parser.add_argument("--data", type=cli_path, required=True, help=data_help)
    parser.add_argument("--out", type=cli_path, required=True, help="run directory")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--resume", action="store_true", help=resume_help)


def add_config_flags(parser: argparse.ArgumentParser, config_cls: type, *, choices: dict | None = None,
                     helps: dict | None = None, elem_types: dict | None = None) -> None:
    """One command-line flag per field of a training-config dataclass: ``--field-name`` (booleans also
    ``--no-field-name``; tuples: three values). ``elem_types`` gives the element type of tuple
    fields whose default is None. Flags not typed stay out of the namespace, so that a resumed run's
    settings or a config file can fill them (:func:`run_settings`)."""
    defaults = config_cls()
    choices = {"mixed_precision": PRECISIONS, **(choices or {})}
    for f in dataclasses.fields(config_cls):
        value, name = getattr(defaults, f.name), f.name.replace("_", "-")
        shown = "on" if value is True else "none" if value is None else shown_setting(value)
        kw = {"default": argparse.SUPPRESS,
              "help": (helps or {}).get(f.name, f"default: {shown}")}
        if isinstance(value, bool):  # --name and --no-name: a resume may switch either way
            parser.add_argument(f"--{name}", dest=f.name, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(value, tuple) or f.name in (elem_types or {}):
            elem = (elem_types or {}).get(f.name) or type(value[0])
            parser.add_argument(f"--{name}", type=elem, nargs=3, metavar=("X", "Y", "Z"), **kw)
        else:
            parser.add_argument(f"--{name}", type=float if value is None else type(value),
                                choices=choices.get(f.name), **kw)
