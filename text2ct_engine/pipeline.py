"""Text2CTPipeline: text context -> rectified-flow sampling of latents -> VAE decode -> HU volumes.

A model directory holds ``pipeline.json`` (scale factor, spacing, HU window, scheduler, defaults),
``vae/`` and ``unet/`` (each ``config.json`` + ``model.safetensors``) and, for text prompts, ``clip/`` and
``tokenizer.json``. Volumes are (X, Y, Z) arrays: axis 0 runs left->right, 1 posterior->anterior,
2 inferior->superior (RAS+), so the NIfTI affine is diag(spacing).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .io_utils import read_json_object, write_json
from .models import AutoencoderKL, DiffusionUNet
from .schedulers import RFlowScheduler, scheduler_from_dict
from .tiling import SlabDecoder, auto_slab, tiled_decode

PIPELINE_FILE = "pipeline.json"
MAX_SIDE, MAX_VOXELS = 4096, 2**31  # far beyond any CT; a larger request is a typo, not a volume
MAX_SEED = 2**63 - 1
DEVICE_NAMES = "auto, cpu, cuda or cuda:N"


def _number(name: str, value: object, integer: bool = False) -> float:
    """``value`` as a finite number (an integral one with ``integer``); else a ``ValueError`` naming ``name``."""
    try:
        number = None if isinstance(value, (str, bytes, bool)) else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several values
        number = None
    if number is None or not math.isfinite(number) or (integer and number != int(number)):
        raise ValueError(f"{name} must be a finite {'whole ' if integer else ''}number, got {value!r}")
    return int(number) if integer else number


def _numbers(name: str, values: object, n: int, integer: bool = False) -> tuple:
    """``values`` as a tuple of ``n`` finite numbers; else a ``ValueError`` naming ``name``."""
    try:
        items = None if isinstance(values, (str, bytes)) else tuple(values)  # type: ignore[arg-type]
    except TypeError:
        items = None
    if items is None or len(items) != n:
        raise ValueError(f"{name} must be a list of {n} numbers, got {values!r}")
    return tuple(_number(name, v, integer) for v in items)


def check_scale_factor(value: object) -> float:
    """The latent scale factor as a float: a finite number > 0, else a one-line ``ValueError``."""
    scale = _number("scale_factor", value)
    if scale <= 0:
        raise ValueError(f"scale_factor must be > 0 (1 / std of the training latents), got {value!r}")
    return scale


def check_guidance(value: object) -> float:
    """The classifier-free guidance scale as a float: any finite number."""
    return _number("guidance", value)


def check_steps(value: object) -> int:
    """The number of sampling steps: a whole number >= 1."""
    steps = _number("steps", value, integer=True)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {value!r}")
    return steps


@dataclass
class PipelineConfig:
    """Everything besides the networks that sampling needs; stored as ``pipeline.json``."""
    scale_factor: float = 1.0                   # latents are divided by this before decoding
    spacing: Sequence[float] = (0.75, 0.75, 3.0)  # mm per voxel along (x, y, z)
    size: Sequence[int] = (512, 512, 128)       # default output size (x, y, z)
    hu_window: Sequence[float] = (-1000.0, 1000.0)  # VAE output 0..1 maps to this HU range
    spacing_scale: float = 100.0                # MAISI feeds the UNet spacing in mm x 100
    class_label: int | None = 1                 # MAISI modality class (1 = CT)
    guidance: float = 5.0
    steps: int = 30
    scheduler: dict = field(default_factory=lambda: RFlowScheduler().to_dict())

    def __post_init__(self) -> None:
        self.scale_factor = check_scale_factor(self.scale_factor)
        self.spacing = _numbers("spacing", self.spacing, 3)
        self.size = _numbers("size", self.size, 3, integer=True)
        self.hu_window = _numbers("hu_window", self.hu_window, 2)
        if self.hu_window[0] >= self.hu_window[1]:
            raise ValueError(f"hu_window must be an increasing pair, got {list(self.hu_window)}")
        self.spacing_scale = _number("spacing_scale", self.spacing_scale)
        if self.class_label is not None:
            self.class_label = _number("class_label", self.class_label, integer=True)
        self.guidance = check_guidance(self.guidance)
        self.steps = check_steps(self.steps)
        if not isinstance(self.scheduler, dict):
            raise ValueError(f"scheduler must be a JSON object, got {self.scheduler!r}")
        try:
            scheduler_from_dict(self.scheduler)
        except (TypeError, ValueError) as err:
            raise ValueError(f"scheduler: {err}") from None

    @classmethod
    def from_file(cls, path: str) -> "PipelineConfig":
        """Read ``pipeline.json``; every problem is one ``ValueError`` line naming the file and the key."""
        raw = read_json_object(path, "pipeline config")
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown} in the pipeline config")
        try:
            return cls(**raw)
        except ValueError as err:
            raise ValueError(f"{path}: invalid pipeline config: {err}") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; else ``ValueError``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device} is not a device name ({DEVICE_NAMES})") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device} is not supported: use {DEVICE_NAMES}")
    return dev


def available_device(name: str | None) -> torch.device:
    """A command line's ``--device``: :func:`resolve_device`, and a CUDA device only where a GPU is here;
    else a one-line ``ValueError`` naming ``--device``."""
    try:
        device = resolve_device(name)
    except ValueError:
        raise ValueError(f"--device {name}: not a device this runs on (auto, cpu, cuda, cuda:N)") from None
    problem = cuda_problem(device)
    if problem is not None:
        raise ValueError(f"--device {name} asked for, but {problem}")
    return device


def cuda_problem(device: torch.device) -> str | None:
    """Why ``device`` cannot be used on this machine (None when it can, or is not a CUDA device)."""
    if device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return "no CUDA GPU is available here: use the CPU"
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        return f"this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
    return None


def has_text_encoder(directory: str | os.PathLike) -> bool:
    """Does the model directory hold a text tower (``clip/``), so that it can take prompts?"""
    return os.path.isdir(os.path.join(directory, "clip"))


# torch's CPU kernels for 3D volumes (e.g. avg_pool3d) have no half precision: sampling there is float32
HALF_PRECISION = (torch.float16, torch.bfloat16)


class Text2CTPipeline:
    """Assembled sampler; build with :meth:`from_pretrained` or from components."""

    def __init__(self, unet: DiffusionUNet, vae: AutoencoderKL, config: PipelineConfig | None = None,
                 text_encoder: torch.nn.Module | None = None, tokenizer=None) -> None:
        self.unet, self.vae, self.config = unet, vae, config or PipelineConfig()
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.scheduler = scheduler_from_dict(self.config.scheduler)

    # ------------------------------------------------------------------ directories
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, vae_device: str | torch.device | None = None
                        ) -> "Text2CTPipeline":
        """Load a model directory; raises ``ValueError`` with one line naming what is missing or wrong.

        ``vae_device`` loads the VAE elsewhere than the rest (e.g. ``"cpu"`` for training on cached latents,
        which never runs it); default: ``device``.
        """
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise ValueError(f"model directory {directory} does not exist")
        path = os.path.join(directory, PIPELINE_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"{directory} is not a model directory: {PIPELINE_FILE} is missing")
        config = PipelineConfig.from_file(path)
        dev = resolve_device(device)
        vae_dev = dev if vae_device is None else resolve_device(vae_device)
        for asked, resolved in ((device, dev), (vae_device, vae_dev)):
            problem = cuda_problem(resolved)
            if problem is not None:
                raise ValueError(f"device {asked} asked for, but {problem}")
        if dtype in HALF_PRECISION and "cpu" in (dev.type, vae_dev.type):
            raise ValueError(f"dtype {dtype} on the CPU: torch's CPU kernels for 3D volumes (e.g. avg_pool3d) "
                             f"have no half precision; load with dtype=torch.float32 (or None) there")
        unet = DiffusionUNet.from_pretrained(os.path.join(directory, "unet"), device=dev, dtype=dtype)
        vae = AutoencoderKL.from_pretrained(os.path.join(directory, "vae"), device=vae_dev, dtype=dtype)
        text_encoder = tokenizer = None
        if has_text_encoder(directory):
            from .text import load_text_side
            text_encoder, tokenizer = load_text_side(directory, dev, dtype)
            if text_encoder.embed_dim != unet.config.cross_attention_dim:
                raise ValueError(f"{directory}: the text tower in clip/ gives {text_encoder.embed_dim}-wide "
                                 f"embeddings but the UNet attends to {unet.config.cross_attention_dim}: "
                                 f"they do not belong together")
        return cls(unet, vae, config, text_encoder, tokenizer)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the model directory (every file atomically)."""
        os.makedirs(directory, exist_ok=True)
        self.unet.save_pretrained(os.path.join(directory, "unet"))
        self.vae.save_pretrained(os.path.join(directory, "vae"))
        if self.text_encoder is not None:
            from .text import save_text_side
            save_text_side(directory, self.text_encoder, self.tokenizer)
        config = dataclasses.asdict(self.config)
        config["scheduler"] = self.scheduler.to_dict()
        write_json(os.path.join(directory, PIPELINE_FILE), config)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def state_dtype(self) -> torch.dtype:
        """The sampler's state and velocities: float32 for a bf16/fp16/fp32 UNet, float64 for a float64 one."""
        return torch.promote_types(self.dtype, torch.float32)

    @property
    def vae_factor(self) -> int:
        return self.vae.config.downsample_factor

    # ------------------------------------------------------------------ pieces
    @property
    def size_multiple(self) -> int:
        """Output sizes must be multiples of this: the VAE's and the UNet's downsampling together."""
        return self.vae_factor * 2 ** (len(self.unet.config.num_channels) - 1)

    def check_size(self, size: Sequence[int]) -> tuple[int, int, int]:
        m, f = self.size_multiple, self.vae_factor
        if len(size) != 3 or any(int(s) <= 0 or int(s) % m for s in size):
            raise ValueError(f"size {tuple(size)} must be three positive numbers divisible by {m} "
                             f"(VAE x{f} times UNet x{m // f} downsampling)")
        size = tuple(int(s) for s in size)
        if max(size) > MAX_SIDE or math.prod(size) > MAX_VOXELS:
            raise ValueError(f"size {size} is too large: at most {MAX_SIDE} voxels per side and "
                             f"{MAX_VOXELS} in all")
        return size  # type: ignore[return-value]

    @staticmethod
    def check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
        if len(spacing) != 3 or not all(0 < float(s) < 100 for s in spacing):
            raise ValueError(f"spacing {tuple(spacing)} must be three positive millimetre values below 100")
        return tuple(float(s) for s in spacing)  # type: ignore[return-value]

    def encode_prompts(self, prompts: Sequence[str], allow_empty: bool = False) -> torch.Tensor:
        """Prompts -> (B, 1, cross_attention_dim) context from the CLIP text tower.

        Without a text tower only empty prompts (with ``allow_empty``) work: the all-zero "no condition"."""
        if self.text_encoder is None or self.tokenizer is None:
            if allow_empty and not any(p.strip() for p in prompts):
                return torch.zeros(len(prompts), 1, self.unet.config.cross_attention_dim, device=self.device,
                                   dtype=self.dtype)
            raise ValueError("this model has no text encoder (clip/ and tokenizer.json): convert it with "
                             "--clip and --tokenizer to use prompts, or pass a context tensor")
        from .text import encode_prompts
        return encode_prompts(self.text_encoder, self.tokenizer, prompts, self.device, allow_empty=allow_empty)

    def guided_velocity(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, guidance: float,
                        spacing: torch.Tensor) -> torch.Tensor:
        """UNet velocity with classifier-free guidance: one batched call on [cond; uncond] inputs.

        The unconditional context is zeros (as in Text2CT's training, which zeroes dropped conditions). The
        UNet runs in the pipeline's dtype; the velocity (and its guidance mix) comes back in ``state_dtype``.
        """
        b = x.shape[0]
        x = x.to(self.dtype)
        extra = {}
        if self.config.class_label is not None and self.unet.config.num_class_embeds is not None:
            extra["class_labels"] = torch.full((b,), self.config.class_label, dtype=torch.long, device=x.device)
        if self.unet.config.include_spacing_input:
            extra["spacing_tensor"] = spacing.expand(b, 3)
        if guidance == 1.0:
            return self.unet(x, t.expand(b), context=context, **extra).to(self.state_dtype)
        doubled = {k: torch.cat([v, v]) for k, v in extra.items()}
        out = self.unet(torch.cat([x, x]), t.expand(2 * b), context=torch.cat([context, torch.zeros_like(context)]),
                        **doubled)
        cond, uncond = out.to(self.state_dtype).chunk(2)
        return uncond + guidance * (cond - uncond)

    def initial_noise(self, batch: int, size: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
        """Latent noise in ``state_dtype``, one CPU generator per sample: a sample's noise depends only on its
        own seed."""
        f, lc = self.vae_factor, self.vae.config.latent_channels
        shape = (lc, *(s // f for s in size))
        if len(seeds) != batch:
            raise ValueError(f"{len(seeds)} seeds for {batch} samples")
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(noise).to(self.device, self.state_dtype)

    def sample_latents(self, context: torch.Tensor, size: Sequence[int], spacing: Sequence[float],
                       steps: int, guidance: float, seeds: Sequence[int],
                       progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Integrate the rectified flow from noise to latents (B, C, x/f, y/f, z/f), in ``state_dtype``.

        The state stays in float32 when the UNet runs in bf16/fp16 (as MAISI's sampler keeps it): 30 Euler
        steps of bf16 rounding would add up; only the UNet's input is cast."""
        x = self.initial_noise(context.shape[0], size, seeds)
        shape = x.shape
        sched = self.scheduler
        sched.set_timesteps(steps, device=self.device, input_img_size_numel=int(torch.tensor(shape[2:]).prod()))
        spacing_t = torch.tensor([spacing], device=self.device, dtype=self.dtype) * self.config.spacing_scale
        context = context.to(self.device, self.dtype)
        nexts = sched.next_timesteps() if isinstance(sched, RFlowScheduler) else [None] * len(sched.timesteps)
        for i, (t, nt) in enumerate(zip(sched.timesteps, nexts)):
            tt = t.reshape(1).to(self.device, torch.float32)
            v = self.guided_velocity(x, tt, context, guidance, spacing_t)
            x = (sched.step(v, t, x, nt) if nt is not None else sched.step(v, t, x))[0]
            if progress is not None:
                progress(i + 1, len(sched.timesteps))
        return x

    def auto_slab(self, latent_shape: Sequence[int]) -> int | None:
        """Slab rows for exact tiled decoding, or None when the untiled decode's widest activation is small
        (or the VAE has no slab form: attention blocks, transposed-conv upsampling)."""
        if SlabDecoder.refusal(self.vae) is not None:
            return None
        volume = [s * self.vae_factor for s in latent_shape[-3:]]
        return auto_slab(volume, self.vae.config.num_channels[0], self.dtype.itemsize)

    def decode_latents(self, latents: torch.Tensor, slab: int | None | str = "auto",
                       host_memory: str = "low", storage: str = "auto") -> torch.Tensor:
        """Latents -> HU volumes (B, X, Y, Z), float32 on the CPU.

        ``slab``: rows per slab of the exact tiled decode (:mod:`text2ct_engine.tiling`), None for the plain
        decode, "auto" to tile only volumes whose full-resolution activations exceed 256 MiB.
        ``host_memory``: what the tiled decode keeps in host RAM, "low" (recompute the full-resolution
        level: 5 GiB at 512x512x128 in bf16) or "fast" (store every activation: 12 GiB, no recomputation).
        ``storage``: where the tiled decode keeps them on a GPU: "host" (least GPU memory), "device", or
        "auto" (the GPU when they fit in its free memory, which saves their trips across PCIe; else the host).
        """
        lo, hi = self.config.hu_window
        if slab == "auto":
            slab = self.auto_slab(latents.shape)
        volumes = []
        for z in latents / self.config.scale_factor:  # one volume at a time: decoding dominates memory
            z = z[None].to(self.device, self.dtype)
            image = self.vae.decode(z) if slab is None else tiled_decode(self.vae, z, slab, storage, host_memory)
            image = image[0, 0].float()
            volumes.append((image.clamp(0, 1) * (hi - lo) + lo).cpu())
        return torch.stack(volumes)

    @staticmethod
    def seeds_for(batch: int, seed: int | Sequence[int]) -> list[int]:
        """One seed per sample (``seed + i`` from one int), each in 0 .. 2**63 - 1, else ``ValueError``."""
        if isinstance(seed, numbers.Integral):
            seeds = [int(seed) + i for i in range(batch)]
        else:
            seeds = [int(s) for s in seed]
        if any(not 0 <= s <= MAX_SEED for s in seeds):
            raise ValueError(f"seeds must be between 0 and 2**63 - 1, got {seeds[0]}..{seeds[-1]}")
        return seeds

    # ------------------------------------------------------------------ main entry
    @torch.no_grad()
    def __call__(self, prompts: Sequence[str] | str | None = None, *, context: torch.Tensor | None = None,
                 steps: int | None = None, guidance: float | None = None, seed: int | Sequence[int] = 0,
                 size: Sequence[int] | None = None, spacing: Sequence[float] | None = None,
                 allow_empty: bool = False, progress: Callable[[int, int], None] | None = None,
                 decode_slab: int | None | str = "auto", decode_host_memory: str = "low",
                 decode_storage: str = "auto") -> torch.Tensor:
        """Sample HU volumes (B, X, Y, Z) for prompts (or a ready (B, 1, D) context).

        ``seed`` is one int (sample i gets seed + i) or one per sample; a sample's volume depends only on
        its prompt and seed, not on what else is in the batch, up to float rounding (kernels may sum in
        another order for another batch size: 0.004 HU seen on the CPU with the demo model; the CLI samples one
        prompt at a time, so its volumes are bit for bit the same whatever the prompts around them).
        """
        if (prompts is None) == (context is None):
            raise ValueError("pass either prompts or a context tensor")
        if prompts is not None:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            context = self.encode_prompts(prompts, allow_empty=allow_empty)
        assert context is not None
        if context.dim() != 3 or context.shape[-1] != self.unet.config.cross_attention_dim:
            raise ValueError(f"context must be (B, tokens, {self.unet.config.cross_attention_dim}), "
                             f"got {tuple(context.shape)}")
        size = self.check_size(size or self.config.size)
        spacing = self.check_spacing(spacing or self.config.spacing)
        steps = self.config.steps if steps is None else check_steps(steps)
        guidance = self.config.guidance if guidance is None else check_guidance(guidance)
        seeds = self.seeds_for(context.shape[0], seed)
        latents = self.sample_latents(context, size, spacing, steps, guidance, seeds, progress)
        return self.decode_latents(latents, decode_slab, decode_host_memory, decode_storage)
