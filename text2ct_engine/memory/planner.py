"""The planner: each phase run on fake tensors under a tracker, its device and host peaks, and the report
(table and one summary line per job)."""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .. import ops
from .autocast import AutocastEmulation
from .tracker import GIB, MemoryTracker, PeakPoint
from .workloads import (Setup, clip_training_step, decode_step, encode_step, patch_problem, sampling_step,
                        training_step, vae_training_step)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WHAT = ("sample", "cache", "train", "train-vae", "train-clip", "all")


@dataclass
class PhasePlan:
    """One planned phase: device and host peaks (bytes), where the device peak happened, notes."""
    key: str  # sample | decode_* | encode_* (untiled, tiled, tiled_fast, tiled_device) | train | train_ckpt
    phase: str
    device_bytes: int
    host_bytes: int
    notes: str = ""
    peak_module: str = ""
    peak_op: str = ""
    peak_in_backward: bool = False
    peak_source: str = ""
    backend: str = "triton"
    seconds: float = 0.0

    @property
    def device_gib(self) -> float:
        return self.device_bytes / GIB

    @property
    def host_gib(self) -> float:
        return self.host_bytes / GIB


def track(workload: Callable[..., None], *args: Any, fake: bool = True, backend: str = "triton"
          ) -> MemoryTracker:
    """Run ``workload(*args)`` under a :class:`MemoryTracker`, on fake tensors when ``fake``, with an ops
    backend; autocast regions on ``meta`` tensors as CUDA's (:class:`AutocastEmulation`). Build the networks
    (on the meta device) before: what exists beforehand is not counted."""
    tracker = MemoryTracker()
    tracker.name_modules(*(a for a in args if isinstance(a, nn.Module)))
    with (FakeTensorMode() if fake else nullcontext()), ops.backend(backend), AutocastEmulation("meta"), tracker:
        workload(*args)
    return tracker


Workload = Callable[..., None]  # (setup, *networks): one phase, run inside a tracker
Networks = Callable[[Setup], tuple]  # a phase's networks for a setup, built on the meta device


def run_phase(key: str, name: str, workload: Workload, s: Setup, notes: str = "",
              backend: str = "triton", networks: Networks | None = None) -> PhasePlan:
    """Plan one phase on fake tensors: ``workload(s, *networks(s))`` (default ``Setup.networks``: UNet, VAE, text
    tower). If the Triton custom ops' fake path fails, plan with torch ops."""
    start = time.perf_counter()
    networks = networks or Setup.networks
    try:
        tracker = track(workload, s, *networks(s), backend=backend)
    except Exception as err:  # noqa: BLE001 - any failure of the fake triton path: say so and use torch
        if backend != "triton":
            raise
        tracker = track(workload, s, *networks(s), backend="torch")
        notes = f"{notes}; torch ops (triton fake path failed: {type(err).__name__}: {str(err)[:80]})"
        backend = "torch"
    point = tracker.peak_at.get(s.device, PeakPoint())
    host = tracker.peak.get(s.host, 0) if s.host != s.device else 0
    return PhasePlan(key, name, tracker.peak.get(s.device, 0), host, notes.strip("; "), _short(point.module),
                     point.op, point.backward, point.source, backend, round(time.perf_counter() - start, 2))


def _short(module: str) -> str:
    """'DiffusionUNet.up_blocks.1.resnets.0.conv1.conv' -> 'up_blocks.1.resnets.0.conv1.conv'."""
    return module.split(".", 1)[1] if "." in module else module


def weight_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of ``module``'s parameters held in ``dtype``."""
    return sum(math.prod(p.shape) for p in module.parameters()) * torch.finfo(dtype).bits // 8


def vae_pass_phases(kind: str, label: str, step: Workload, s: Setup, notes: str) -> list[Phase]:
    """A VAE pass (``kind`` decode or encode) untiled, exact tiled in both host-memory modes with activations
    on the host, and tiled with activations on the device: keys ``<kind>_untiled``, ``<kind>_tiled``,
    ``<kind>_tiled_fast``, ``<kind>_tiled_device``."""
    tiled = f"{label}, exact tiled, slab {s.slab}"
    out = [Phase(f"{kind}_untiled", f"{label}, untiled", step, notes=notes)]
    for mode, key in (("low", f"{kind}_tiled"), ("fast", f"{kind}_tiled_fast")):
        out.append(Phase(key, f"{tiled}, host_memory={mode}", partial(step, slab=s.slab, host_memory=mode),
                         notes=f"{notes}; activations on the host"))
    out.append(Phase(f"{kind}_tiled_device", f"{tiled}, activations on the device",
                     partial(step, slab=s.slab, on_device=True),
                     notes=f"{notes}; what storage=auto picks where it fits"))
    return out


@dataclass
class Phase:
    """A phase to plan: its key, label, workload, the networks it runs (default ``Setup.networks``), notes."""
    key: str
    label: str
    workload: Workload
    networks: Networks | None = None
    notes: str = ""


def _training_phases(s: Setup, key: str, job: str, step: Callable[..., None], networks: Networks | None,
                     *trained: nn.Module) -> list[Phase]:
    """A training step without and with gradient checkpointing (keys ``key``, ``key_ckpt``) of the networks
    ``trained`` (their AdamW state in the notes)."""
    n = sum(math.prod(p.shape) for module in trained for p in module.parameters())
    compute = "" if s.dtype == torch.float32 else f", {_name(s.dtype)} compute"
    static = f"fp32 weights + grads{compute}, AdamW 2x fp32 {8 * n / GIB:.2f} GiB"
    return [Phase(f"{key}_ckpt" if ckpt else key, job + (", grad checkpointing" if ckpt else ""),
                  partial(step, checkpointing=ckpt), networks, static) for ckpt in (False, True)]


