"""What a plan is about (:class:`Setup`) and the phases it runs: sampling, the VAE passes, and one step of each
trainer, written the way the engine's pipeline and training loops run them, on networks built on the meta
device and materialised inside a tracker."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import CLIP3D, AutoencoderKL, CLIPTextConfig, CLIPTextModelWithProjection, DiffusionUNet
from ..models.discriminator import PatchDiscriminator
from ..pipeline import PipelineConfig, Text2CTPipeline
from ..precision import bf16_autocast
from ..tiling import tiled_decode, tiled_encode
from ..train.clip import CLIPTrainConfig, new_clip, volume_layout
from ..train.vae import VAETrainConfig, discriminator_loss, vae_loss

TEXT2CT_CONTEXT = 512  # tokens per report of Text2CT's text tower
DEVICE, HOST = "meta", "cpu"  # the planned accelerator and the host, as fake-tensor devices


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


# ------------------------------------------------------------------------------------------ workloads
@dataclass
class Setup:
    """What a plan is about: networks, volume, precision, batch, decode slab, devices; for ``train vae`` the
    patch size, for ``train clip`` the volume tower's input size and the contrastive batch."""
    unet_config: dict = field(default_factory=dict)
    vae_config: dict = field(default_factory=dict)
    volume: Sequence[int] = (512, 512, 128)
    dtype: torch.dtype = torch.bfloat16
    batch: int = 1
    slab: int = 32
    ema: bool = True  # the UNet's training keeps an EMA copy (train ldm's default)
    ema_offload: bool = False  # ... in host RAM (train ldm --ema-offload)
    guidance: float = 5.0
    steps: int = 30
    device: str = DEVICE
    host: str = HOST
    clip_config: dict = field(default_factory=dict)  # CLIP3D settings: text_config, vision_config, ...
    context_length: int = TEXT2CT_CONTEXT
    patch: Sequence[int] = VAETrainConfig.patch_size
    clip_volume: Sequence[int] = CLIPTrainConfig.size
    clip_batch: int = CLIPTrainConfig.batch_size
    timesteps: tuple[float, float] = field(init=False, default=(1000.0, 0.0))
    latent_shape: tuple[int, ...] = field(init=False, default=())  # (C, x, y, z) of one latent
    scheduler: Any = field(init=False, default=None, repr=False)  # set for ``steps`` steps, on the CPU

    def __post_init__(self) -> None:
        """Validate the sizes against the networks; take the first sampling step's times (real, on CPU)."""
        for name, least in (("batch", 1), ("slab", 1), ("clip_batch", 2), ("context_length", 2)):
            if getattr(self, name) < least:
                flag = name.replace("_", "-")
                raise ValueError(f"--{flag} must be at least {least}, got {getattr(self, name)}")
        try:
            unet, vae, text = self.networks()
        except ValueError as err:  # the text tower's settings come from --clip-config; the rest pass on
            if "text_config" not in str(err):
                raise
            raise ValueError(f"--clip-config: {err}") from None
        width = unet.config.cross_attention_dim
        if text is not None and text.embed_dim != width:
            raise ValueError(f"--clip-config: the text tower's projection_dim {text.embed_dim} differs from the "
                             f"UNet's cross_attention_dim {width}: drop it or set {width}")
        pipe = self.pipeline(unet, vae)
        try:
            self.volume = pipe.check_size(self.volume)
        except ValueError as err:
            raise ValueError(f"volume {err}") from None
        f = vae.config.downsample_factor
        self.latent_shape = (vae.config.latent_channels, *(s // f for s in self.volume))
        sched = self.scheduler = pipe.scheduler
        sched.set_timesteps(self.steps, device="cpu", input_img_size_numel=math.prod(self.latent_shape[1:]))
        nexts = sched.next_timesteps() if hasattr(sched, "next_timesteps") else sched.timesteps
        self.timesteps = (float(sched.timesteps[0]), float(nexts[0]))
        self.patch, self.clip_volume = tuple(self.patch), tuple(self.clip_volume)
        try:
            VAETrainConfig(patch_size=self.patch).validate(vae)
            _, disc = self.vae_training_networks()
            if min(disc.output_size(self.patch)) < 1:
                raise ValueError(f"patch size {self.patch} is too small for the discriminator")
        except ValueError as err:
            raise ValueError(f"--patch: {err}") from None
        try:
            self.clip_networks()
        except ValueError as err:
            raise ValueError(f"--clip-volume / --clip-config: {err}") from None

    def networks(self) -> tuple[DiffusionUNet, AutoencoderKL, CLIPTextModelWithProjection | None]:
        """Fresh UNet, VAE and text tower (None for a UNet without cross-attention) on the meta device (no
        memory), to be materialised inside a tracker. The text tower is :meth:`clip_networks`' text side."""
        with torch.device("meta"):
            unet, vae = DiffusionUNet(**self.unet_config), AutoencoderKL(**self.vae_config)
            width = unet.config.cross_attention_dim
            text = None if width is None else CLIPTextModelWithProjection(self.text_config(width))
        return unet, vae, text

    def text_config(self, projection_dim: int | None = None) -> CLIPTextConfig:
        """The text tower: CLIP's defaults at ``context_length`` tokens, overridden by ``clip_config``."""
        given = dict(self.clip_config.get("text_config", {}))
        if projection_dim is not None:
            given.setdefault("projection_dim", projection_dim)
        try:
            return CLIPTextConfig(**{"max_position_embeddings": self.context_length, **given})
        except (TypeError, ValueError) as err:
            raise ValueError(f"invalid text_config ({err})") from None

    def vae_training_networks(self) -> tuple[AutoencoderKL, PatchDiscriminator]:
        """The VAE and ``train vae``'s default PatchGAN discriminator, on the meta device."""
        cfg = VAETrainConfig()
        with torch.device("meta"):
            vae = AutoencoderKL(**self.vae_config)
            return vae, PatchDiscriminator(vae.config.out_channels, cfg.disc_channels, cfg.disc_layers)

    def clip_networks(self) -> tuple[CLIP3D]:
        """The CLIP3D that ``train clip`` builds for ``clip_volume`` (x, y, z) voxels, on the meta device."""
        settings = {k: v for k, v in self.clip_config.items() if k not in ("text_config", "vision_config")}
        with torch.device("meta"), torch.random.fork_rng(devices=[]):
            return (new_clip(self.text_config(), self.clip_volume, self.clip_config.get("vision_config"), 0,
                             **settings),)

    def pipeline(self, unet: DiffusionUNet, vae: AutoencoderKL) -> Text2CTPipeline:
        """The sampling pipeline of these networks at the planned volume (its scheduler and checks)."""
        return Text2CTPipeline(unet, vae, PipelineConfig(size=tuple(self.volume)))

    def unet_inputs(self, unet: DiffusionUNet, batch: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Class label and spacing (in ``dtype``) inputs the UNet takes, as the pipeline passes them."""
        extra = {}
        if unet.config.num_class_embeds is not None:
            extra["class_labels"] = torch.ones(batch, dtype=torch.long, device=self.device)
        if unet.config.include_spacing_input:
            extra["spacing_tensor"] = torch.full((batch, 3), 75.0, device=self.device, dtype=dtype)
        return extra

    def tokens(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask of ``batch`` reports, padded to the context as the tokenizer does."""
        shape = (batch, self.context_length)
        return (torch.zeros(shape, dtype=torch.long, device=self.device),
                torch.ones(shape, dtype=torch.long, device=self.device))


def resident(s: Setup, unet: DiffusionUNet, vae: AutoencoderKL, text: nn.Module | None) -> None:
    """The sampling pipeline's weights on the device in ``s.dtype``: UNet, VAE and text tower."""
    for module in (unet, vae, text):
        if module is not None:
            materialize(module.eval(), s.device, s.dtype)


def encode_reports(s: Setup, text: nn.Module | None, batch: int, width: int,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """(batch, 1, width) context from the text tower as ``encode_prompts`` makes it (zeros in ``dtype``,
    default ``s.dtype``, without one)."""
    if text is None:
        return torch.zeros((batch, 1, width), device=s.device, dtype=dtype or s.dtype)
    with torch.no_grad():
        return text.encode_context(*s.tokens(batch))


def sampling_step(s: Setup, unet: DiffusionUNet, vae: AutoencoderKL, text: nn.Module | None = None) -> None:
    """The prompts' encoding and one classifier-free-guided sampling step as the pipeline runs them: UNet,
    VAE and text tower weights resident, the UNet called once on [cond; uncond] (batch 2B), the guidance mix
    and the Euler step."""
    resident(s, unet, vae, text)
    pipe = s.pipeline(unet, vae)
    t, t_next = s.timesteps
    with torch.no_grad():
        x = torch.randn((s.batch, *s.latent_shape), device=s.device, dtype=s.dtype)
        context = encode_reports(s, text, s.batch, unet.config.cross_attention_dim or 1)
        spacing = torch.full((1, 3), 75.0, device=s.device, dtype=s.dtype)
        v = pipe.guided_velocity(x, torch.full((1,), t, device=s.device), context, s.guidance, spacing)
        x = s.scheduler.step(v, t, x, t_next)[0]


def decode_step(s: Setup, unet: DiffusionUNet, vae: AutoencoderKL, text: nn.Module | None = None,
                slab: int | None = None, host_memory: str = "low", on_device: bool = False) -> None:
    """Latents -> HU volumes as ``Text2CTPipeline.decode_latents`` does, with the pipeline's weights resident;
    ``slab`` None for the plain decode, else the exact tiled decode storing activations on the host (or on
    the device, ``on_device``: what ``storage="auto"`` picks where they fit) in its ``host_memory`` mode
    (``low``: recompute the full-resolution level, ``fast``: store every activation)."""
    resident(s, unet, vae, text)
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


def encode_step(s: Setup, unet: DiffusionUNet, vae: AutoencoderKL, text: nn.Module | None = None,
                slab: int | None = None, host_memory: str = "low", on_device: bool = False) -> None:
    """A batch of volumes -> latent mean and std as the latent cache encodes it (``--batch-size`` volumes at
    once, read into host memory in float32; only the VAE's weights resident); ``slab`` None for the one-piece
    encode on the device, else the exact tiled encoder, the images and stored activations on the host (or on
    the device, ``on_device``)."""
    materialize(vae.eval(), s.device, s.dtype)
    with torch.no_grad():
        x = torch.zeros((s.batch, 1, *s.volume), device=s.host, dtype=torch.float32)
        if slab is None:
            vae.encode(x.to(s.device, s.dtype))
        else:
            tiled_encode(vae, x, slab, s.device if on_device else s.host, host_memory)


class AdamW:
    """AdamW's state and step with the memory of torch's multi-tensor (foreach) AdamW, the default on CUDA:
    two fp32 moments per parameter, updated in place, one temporary the size of the second moments."""

    def __init__(self, params: list[torch.Tensor], lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.exp_avg = [torch.zeros(p.shape, device=p.device, dtype=torch.float32) for p in params]
        self.exp_avg_sq = [torch.zeros(p.shape, device=p.device, dtype=torch.float32) for p in params]

    def step(self, grad_clip: float = 1.0) -> None:
        """Clip the gradient norm, update, and free the gradients (``zero_grad(set_to_none=True)``)."""
        torch.nn.utils.clip_grad_norm_(self.params, grad_clip)
        grads = [p.grad for p in self.params]
        with torch.no_grad():
            torch._foreach_lerp_(self.exp_avg, grads, 1 - self.betas[0])
            torch._foreach_mul_(self.exp_avg_sq, self.betas[1])
            torch._foreach_addcmul_(self.exp_avg_sq, grads, grads, 1 - self.betas[1])
            denom = torch._foreach_sqrt(self.exp_avg_sq)
            torch._foreach_add_(denom, self.eps)
            torch._foreach_addcdiv_(self.params, self.exp_avg, denom, -self.lr)
        for p in self.params:
            p.grad = None


def trainable(s: Setup, module: nn.Module, checkpointing: bool) -> tuple[AdamW, bool]:
    """``module`` materialised for training: fp32 master weights when ``s.dtype`` is below fp32 (then the
    forward runs under autocast to ``s.dtype``, as the trainers' bf16 autocast), gradient checkpointing set,
    AdamW's state made. Returns the optimizer and whether the step is mixed precision."""
    mixed = s.dtype != torch.float32
    materialize(module.train(), s.device, torch.float32 if mixed else s.dtype, requires_grad=True)
    if hasattr(module, "set_gradient_checkpointing"):
        module.set_gradient_checkpointing(checkpointing)
    return AdamW(list(module.parameters())), mixed


def mixed_precision(s: Setup, mixed: bool) -> contextlib.AbstractContextManager:
    """The trainers' autocast region on the planned device (on ``meta``: :mod:`.autocast`'s emulation of CUDA
    autocast, which :func:`planner.track` installs)."""
    return bf16_autocast(torch.device(s.device), mixed, s.dtype)


def training_step(s: Setup, unet: DiffusionUNet, vae: AutoencoderKL, text: nn.Module | None = None,
                  checkpointing: bool = False) -> None:
    """One UNet training step as ``train/ldm.py`` runs it on cached latents: the frozen fp32 text tower
    encodes the batch's reports, rectified-flow L1 loss, backward, grad clipping, AdamW, optional EMA (in
    host RAM with ``ema_offload``; the VAE stays off the device). ``s.dtype`` below fp32 means fp32 master weights and grads with the network
    computing in ``s.dtype`` (bf16 autocast); AdamW moments and the EMA copy are fp32."""
    optimizer, mixed = trainable(s, unet, checkpointing)
    if text is not None:
        materialize(text.eval(), s.device, torch.float32)
    ema_device = s.host if s.ema_offload else s.device
    ema = [torch.zeros(p.shape, device=ema_device, dtype=torch.float32) for p in optimizer.params] if s.ema else []
    pipe = s.pipeline(unet, vae)
    b = s.batch
    x0 = torch.zeros((b, *s.latent_shape), device=s.device)
    context = encode_reports(s, text, b, unet.config.cross_attention_dim or 1, torch.float32)
    noise = torch.randn_like(x0)
    t = pipe.scheduler.sample_timesteps(x0)
    xt = pipe.scheduler.add_noise(x0, noise, t)
    extra = s.unet_inputs(unet, b, torch.float32)
    with mixed_precision(s, mixed):  # as ldm_loss: fp32 inputs, the UNet under autocast, the L1 loss outside
        v = unet(xt, t.to(xt.dtype), context=context, **extra)
    F.l1_loss(v.float(), pipe.scheduler.velocity_target(x0, noise).float()).backward()
    del v
    optimizer.step()
    with torch.no_grad():
        for e, p in zip(ema, optimizer.params):  # as EMA.update
            e.lerp_(p.to(e.device, torch.float32), 1e-3)


def patch_problem(s: Setup) -> str | None:
    """Why ``train vae`` cannot cut ``s.patch`` patches from ``s.volume`` volumes (None when it can)."""
    if all(p <= v for p, v in zip(s.patch, s.volume)):
        return None
    return (f"--patch {' '.join(map(str, s.patch))} exceeds the --volume the patches are cut from "
            f"({' '.join(map(str, s.volume))}): train vae crops them from its --size volumes")


def vae_training_step(s: Setup, vae: AutoencoderKL, disc: PatchDiscriminator, checkpointing: bool = False) -> None:
    """One ``train vae`` step once the adversarial loss is on: the loader's batch of whole ``s.volume`` volumes
    in host RAM, cropped there to ``s.patch`` patches, which go through the VAE
    and the (frozen) discriminator, backward, AdamW on the VAE; then the discriminator's own step on the real
    patches and the detached reconstructions (``train/vae.py``'s loss functions; weights as in
    :func:`training_step`)."""
    optimizer, mixed = trainable(s, vae, checkpointing)
    d_optimizer, _ = trainable(s, disc, False)
    cfg = VAETrainConfig(patch_size=s.patch, adv_weight=0.1)
    problem = patch_problem(s)
    if problem:
        raise ValueError(problem)
    items = [torch.zeros((1, *s.volume), device=s.host) for _ in range(s.batch)]  # the loader's whole volumes
    volumes = torch.stack(items)  # collated; the batch stays referenced through the step, as in train_vae
    del items
    crops = torch.stack([v[:, :s.patch[0], :s.patch[1], :s.patch[2]] for v in volumes])  # as random_patches
    x = crops.to(s.device, torch.float32)  # fp32 patches on the device
    del crops
    disc.requires_grad_(False)
    loss, _, recon = vae_loss(vae, x, cfg, None, disc, autocast=mixed)
    loss.backward()
    del loss
    optimizer.step()
    disc.requires_grad_(True)
    discriminator_loss(disc, x, recon, cfg.adv_loss, autocast=mixed).backward()
    d_optimizer.step()


def clip_training_step(s: Setup, clip: CLIP3D, checkpointing: bool = False) -> None:
    """One ``train clip`` step: ``s.clip_batch`` reports (padded to the context) and volumes of
    ``s.clip_volume`` voxels through both towers, the symmetric InfoNCE, backward, AdamW (weights as in
    :func:`training_step`)."""
    optimizer, mixed = trainable(s, clip, checkpointing)
    volumes = torch.zeros((s.clip_batch, 1, *s.clip_volume), device=s.host)  # the loader's batch, on the host

    def loss() -> torch.Tensor:  # as clip_loss: tokens and the device copy of the volumes live only in here
        ids, mask = s.tokens(s.clip_batch)
        volume = volume_layout(volumes).to(s.device)
        with mixed_precision(s, mixed):
            return clip(ids, volume, mask).loss
    loss().backward()
    optimizer.step()
