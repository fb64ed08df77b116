"""Pieces every training loop shares: EMA weights, resumable checkpoints, the loss log."""
from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

from ..io_utils import atomic_path, write_json


class EMA:
    """Exponential moving average of a model's floating-point parameters: ema = d * ema + (1 - d) * w."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, p in model.named_parameters():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - self.decay)

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
    """Write ``model.safetensors``, ``ema.safetensors``, ``optimizer.pt`` and ``state.json`` (each atomic)."""
    os.makedirs(directory, exist_ok=True)
    with atomic_path(os.path.join(directory, "model.safetensors")) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp)
    if ema is not None:
        with atomic_path(os.path.join(directory, "ema.safetensors")) as tmp:
            save_file({k: v.contiguous().cpu() for k, v in ema.shadow.items()}, tmp)
    with atomic_path(os.path.join(directory, "optimizer.pt")) as tmp:
        torch.save(optimizer.state_dict(), tmp)
    write_json(os.path.join(directory, "state.json"), {"step": step, **(extra or {})})


def load_training_state(directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        ema: EMA | None) -> dict:
    """Restore what :func:`save_training_state` wrote; returns ``state.json`` (with ``step``)."""
    path = os.path.join(directory, "state.json")
    if not os.path.isfile(path):
        raise ValueError(f"cannot resume: {directory} holds no state.json (not a training checkpoint)")
    device = next(model.parameters()).device
    model.load_state_dict(load_file(os.path.join(directory, "model.safetensors"), device=str(device)))
    if ema is not None and os.path.isfile(os.path.join(directory, "ema.safetensors")):
        ema.shadow = load_file(os.path.join(directory, "ema.safetensors"), device=str(device))
    optimizer.load_state_dict(torch.load(os.path.join(directory, "optimizer.pt"), map_location=device,
                                         weights_only=True))
    with open(path) as f:
        return json.load(f)


class LossLog:
    """Appends one JSON line per logged step to ``path`` (and keeps the values for callers and tests)."""

    def __init__(self, path: str | None) -> None:
        self.path, self.rows = path, []

    def log(self, **row) -> None:
        self.rows.append(row)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