def phases(s: Setup, what: str = "all") -> list[Phase]:
    """The phases of ``s`` that ``what`` (see ``WHAT``) plans, in order."""
    if what not in WHAT:
        raise ValueError(f"--what must be one of {', '.join(WHAT)}, got {what!r}")
    unet, vae, text = s.networks()
    gib = lambda module, dtype: f"{weight_bytes(module, dtype) / GIB:.2f}"  # noqa: E731
    out = []
    if what in ("sample", "all"):
        weights = f"weights UNet {gib(unet, s.dtype)} + VAE {gib(vae, s.dtype)}" + \
            (f" + text tower {gib(text, s.dtype)}" if text is not None else "") + " GiB"
        out.append(Phase("sample", f"sample: CFG UNet step (batch {2 * s.batch} = cond + uncond)", sampling_step,
                         notes=weights))
        out += vae_pass_phases("decode", "decode: VAE", decode_step, s, weights)
    if what in ("cache", "all"):
        out += vae_pass_phases("encode", "latent cache: VAE encode", encode_step, s,
                               f"VAE weights {gib(vae, s.dtype)} GiB; batch {s.batch}")
    if what in ("train", "all"):
        train = _training_phases(s, "train", f"train: UNet step, batch {s.batch}", training_step, None, unet)
        for phase in train:
            where = " in host RAM" if s.ema_offload else ""
            phase.notes += (f", EMA fp32 {gib(unet, torch.float32)} GiB{where}" if s.ema else "") + \
                (f"; frozen fp32 text tower {gib(text, torch.float32)} GiB" if text is not None else "")
        out += train
    problem = patch_problem(s)
    if what == "train-vae" and problem:
        raise ValueError(problem)
    if what == "train-vae" or (what == "all" and not problem):  # all: skipped where the patch does not fit
        x, y, z = s.patch
        vae_train = _training_phases(s, "train_vae", f"train vae: batch {s.batch} of {x}x{y}x{z} patches + "
                                     "discriminator step", vae_training_step, Setup.vae_training_networks,
                                     *s.vae_training_networks())
        for phase in vae_train:
            phase.notes += "; host: the loader's batch of whole fp32 volumes, cropped there (each --num-workers " \
                           "process holds its own prefetched batches on top)"
        out += vae_train
    if what in ("train-clip", "all"):
        x, y, z = s.clip_volume
        clip, = s.clip_networks()
        out += _training_phases(s, "train_clip", f"train clip: batch {s.clip_batch} of {x}x{y}x{z} volumes, "
                                f"{s.context_length} tokens", clip_training_step, Setup.clip_networks, clip)
    return out


def plan(s: Setup, what: str = "all", backend: str = "triton") -> list[PhasePlan]:
    """Plan the sampling, latent-cache and/or training phases of ``s`` (see the module docstring)."""
    return [run_phase(p.key, p.label, p.workload, s, p.notes, backend, p.networks) for p in phases(s, what)]


def _name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def table(rows: Sequence[PhasePlan]) -> str:
    """The plan as an aligned text table: phase, device peak GiB, host GiB, notes."""
    head = ("phase", "device peak GiB", "host GiB", "notes")
    cells = [(r.phase, f"{r.device_gib:.2f}", f"{r.host_gib:.2f}", f"{r.notes}; {where(r)}") for r in rows]
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(3)]
    lines = ["  ".join(c[i].ljust(widths[i]) if i < 3 else c[i] for i in range(4)) for c in [head, *cells]]
    return "\n".join(lines)


def where(r: PhasePlan) -> str:
    """'peak in backward of up_blocks.1.resnets.0 (convolution)' / '... at tiling/nodes.py:80 normalize'."""
    module = "" if r.peak_module == "Global" else f" of {r.peak_module}"
    at = f" at {r.peak_source}" if r.peak_source and (not module or r.peak_source.startswith("tiling")) else ""
    return f"peak in {'backward' if r.peak_in_backward else 'forward'}{module} ({r.peak_op}){at}"


def summary(rows: Sequence[PhasePlan]) -> list[str]:
    """One line per job: the largest device peak among the phases that job runs."""
    by = {r.key: r for r in rows}
    out = []
    variants = (("tiled", "tiled (host_memory=low)"), ("tiled_fast", "tiled (host_memory=fast)"),
                ("tiled_device", "tiled (activations on the device)"), ("untiled", "untiled"))
    for job, kind, before in (("sampling", "decode", "sample"), ("latent cache", "encode", None)):
        for key, variant in variants:
            r = by.get(f"{kind}_{key}")
            if r is not None:
                peak = max(by[before].device_gib, r.device_gib) if before else r.device_gib
                out.append(f"{job} with the {variant} {kind}: {peak:.2f} GiB device, {r.host_gib:.2f} GiB host")
    for key, label in (("train", "UNet training"), ("train_vae", "VAE training"), ("train_clip", "CLIP training")):
        for k, how in ((key, ""), (f"{key}_ckpt", " with gradient checkpointing")):
            if k in by:
                out.append(f"{label}{how}: {by[k].device_gib:.2f} GiB device")
    return out
