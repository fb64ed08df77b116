"""MAISI diffusion UNet: same math and parameter names as MONAI's ``DiffusionModelUNetMaisi``.

Timestep (+ class, + spacing / body-region) embedding conditions every ResBlock; levels with attention use a
spatial transformer (self-attention over voxels, cross-attention to the context) when ``with_conditioning``,
plain spatial self-attention otherwise. Skip connections run from every down-path block to the up path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Conv, GroupNorm, SpatialAttention, SpatialTransformer, maybe_checkpoint
from .serialization import PretrainedMixin

IGNORED_KWARGS = ("use_flash_attention",)  # attention always runs through ops.attention


@dataclass
class DiffusionUNetConfig:
    """The keyword arguments of ``DiffusionModelUNetMaisi`` (Text2CT's values by default)."""
    spatial_dims: int = 3
    in_channels: int = 4
    out_channels: int = 4
    num_res_blocks: int | Sequence[int] = 2
    num_channels: Sequence[int] = field(default_factory=lambda: [64, 128, 256, 512])
    attention_levels: Sequence[bool] = field(default_factory=lambda: [False, False, True, True])
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    resblock_updown: bool = True
    num_head_channels: int | Sequence[int] = field(default_factory=lambda: [0, 0, 32, 32])
    with_conditioning: bool = True
    transformer_num_layers: int = 1
    cross_attention_dim: int | None = 768
    num_class_embeds: int | None = 128
    upcast_attention: bool = False
    include_fc: bool = True
    use_combined_linear: bool = False
    dropout_cattn: float = 0.0
    include_top_region_index_input: bool = False
    include_bottom_region_index_input: bool = False
    include_spacing_input: bool = True

    def __post_init__(self) -> None:
        n = len(self.num_channels)
        if isinstance(self.num_res_blocks, int):
            self.num_res_blocks = [self.num_res_blocks] * n
        if isinstance(self.num_head_channels, int):
            self.num_head_channels = [self.num_head_channels] * n
        self.num_res_blocks, self.num_head_channels = list(self.num_res_blocks), list(self.num_head_channels)
        self.num_channels, self.attention_levels = list(self.num_channels), list(self.attention_levels)

    def validate(self) -> None:
        n = len(self.num_channels)
        if self.with_conditioning and self.cross_attention_dim is None:
            raise ValueError("with_conditioning=True needs cross_attention_dim")
        if self.cross_attention_dim is not None and not self.with_conditioning:
            raise ValueError("cross_attention_dim needs with_conditioning=True")
        if any(c % self.norm_num_groups for c in self.num_channels):
            raise ValueError(f"every entry of num_channels {self.num_channels} must be divisible by "
                             f"norm_num_groups={self.norm_num_groups}")
        if not (len(self.attention_levels) == len(self.num_head_channels) == len(self.num_res_blocks) == n):
            raise ValueError("attention_levels, num_head_channels and num_res_blocks must match num_channels")
        if not 0.0 <= self.dropout_cattn <= 1.0:
            raise ValueError("dropout_cattn must lie in [0, 1]")
        for c, a, hc in zip(self.num_channels, self.attention_levels, self.num_head_channels):
            if a and (hc <= 0 or c % hc):
                raise ValueError(f"level with {c} channels has attention but num_head_channels={hc} does not "
                                 f"divide it")


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding (cos half, then sin half) of (N,) timesteps, float32."""
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D (N,), got shape {tuple(timesteps.shape)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
                      / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def mlp_embedding(in_dim: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))


class ResnetBlock(nn.Module):
    """GroupNorm+SiLU, [resample], conv, + time embedding, GroupNorm+SiLU, conv, plus a shortcut.

    ``up`` resamples by nearest x2, ``down`` by 2x average pooling (``resblock_updown``). The time-embedding
    add is fused into the second GroupNorm.
    """

    def __init__(self, dims: int, in_ch: int, out_ch: int, temb_ch: int, groups: int, eps: float,
                 up: bool = False, down: bool = False) -> None:
        super().__init__()
        self.dims, self.up, self.down = dims, up, down
        self.norm1 = GroupNorm(groups, in_ch, eps)
        self.conv1 = Conv(dims, in_ch, out_ch)
        self.time_emb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = GroupNorm(groups, out_ch, eps)
        self.conv2 = Conv(dims, out_ch, out_ch)
        self.skip_connection = Conv(dims, in_ch, out_ch, kernel_size=1) if in_ch != out_ch else nn.Identity()

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return upsample_nearest(x)
        if self.down:
            return (F.avg_pool2d if self.dims == 2 else F.avg_pool3d)(x, kernel_size=2, stride=2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self._resample(self.norm1(x, act="silu"))
        x = self._resample(x)
        h = self.conv1(h)
        h = self.norm2(h, act="silu", add=self.time_emb_proj(F.silu(emb)).to(h.dtype))
        return self.skip_connection(x) + self.conv2(h)


class ConvDownsample(nn.Module):
    """Stride-2 3x3 conv (MONAI ``DiffusionUnetDownsample(use_conv=True)``), used without ``resblock_updown``."""

    def __init__(self, dims: int, ch: int) -> None:
        super().__init__()
        self.op = Conv(dims, ch, ch, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.op(x)


class ConvUpsample(nn.Module):
    """Nearest x2 then a 3x3 conv (MONAI ``Upsample(mode="nontrainable", post_conv=...)``)."""

    def __init__(self, dims: int, ch: int) -> None:
        super().__init__()
        self.postconv = Conv(dims, ch, ch)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.postconv(upsample_nearest(x))


def upsample_nearest(x: torch.Tensor) -> torch.Tensor:
    """Nearest x2, in ``x``'s dtype. CUDA autocast runs upsampling in fp32, which would turn the whole up path
    (concatenations, norms, residuals) fp32: 0.5 GiB more to train at Text2CT's size. Copying values is exact
    in any dtype, so cast straight back; under autocast the up path then stays bf16 like the rest of the
    network (MONAI's widens there), and without autocast nothing changes."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest").to(x.dtype)


class Level(nn.Module):
    """One UNet level: ResBlocks, each optionally followed by attention, then an optional resampler."""

    def __init__(self, cfg: DiffusionUNetConfig, in_chs: list[int], out_ch: int, temb_ch: int, attention: bool,
                 head_ch: int, resample: str | None) -> None:
        super().__init__()
        d, g, e = cfg.spatial_dims, cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(ResnetBlock(d, c, out_ch, temb_ch, g, e) for c in in_chs)
        if attention:
            self.attentions = nn.ModuleList(_attention(cfg, out_ch, head_ch) for _ in in_chs)
        self.has_attention = attention
        if resample == "down":
            self.downsampler = (ResnetBlock(d, out_ch, out_ch, temb_ch, g, e, down=True) if cfg.resblock_updown
                                else ConvDownsample(d, out_ch))
        elif resample == "up":
            self.upsampler = (ResnetBlock(d, out_ch, out_ch, temb_ch, g, e, up=True) if cfg.resblock_updown
                              else ConvUpsample(d, out_ch))
        self.gradient_checkpointing = False

    @property
    def sampler(self) -> nn.Module | None:
        return getattr(self, "downsampler", None) or getattr(self, "upsampler", None)

    def run_block(self, i: int, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        ckpt = self.gradient_checkpointing
        h = maybe_checkpoint(self.resnets[i], ckpt, h, emb)
        if self.has_attention:
            attn = self.attentions[i]
            h = maybe_checkpoint(attn, ckpt, h, context) if isinstance(attn, SpatialTransformer) else \
                maybe_checkpoint(attn, ckpt, h)
        return h

    def resample(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        sampler = self.sampler
        return h if sampler is None else maybe_checkpoint(sampler, self.gradient_checkpointing, h, emb)


def _attention(cfg: DiffusionUNetConfig, ch: int, head_ch: int) -> nn.Module:
    if cfg.with_conditioning:
        return SpatialTransformer(cfg.spatial_dims, ch, ch // head_ch, head_ch, cfg.transformer_num_layers,
                                  cfg.norm_num_groups, cfg.norm_eps, cfg.cross_attention_dim, cfg.dropout_cattn,
                                  cfg.upcast_attention, cfg.include_fc, cfg.use_combined_linear)
    return SpatialAttention(ch, head_ch, cfg.norm_num_groups, cfg.norm_eps, cfg.include_fc,
                            cfg.use_combined_linear)


class MiddleBlock(nn.Module):
    def __init__(self, cfg: DiffusionUNetConfig, ch: int, temb_ch: int) -> None:
        super().__init__()
        d, g, e = cfg.spatial_dims, cfg.norm_num_groups, cfg.norm_eps
        self.resnet_1 = ResnetBlock(d, ch, ch, temb_ch, g, e)
        self.attention = _attention(cfg, ch, cfg.num_head_channels[-1])
        self.resnet_2 = ResnetBlock(d, ch, ch, temb_ch, g, e)
        self.gradient_checkpointing = False

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        ckpt = self.gradient_checkpointing
        h = maybe_checkpoint(self.resnet_1, ckpt, h, emb)
        h = maybe_checkpoint(self.attention, ckpt, h, context) if isinstance(self.attention, SpatialTransformer) \
            else maybe_checkpoint(self.attention, ckpt, h)
        return maybe_checkpoint(self.resnet_2, ckpt, h, emb)


class DiffusionUNet(PretrainedMixin, nn.Module):
    """MAISI's diffusion UNet; loads ``DiffusionModelUNetMaisi.state_dict()`` with ``strict=True``."""

    config_class = DiffusionUNetConfig

    def __init__(self, config: DiffusionUNetConfig | None = None, **kwargs) -> None:
        super().__init__()
        for k in IGNORED_KWARGS:
            kwargs.pop(k, None)
        if config is not None and kwargs:
            raise ValueError("pass either a config or keyword arguments, not both")
        cfg = config or DiffusionUNetConfig(**kwargs)
        cfg.validate()
        self.config = cfg
        d, chs, g, e = cfg.spatial_dims, cfg.num_channels, cfg.norm_num_groups, cfg.norm_eps
        self.conv_in = Conv(d, cfg.in_channels, chs[0])
        temb = chs[0] * 4
        self.time_embed = mlp_embedding(chs[0], temb)
        if cfg.num_class_embeds is not None:
            self.class_embedding = nn.Embedding(cfg.num_class_embeds, temb)
        extra = 0
        if cfg.include_top_region_index_input:
            self.top_region_index_layer, extra = mlp_embedding(4, temb), extra + 1
        if cfg.include_bottom_region_index_input:
            self.bottom_region_index_layer, extra = mlp_embedding(4, temb), extra + 1
        if cfg.include_spacing_input:
            self.spacing_layer, extra = mlp_embedding(3, temb), extra + 1
        temb_all = temb * (1 + extra)

        n = len(chs)
        self.down_blocks = nn.ModuleList()
        skip_chs, ch = [chs[0]], chs[0]
        for i in range(n):
            nres = cfg.num_res_blocks[i]
            ins = [ch] + [chs[i]] * (nres - 1)
            last = i == n - 1
            self.down_blocks.append(Level(cfg, ins, chs[i], temb_all, cfg.attention_levels[i],
                                          cfg.num_head_channels[i], None if last else "down"))
            ch = chs[i]
            skip_chs += [ch] * (nres + (0 if last else 1))
        self.middle_block = MiddleBlock(cfg, ch, temb_all)
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(n)):
            nres = cfg.num_res_blocks[i] + 1
            ins = []
            for j in range(nres):
                ins.append((ch if j == 0 else chs[i]) + skip_chs.pop())
            self.up_blocks.append(Level(cfg, ins, chs[i], temb_all, cfg.attention_levels[i],
                                        cfg.num_head_channels[i], "up" if i > 0 else None))
            ch = chs[i]
        self.out = nn.Sequential(GroupNorm(g, chs[0], e), nn.SiLU(), Conv(d, chs[0], cfg.out_channels))
        self._zero_init()

    def _zero_init(self) -> None:
        """As MONAI: each residual branch's last conv (ResBlock ``conv2``, transformer ``proj_out``) and the
        output conv start at zero, so each fresh ResBlock / transformer returns its shortcut and the UNet predicts 0."""
        last = [m.conv2 for m in self.modules() if isinstance(m, ResnetBlock)]
        last += [m.proj_out for m in self.modules() if isinstance(m, SpatialTransformer)] + [self.out[2]]
        with torch.no_grad():
            for p in (p for m in last for p in m.parameters()):
                p.zero_()

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each ResBlock / attention block in backward instead of keeping its activations."""
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = enabled

    def embed(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None,
              top_region_index_tensor: torch.Tensor | None, bottom_region_index_tensor: torch.Tensor | None,
              spacing_tensor: torch.Tensor | None) -> torch.Tensor:
        """Timestep + class embedding, with the region / spacing embeddings concatenated."""
        cfg = self.config
        emb = self.time_embed(timestep_embedding(timesteps, cfg.num_channels[0]).to(x.dtype))
        if cfg.num_class_embeds is not None:
            if class_labels is None:
                raise ValueError("this UNet is class-conditional: pass class_labels (1 = CT in MAISI)")
            emb = emb + self.class_embedding(class_labels).to(x.dtype)
        for flag, name, value in ((cfg.include_top_region_index_input, "top_region_index", top_region_index_tensor),
                                  (cfg.include_bottom_region_index_input, "bottom_region_index",
                                   bottom_region_index_tensor),
                                  (cfg.include_spacing_input, "spacing", spacing_tensor)):
            if flag:
                if value is None:
                    raise ValueError(f"this UNet was built with include_{name}_input: pass {name}_tensor")
                layer = getattr(self, "spacing_layer" if name == "spacing" else f"{name}_layer")
                emb = torch.cat([emb, layer(value.to(x.dtype))], dim=1)
        return emb

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, top_region_index_tensor: torch.Tensor | None = None,
                bottom_region_index_tensor: torch.Tensor | None = None,
                spacing_tensor: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the model output (velocity for rectified flow) for noisy latents ``x`` at ``timesteps``."""
        if context is not None and not self.config.with_conditioning:
            raise ValueError("this UNet has with_conditioning=False: it takes no context")
        emb = self.embed(x, timesteps, class_labels, top_region_index_tensor, bottom_region_index_tensor,
                         spacing_tensor)
        h = self.conv_in(x)
        skips = [h]
        for level in self.down_blocks:
            for i in range(len(level.resnets)):
                h = level.run_block(i, h, emb, context)
                skips.append(h)
            if level.sampler is not None:
                h = level.resample(h, emb)
                skips.append(h)
        h = self.middle_block(h, emb, context)
        for level in self.up_blocks:
            for i in range(len(level.resnets)):
                h = level.run_block(i, torch.cat([h, skips.pop()], dim=1), emb, context)
            h = level.resample(h, emb)
        norm, _, conv = self.out
        return conv(norm(h, act="silu"))
