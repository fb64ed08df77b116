"""Peak-memory planner: how much GPU (and host) memory sampling, the latent cache and training (the UNet, the
VAE, the 3D CLIP) need, computed without a GPU.

    python -m text2ct_engine.memory                      # Text2CT at 512x512x128, bf16, batch 1
    python -m text2ct_engine.memory --what train --no-ema --dtype fp32 --json plan.json

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

Mixed precision: the training steps run the trainers' bf16 autocast regions; on ``meta``, which torch cannot
autocast, :class:`AutocastEmulation` casts as CUDA autocast does (its op lists, weight-cast cache, and
checkpoint recomputation under the forward's state), checked against torch's own CPU autocast with CPU's lists.

Accounting: storages are rounded up to 512 bytes like CUDA's caching allocator, so a phase's figure
corresponds to ``torch.cuda.max_memory_allocated``. Not included: the CUDA context (~0.3-0.6 GiB outside
the allocator), cuDNN/cuBLAS workspaces, and the allocator's reserved-but-free slack (fragmentation).

Modules: ``tracker`` (the counting), ``autocast`` (CUDA autocast on ``meta``), ``workloads`` (``Setup`` and
the phases), ``planner`` (running and reporting them), ``cli`` (the command).
"""
from __future__ import annotations

from .cli import main
from .planner import (DTYPES, WHAT, Phase, PhasePlan, phases, plan, run_phase, summary, table, track,
                      vae_pass_phases, weight_bytes)
from .tracker import BLOCK, GIB, MemoryTracker, ModuleStack, PeakPoint, engine_source
from .autocast import CPU_POLICIES, CUDA_POLICIES, AutocastEmulation
from .workloads import (DEVICE, HOST, TEXT2CT_CONTEXT, AdamW, Setup, clip_training_step, decode_step, encode_step,
                        materialize, sampling_step, training_step, vae_training_step)

__all__ = ["AdamW", "AutocastEmulation", "BLOCK", "CPU_POLICIES", "CUDA_POLICIES", "DEVICE", "DTYPES", "GIB", "HOST",
           "MemoryTracker", "ModuleStack", "PeakPoint", "Phase", "PhasePlan", "Setup", "TEXT2CT_CONTEXT", "WHAT",
           "clip_training_step", "decode_step", "encode_step", "engine_source", "main", "materialize", "phases",
           "plan", "run_phase",
           "sampling_step", "summary", "table", "track", "training_step", "vae_pass_phases", "vae_training_step",
           "weight_bytes"]
