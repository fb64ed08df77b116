"""Peak-memory planner: how much GPU (and host) memory sampling, the latent cache and training need, computed
without a GPU.

    python -m text2ct_engine.memory                      # Text2CT at 512x512x128, bf16, batch 1
    python -m text2ct_engine.memory --what train --ema --dtype fp32 --json plan.json

The networks are built on the meta device and run on *fake* tensors (``FakeTensorMode``): every op computes
only shapes, dtypes and strides, so a full-size step takes seconds on a CPU. :class:`MemoryTracker` (a
``TorchDispatchMode``) counts the bytes of every live tensor storage per device, op by op, and keeps the peak
and the module and op where it happened. The same tracker runs unchanged on real tensors, which is how the
tests check that a plan equals a measurement.

Devices of a plan: the accelerator is the fake ``meta`` device and the host is the fake ``cpu`` device.
(On this project's CPU-only torch build, fake ``cuda`` tensors cannot be indexed from Python or copied to
from the host, and their backward aborts the process; ``meta`` has none of these problems, and the custom
ops' fake impls accept it.) GroupNorm and attention run as the engine's Triton custom ops (backend
``triton``), whose fake impls allocate what the GPU kernels return and save for backward (scratch buffers a
kernel allocates inside the op are not seen). ``--backend torch`` plans plain torch ops instead; on ``meta``
attention then takes SDPA's math path (the full attention matrix), an upper bound for CUDA's fused kernels.

Accounting: storages are rounded up to 512 bytes like CUDA's caching allocator, so a phase's figure
corresponds to ``torch.cuda.max_memory_allocated``. Not included: the CUDA context (~0.3-0.6 GiB outside
the allocator), cuDNN/cuBLAS workspaces, and the allocator's reserved-but-free slack (fragmentation).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import weakref
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import ops
from .cli import Parser, check_output_file, path as cli_path, run_guarded
from .models import AutoencoderKL, DiffusionUNet
from .pipeline import PipelineConfig, Text2CTPipeline
from .tiling import tiled_decode, tiled_encode

GIB = 2 ** 30
BLOCK = 512  # CUDA's caching allocator rounds every block up to a multiple of 512 bytes
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WHAT = ("sample", "cache", "train", "all")
DEVICE, HOST = "meta", "cpu"  # the planned accelerator and the host, as fake-tensor devices


# ------------------------------------------------------------------------------------------ the tracker
@dataclass
class PeakPoint:
    """Where a device's live bytes peaked: op counter, op name, innermost module, forward or backward."""
    bytes: int = 0
    step: int = 0
    op: str = ""
    module: str = ""
    backward: bool = False
    source: str = ""  # innermost engine source line (models, tiling, pipeline) running at the peak


_SELF = os.path.abspath(__file__)
_PACKAGE = os.path.dirname(_SELF)
SOURCE_SKIP = ("ops", "cli.py")  # frames that say nothing about where in a model the peak is


def engine_source() -> str:
    """'tiling/nodes.py:80 normalize': the innermost frame in this package outside ops/ and this planner."""
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(_PACKAGE) and path != _SELF:
            name = os.path.relpath(path, _PACKAGE)
            if name.split(os.sep)[0] not in SOURCE_SKIP:
                return f"{name}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return ""


class ModuleStack:
    """Which module is running: a name stack kept by global forward hooks (forward, and checkpoint
    recomputation in backward). In backward the running autograd node names the module whose forward
    output it belongs to (recorded on the node), else its own name (``AddBackward0``).

    Unlike ``torch.utils.module_tracker.ModuleTracker`` it registers no gradient hooks, which hold
    autograd graphs in reference cycles and so change when tensors are freed.
    """

    def __init__(self) -> None:
        self.stack: list[tuple[int, str]] = []  # (id(module), name), innermost last
        self._names: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._handles: list = []

    def name(self, module: nn.Module) -> str:
        if module not in self._names:  # a new root: name it and everything below it
            root = type(module).__name__
            for sub_name, sub in module.named_modules():
                self._names.setdefault(sub, f"{root}.{sub_name}" if sub_name else root)
        return self._names[module]

    def _pre(self, module: nn.Module, _args: Any) -> None:
        self.stack.append((id(module), self.name(module)))

    def _post(self, module: nn.Module, _args: Any, output: Any) -> None:
        # also called when forward raised (checkpoint stops recomputation that way): unwind to this module
        name = self.name(module)
        while self.stack and self.stack.pop()[0] != id(module):
            pass
        for t in tree_leaves(output):
            if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                t.grad_fn.metadata.setdefault("module", name)  # innermost module first

    def current(self) -> str:
        if self.stack:
            return self.stack[-1][1]
        node = torch._C._current_autograd_node()
        if node is None:
            return "Global"
        return node.metadata.get("module", node.name())

    def __enter__(self) -> "ModuleStack":
        self._handles = [nn.modules.module.register_module_forward_pre_hook(self._pre),
                         nn.modules.module.register_module_forward_hook(self._post, always_call=True)]
        return self

    def __exit__(self, *args: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self.stack = [], []


class MemoryTracker(TorchDispatchMode):
    """Live tensor bytes per device over time, with the peak and the module active at the peak.

    Every storage an op returns is counted once (views share it) from its creation until it is freed
    (a weakref callback on the storage), rounded up to ``block`` bytes. Storages that already existed when
    the tracker started count only if passed to :meth:`add`. The same on real and fake tensors.
    ``timeline`` holds (op counter, device, live bytes) each time a device's live bytes changed.
    """

    def __init__(self, block: int = BLOCK, timeline: bool = True) -> None:
        super().__init__()
        self.block = block
        self.live: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.peak_at: dict[str, PeakPoint] = {}
        self.timeline: list[tuple[int, str, int]] | None = [] if timeline else None
        self.step = 0
        self._storages: dict[int, tuple[weakref.ref, str, int]] = {}
        self._dirty: set[str] = set()
        self._modules = ModuleStack()

    # ---------------------------------------------------------------- bookkeeping
    def _size(self, storage: torch.UntypedStorage) -> int:
        n = storage.nbytes()
        return -(-n // self.block) * self.block if self.block > 1 else n

    def _freed(self, key: int, _ref: weakref.ref) -> None:
        entry = self._storages.pop(key, None)
        if entry is not None:
            self.live[entry[1]] -= entry[2]
            self._dirty.add(entry[1])

    def _see(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less tensors
            return
        key, size = id(storage), self._size(storage)
        entry = self._storages.get(key)
        if entry is not None:
            if entry[2] == size:
                return
            self.live[entry[1]] += size - entry[2]  # resized in place
            self._storages[key] = (entry[0], entry[1], size)
        else:
            device = str(t.device)
            ref = weakref.ref(storage, lambda r, k=key: self._freed(k, r))
            self._storages[key] = (ref, device, size)
            self.live[device] = self.live.get(device, 0) + size
        self._dirty.add(str(t.device))

    def _record(self, op: str) -> None:
        for device in self._dirty:
            now = self.live.get(device, 0)
            if self.timeline is not None:
                self.timeline.append((self.step, device, now))
            if now > self.peak.get(device, 0):
                self.peak[device] = now
                self.peak_at[device] = PeakPoint(now, self.step, op, self._modules.current(),
                                                 torch._C._current_graph_task_id() != -1, engine_source())
        self._dirty.clear()

    # ---------------------------------------------------------------- public
    def add(self, *objects: Any) -> None:
        """Count tensors (and modules' parameters, buffers and grads) created before the tracker started."""
        for obj in tree_leaves(list(objects)):
            if isinstance(obj, nn.Module):
                tensors: Iterable = [*obj.parameters(), *obj.buffers(),
                                     *(p.grad for p in obj.parameters() if p.grad is not None)]
            elif isinstance(obj, torch.Tensor):
                tensors = [obj]
            else:
                continue
            for t in tensors:
                self._see(t)
        self._record("add")

    def name_modules(self, *roots: nn.Module) -> None:
        """Name modules after these roots ('AutoencoderKL.decoder.blocks.7'), not after the first module run."""
        for root in roots:
            self._modules.name(root)

    def __enter__(self) -> "MemoryTracker":
        self._modules.__enter__()
        return super().__enter__()

    def __exit__(self, *args: Any) -> None:
        super().__exit__(*args)
        self._modules.__exit__(*args)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._see(t)
        self.step += 1
        self._record(str(func.overloadpacket.__name__))
        return out


# ------------------------------------------------------------------------------------------ model helpers
def materialize(module: nn.Module, device: str | torch.device, dtype: torch.dtype | None = None,
                requires_grad: bool = False) -> nn.Module:
    """Give every parameter and buffer of a (meta-built) module fresh zero storage on ``device``.

    Floating-point tensors take ``dtype`` when given. Called inside a tracker, the weights are counted.
    """
    for m in module.modules():
        for table, grad in ((m._parameters, requires_grad), (m._buffers, False)):
            for name, t in table.items():
                if t is None:
                    continue
                dt = dtype if dtype is not None and t.is_floating_point() else t.dtype
                new = torch.zeros(t.shape, device=device, dtype=dt)
                table[name] = nn.Parameter(new, requires_grad=grad) if table is m._parameters else new
    return module


def compute_in(module: nn.Module, dtype: torch.dtype) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """Let ``module`` compute with ``dtype`` copies of its (fp32 master) parameters, as autocast does.

    Gradients flow through the casts into the masters. Returns what :func:`restore_masters` needs.
    """
    swapped = []
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None and p.is_floating_point():
                swapped.append((m, name, p))
    for m, name, p in swapped:
        m._parameters[name] = p.to(dtype)
    return swapped


def restore_masters(swapped: list[tuple[nn.Module, str, nn.Parameter]]) -> None:
    """Put the master parameters back (the low-precision copies are freed)."""
    for m, name, p in swapped:
        m._parameters[name] = p


# ------------------------------------------------------------------------------------------ workloads
@dataclass
class Setup:
    """What a plan is about: networks, volume, precision, batch, decode slab, devices."""
    unet_config: dict = field(default_factory=dict)
    vae_config: dict = field(default_factory=dict)
    volume: Sequence[int] = (512, 512, 128)
    dtype: torch.dtype = torch.bfloat16
    batch: int = 1
    slab: int = 32
    ema: bool = False
    guidance: float = 5.0
    steps: int = 30
    device: str = DEVICE
    host: str = HOST
    timesteps: tuple[float, float] = field(init=False, default=(1000.0, 0.0))
    latent_shape: tuple[int, ...] = field(init=False, default=())  # (C, x, y, z) of one latent
    scheduler: Any = field(init=False, default=None, repr=False)  # set for ``steps`` steps, on the CPU

    def __post_init__(self) -> None:
        """Validate the volume against the networks; take the first sampling step's times (real, on CPU)."""
        if self.batch < 1:
            raise ValueError(f"--batch must be at least 1, got {self.batch}")
        if self.slab < 1:
            raise ValueError(f"--slab must be at least 1 row, got {self.slab}")
        unet, vae = self.networks()
        pipe = self.pipeline(unet, vae)
        try:
            self.volume = pipe.check_size(self.volume)
        except ValueError as err:
            raise ValueError(f"volume {err}") from None
        f = vae.config.downsample_factor
        self.latent_shape = (vae.config.latent_channels, *(s // f for s in self.volume))
        sched = self.scheduler = pipe.scheduler
        sched.set_timesteps(self.steps, device="cpu", input_img_size_numel=_prod(self.latent_shape[1:]))
        nexts = sched.next_timesteps() if hasattr(sched, "next_timesteps") else sched.timesteps
        self.timesteps = (float(sched.timesteps[0]), float(nexts[0]))

    def networks(self) -> tuple[DiffusionUNet, AutoencoderKL]:
        """Fresh UNet and VAE on the meta device (no memory), to be materialised inside a tracker."""
        with torch.device("meta"):
            return DiffusionUNet(**self.unet_config), AutoencoderKL(**self.vae_config)

    def pipeline(self, unet: DiffusionUNet, vae: AutoencoderKL) -> Text2CTPipeline:
        return Text2CTPipeline(unet, vae, PipelineConfig(size=tuple(self.volume)))

    def unet_inputs(self, unet: DiffusionUNet, batch: int) -> dict[str, torch.Tensor]:
        """Class label and spacing inputs the UNet takes, as the pipeline passes them."""
        extra = {}
        if unet.config.num_class_embeds is not None:
            extra["class_labels"] = torch.ones(batch, dtype=torch.long, device=self.device)
        if unet.config.include_spacing_input:
            extra["spacing_tensor"] = torch.full((batch, 3), 75.0, device=self.device, dtype=self.dtype)
        return extra


def _prod(values: Iterable[int]) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def sampling_step(s: Setup, unet: DiffusionUNet, vae: AutoencoderKL) -> None:
    """One classifier-free-guided sampling step as the pipeline runs it: UNet and VAE weights resident,
    the UNet called once on [cond; uncond] (batch 2B), the guidance mix and the Euler step."""
    materialize(unet.eval(), s.device, s.dtype)
    materialize(vae.eval(), s.device, s.dtype)
    pipe = s.pipeline(unet, vae)
    t, t_next = s.timesteps
    with torch.no_grad():
        x = torch.randn((s.batch, *s.latent_shape), device=s.device, dtype=s.dtype)
        context = torch.zeros((s.batch, 1, unet.config.cross_attention_dim or 1), device=s.device, dtype=s.dtype)
        spacing = torch.full((1, 3), 75.0, device=s.device, dtype=s.dtype)
        v = pipe.guided_velocity(x, torch.full((1,), t, device=s.device), context, s.guidance, spacing)
        x = s.scheduler.step(v, t, x, t_next)[0]


def decode_step(s: Setup, unet: DiffusionUNet, vae: AutoencoderKL, slab: int | None = None,
                host_memory: str = "low", on_device: bool = False) -> None:
    """Latents -> HU volumes as ``Text2CTPipeline.decode_latents`` does, with UNet and VAE weights resident;
    ``slab`` None for the plain decode, else the exact tiled decode storing activations on the host (or on
    the device, ``on_device``: what ``storage="auto"`` picks where they fit) in its ``host_memory`` mode
    (``low``: recompute the full-resolution level, ``fast``: store every activation)."""
    materialize(unet.eval(), s.device, s.dtype)
    materialize(vae.eval(), s.device, s.dtype)
    config = s.pipeline(unet, vae).config
    lo, hi = config.hu_window
    with torch.no_grad():
        latents = torch.zeros((s.batch, *s.latent_shape), device=s.device, dtype=s.dtype)
        volumes = []
        for z in latents / config.scale_factor:
            z = z[None].to(s.device, s.dtype)
            image = vae.decode(z) if slab is None else \
                tiled_decode(vae, z, slab, s.device if on_device else s.host, host_memory)
            image = image[0, 0].float()
            volumes.append((image.clamp(0, 1) * (hi - lo) + lo).to(s.host))
        torch.stack(volumes)


def encode_step(s: Setup, unet: DiffusionUNet, vae: AutoencoderKL, slab: int | None = None,
                host_memory: str = "low", on_device: bool = False) -> None:
    """A batch of volumes -> latent mean and std as the latent cache encodes it (``--batch-size`` volumes at
    once, read into host memory in float32; VAE weights resident); ``slab`` None for the one-piece encode on
    the device, else the exact tiled encoder, the images and stored activations on the host (or on the
    device, ``on_device``)."""
    materialize(vae.eval(), s.device, s.dtype)
    with torch.no_grad():
        x = torch.zeros((s.batch, 1, *s.volume), device=s.host, dtype=torch.float32)
        if slab is None:
            vae.encode(x.to(s.device, s.dtype))
        else:
            tiled_encode(vae, x, slab, s.device if on_device else s.host, host_memory)


def adamw_update(params: list[torch.Tensor], exp_avg: list[torch.Tensor], exp_avg_sq: list[torch.Tensor],
                 lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """An AdamW step with the memory of torch's multi-tensor (foreach) AdamW, the default on CUDA:
    moments updated in place, one temporary the size of the second moments."""
    grads = [p.grad for p in params]
    with torch.no_grad():
        torch._foreach_lerp_(exp_avg, grads, 1 - betas[0])
        torch._foreach_mul_(exp_avg_sq, betas[1])
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1 - betas[1])
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avg, denom, -lr)


def training_step(s: Setup, unet: DiffusionUNet, vae: AutoencoderKL, checkpointing: bool = False) -> None:
    """One UNet training step as ``train/ldm.py`` runs it on cached latents: rectified-flow L1 loss,
    backward, grad clipping, AdamW, optional EMA. ``s.dtype`` below fp32 means fp32 master weights and grads
    with the network computing in ``s.dtype`` (bf16 autocast); AdamW moments and the EMA copy are fp32."""
    mixed = s.dtype != torch.float32
    materialize(unet.train(), s.device, torch.float32 if mixed else s.dtype, requires_grad=True)
    unet.set_gradient_checkpointing(checkpointing)
    params = list(unet.parameters())
    exp_avg = [torch.zeros(p.shape, device=s.device, dtype=torch.float32) for p in params]
    exp_avg_sq = [torch.zeros(p.shape, device=s.device, dtype=torch.float32) for p in params]
    ema = [torch.zeros(p.shape, device=s.device, dtype=torch.float32) for p in params] if s.ema else []
    pipe = s.pipeline(unet, vae)
    b = s.batch
    x0 = torch.zeros((b, *s.latent_shape), device=s.device)
    context = torch.zeros((b, 1, unet.config.cross_attention_dim or 1), device=s.device)
    noise = torch.randn_like(x0)
    t = pipe.scheduler.sample_timesteps(x0)
    xt = pipe.scheduler.add_noise(x0, noise, t)
    swapped = compute_in(unet, s.dtype) if mixed else []
    extra = s.unet_inputs(unet, b)
    v = unet(xt.to(s.dtype), t.to(s.dtype), context=context.to(s.dtype), **extra)
    loss = F.l1_loss(v.float(), pipe.scheduler.velocity_target(x0, noise).float())
    loss.backward()
    del v, loss
    restore_masters(swapped)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    adamw_update(params, exp_avg, exp_avg_sq)
    with torch.no_grad():
        for e, p in zip(ema, params):
            e.lerp_(p.float(), 1e-3)
    for p in params:
        p.grad = None


# ------------------------------------------------------------------------------------------ the planner
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
    backend. Build the networks (on the meta device) before: what exists beforehand is not counted."""
    tracker = MemoryTracker()
    tracker.name_modules(*(a for a in args if isinstance(a, nn.Module)))
    with (FakeTensorMode() if fake else nullcontext()), ops.backend(backend), tracker:
        workload(*args)
    return tracker


Workload = Callable[[Setup, DiffusionUNet, AutoencoderKL], None]


def run_phase(key: str, name: str, workload: Workload, s: Setup, notes: str = "",
              backend: str = "triton") -> PhasePlan:
    """Plan one phase on fake tensors. If the Triton custom ops' fake path fails, plan with torch ops."""
    start = time.perf_counter()
    try:
        tracker = track(workload, s, *s.networks(), backend=backend)
    except Exception as err:  # noqa: BLE001 - any failure of the fake triton path: say so and use torch
        if backend != "triton":
            raise
        tracker = track(workload, s, *s.networks(), backend="torch")
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
    return sum(_prod(p.shape) for p in module.parameters()) * torch.finfo(dtype).bits // 8


def vae_pass_phases(kind: str, label: str, step: Workload, s: Setup, notes: str, backend: str) -> list[PhasePlan]:
    """A VAE pass (``kind`` decode or encode) untiled, exact tiled in both host-memory modes with activations
    on the host, and tiled with activations on the device: keys ``<kind>_untiled``, ``<kind>_tiled``,
    ``<kind>_tiled_fast``, ``<kind>_tiled_device``."""
    tiled = f"{label}, exact tiled, slab {s.slab}"
    rows = [run_phase(f"{kind}_untiled", f"{label}, untiled", step, s, notes, backend)]
    for mode, key in (("low", f"{kind}_tiled"), ("fast", f"{kind}_tiled_fast")):
        rows.append(run_phase(key, f"{tiled}, host_memory={mode}", partial(step, slab=s.slab, host_memory=mode), s,
                              f"{notes}; activations on the host", backend))
    rows.append(run_phase(f"{kind}_tiled_device", f"{tiled}, activations on the device",
                          partial(step, slab=s.slab, on_device=True), s,
                          f"{notes}; what storage=auto picks where it fits", backend))
    return rows


def plan(s: Setup, what: str = "all", backend: str = "triton") -> list[PhasePlan]:
    """Plan the sampling and/or training phases of ``s`` (see the module docstring)."""
    if what not in WHAT:
        raise ValueError(f"--what must be one of {', '.join(WHAT)}, got {what!r}")
    unet, vae = s.networks()
    gib = lambda n: f"{n / GIB:.2f}"  # noqa: E731
    resident = f"weights UNet {gib(weight_bytes(unet, s.dtype))} + VAE {gib(weight_bytes(vae, s.dtype))} GiB"
    rows = []
    if what in ("sample", "all"):
        b2 = f"batch {2 * s.batch} = cond + uncond"
        rows.append(run_phase("sample", f"sample: CFG UNet step ({b2})", sampling_step, s, resident, backend))
        rows += vae_pass_phases("decode", "decode: VAE", decode_step, s, resident, backend)
    if what in ("cache", "all"):
        vae_resident = f"VAE weights {gib(weight_bytes(vae, s.dtype))} GiB; batch {s.batch}"
        rows += vae_pass_phases("encode", "latent cache: VAE encode", encode_step, s, vae_resident, backend)
    if what in ("train", "all"):
        n = sum(_prod(p.shape) for p in unet.parameters())
        compute = "" if s.dtype == torch.float32 else f", {_name(s.dtype)} compute"
        static = f"fp32 weights + grads{compute}, AdamW 2x fp32 {gib(8 * n)} GiB" + \
            (f", EMA fp32 {gib(4 * n)} GiB" if s.ema else "")
        for ckpt in (False, True):
            label = f"train: UNet step, batch {s.batch}" + (", grad checkpointing" if ckpt else "")
            rows.append(run_phase("train_ckpt" if ckpt else "train", label,
                                  partial(training_step, checkpointing=ckpt), s, static, backend))
    return rows


def _name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


# ------------------------------------------------------------------------------------------ CLI
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
    for key, label in (("train", "training"), ("train_ckpt", "training with gradient checkpointing")):
        if key in by:
            out.append(f"{label}: {by[key].device_gib:.2f} GiB device")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="python -m text2ct_engine.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--volume", type=int, nargs=3, default=[512, 512, 128], metavar=("X", "Y", "Z"),
                   help="output voxels (default 512 512 128)")
    p.add_argument("--dtype", default="bf16", help="bf16 (default), fp16 or fp32")
    p.add_argument("--batch", type=int, default=1, help="volumes per sampling call / training batch (default 1)")
    p.add_argument("--slab", type=int, default=32,
                   help="rows per slab of the exact tiled decode and encode (default 32)")
    p.add_argument("--what", default="all", help="sample, cache (the latent cache's encode), train or all (default)")
    p.add_argument("--ema", action="store_true", help="training keeps an fp32 EMA copy of the UNet")
    p.add_argument("--backend", default="triton", help="ops backend for GroupNorm/attention: triton or torch")
    p.add_argument("--unet-config", type=cli_path,
                   help="JSON file of DiffusionModelUNetMaisi keyword arguments (default: Text2CT)")
    p.add_argument("--vae-config", type=cli_path,
                   help="JSON file of AutoencoderKlMaisi keyword arguments (default: Text2CT)")
    p.add_argument("--json", type=cli_path, help="also write the plan to this JSON file (atomic)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Every argument problem as one ValueError, before any planning."""
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    if args.what not in WHAT:
        raise ValueError(f"--what must be one of {', '.join(WHAT)}, got {args.what!r}")
    if args.backend not in ("triton", "torch"):
        raise ValueError(f"--backend must be triton or torch, got {args.backend!r}")
    if args.json:
        check_output_file("--json", args.json, args.force)


def read_config(path: str | None, flag: str) -> dict:
    """A JSON object of network keyword arguments, or {} when no file is given."""
    if path is None:
        return {}
    try:
        with open(path) as f:
            config = json.load(f)
    except OSError as err:
        raise ValueError(f"{flag} {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag} {path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{flag} {path} must hold a JSON object of keyword arguments")
    return config


def make_setup(args: argparse.Namespace) -> Setup:
    """The CLI's arguments as a :class:`Setup`; a bad value is one ValueError naming its option."""
    unet, vae = read_config(args.unet_config, "--unet-config"), read_config(args.vae_config, "--vae-config")
    try:
        return Setup(unet, vae, volume=args.volume, dtype=DTYPES[args.dtype], batch=args.batch, slab=args.slab,
                     ema=args.ema)
    except TypeError as err:  # an unknown network keyword
        raise ValueError(f"network config: {err}") from None
    except ValueError as err:
        msg = str(err)
        raise ValueError(msg if msg.startswith("--") else f"--{msg}" if msg.startswith("volume ")
                         else f"network config: {msg}") from None


def record(args: argparse.Namespace, s: Setup, rows: Sequence[PhasePlan], argv: Sequence[str]) -> dict:
    return {"plan": "peak memory on fake tensors (FakeTensorMode), not measured on a GPU",
            "accounting": "live tensor storages rounded to 512 B (like torch.cuda.max_memory_allocated); "
                          "no CUDA context, library workspaces or allocator fragmentation",
            "date": datetime.date.today().isoformat(), "command": " ".join(["python -m text2ct_engine.memory",
                                                                           *argv]),
            "torch": torch.__version__, "volume": list(s.volume), "latent": list(s.latent_shape),
            "dtype": args.dtype, "batch": s.batch, "slab": s.slab, "ema": s.ema,
            "phases": [{**asdict(r), "device_gib": round(r.device_gib, 3), "host_gib": round(r.host_gib, 3)}
                       for r in rows],
            "summary": summary(rows)}


def run(args: argparse.Namespace, argv: Sequence[str]) -> None:
    check_args(args)
    start = time.perf_counter()
    s = make_setup(args)
    rows = plan(s, args.what, args.backend)
    c, *sp = s.latent_shape
    print(f"memory plan: {'x'.join(map(str, s.volume))} volume (latent {c}x{'x'.join(map(str, sp))}), "
          f"{args.dtype}, batch {s.batch}; planned on fake tensors, not measured on a GPU")
    print(table(rows))
    for line in summary(rows):
        print(line)
    print("not counted: CUDA context (~0.3-0.6 GiB), cuDNN/cuBLAS workspaces, allocator fragmentation; "
          f"planned in {time.perf_counter() - start:.0f} s")
    if args.json:
        from .io_utils import write_json
        write_json(args.json, record(args, s, rows, argv))
        print(f"wrote {args.json}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except SystemExit as done:  # --help, or a bad command line (its one error line is printed)
        return int(done.code or 0)
    return run_guarded(lambda: run(args, argv))


if __name__ == "__main__":
    sys.exit(main())
