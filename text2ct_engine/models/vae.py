"""MAISI 3D KL autoencoder: same math and parameter names as MONAI's ``AutoencoderKlMaisi``.

Encoder: conv, per level ``num_res_blocks`` ResBlocks (+ attention where asked), stride-2 downsampling
between levels, optional non-local block, GroupNorm, conv to ``latent_channels``; then 1x1 convs give the
latent mean and log-variance. Decoder mirrors it with trilinear x2 upsampling + conv (or a transposed conv).
As in MAISI, the last GroupNorm of encoder and decoder is followed by the conv directly (no SiLU).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Conv, GroupNorm, MaisiConv, SpatialAttention, maybe_checkpoint
from .serialization import PretrainedMixin

# MONAI keyword arguments that only steer MAISI's own memory bookkeeping; accepted and ignored.
MEMORY_KWARGS = ("num_splits", "dim_split", "norm_float16", "print_info", "save_mem", "use_flash_attention")


@dataclass
class AutoencoderKLConfig:
    """The keyword arguments of ``AutoencoderKlMaisi`` that define the math (Text2CT's values by default)."""
    spatial_dims: int = 3
    in_channels: int = 1
    out_channels: int = 1
    num_res_blocks: Sequence[int] = field(default_factory=lambda: [2, 2, 2])
    num_channels: Sequence[int] = field(default_factory=lambda: [64, 128, 256])
    attention_levels: Sequence[bool] = field(default_factory=lambda: [False, False, False])
    latent_channels: int = 4
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    with_encoder_nonlocal_attn: bool = False
    with_decoder_nonlocal_attn: bool = False
    include_fc: bool = False
    use_combined_linear: bool = False
    use_convtranspose: bool = False

    def validate(self) -> None:
        n = len(self.num_channels)
        if len(self.num_res_blocks) != n or len(self.attention_levels) != n:
            raise ValueError("num_res_blocks, num_channels and attention_levels must have the same length")
        if any(c % self.norm_num_groups for c in self.num_channels):
            raise ValueError(f"every entry of num_channels {list(self.num_channels)} must be divisible by "
                             f"norm_num_groups={self.norm_num_groups}")
        if self.spatial_dims != 3:
            raise ValueError("the MAISI autoencoder is 3D: spatial_dims must be 3")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.num_channels) - 1)


class ResBlock(nn.Module):
    """GroupNorm+SiLU, conv, GroupNorm+SiLU, conv, plus a (1x1-projected) shortcut.

    ``maisi`` picks MAISI's conv key layout (``MaisiResBlock``) over MONAI's plain one (``AEKLResBlock``).
    """

    def __init__(self, in_ch: int, out_ch: int, groups: int, eps: float, maisi: bool = True) -> None:
        super().__init__()
        conv = MaisiConv if maisi else Conv
        self.norm1 = GroupNorm(groups, in_ch, eps)
        self.conv1 = conv(3, in_ch, out_ch)
        self.norm2 = GroupNorm(groups, out_ch, eps)
        self.conv2 = conv(3, out_ch, out_ch)
        self.nin_shortcut = conv(3, in_ch, out_ch, kernel_size=1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x, act="silu"))
        h = self.conv2(self.norm2(h, act="silu"))
        return self.nin_shortcut(x) + h


class Downsample(nn.Module):
    """Pad one voxel at the high end of each axis, then a stride-2 3x3x3 conv."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = MaisiConv(3, ch, ch, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1) * 3))


class Upsample(nn.Module):
    """Trilinear x2 then a 3x3x3 conv, or one stride-2 transposed conv."""

    def __init__(self, ch: int, transposed: bool) -> None:
        super().__init__()
        self.transposed = transposed
        self.conv = MaisiConv(3, ch, ch, stride=2 if transposed else 1, padding=1, transposed=transposed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.transposed:
            x = F.interpolate(x, scale_factor=2.0, mode="trilinear")
        return self.conv(x)


def _attention(cfg: AutoencoderKLConfig, ch: int) -> SpatialAttention:
    return SpatialAttention(ch, None, cfg.norm_num_groups, cfg.norm_eps, cfg.include_fc, cfg.use_combined_linear)


def _nonlocal(cfg: AutoencoderKLConfig, ch: int) -> list[nn.Module]:
    g, e = cfg.norm_num_groups, cfg.norm_eps
    return [ResBlock(ch, ch, g, e, maisi=False), _attention(cfg, ch), ResBlock(ch, ch, g, e, maisi=False)]


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderKLConfig) -> None:
        super().__init__()
        g, e, chs = cfg.norm_num_groups, cfg.norm_eps, list(cfg.num_channels)
        blocks: list[nn.Module] = [MaisiConv(3, cfg.in_channels, chs[0])]
        ch = chs[0]
        for level, out_ch in enumerate(chs):
            for _ in range(cfg.num_res_blocks[level]):
                blocks.append(ResBlock(ch, out_ch, g, e))
                ch = out_ch
                if cfg.attention_levels[level]:
                    blocks.append(_attention(cfg, ch))
            if level != len(chs) - 1:
                blocks.append(Downsample(ch))
        if cfg.with_encoder_nonlocal_attn:
            blocks += _nonlocal(cfg, ch)
        blocks += [GroupNorm(g, ch, e), MaisiConv(3, ch, cfg.latent_channels)]
        self.blocks = nn.ModuleList(blocks)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = maybe_checkpoint(block, self.gradient_checkpointing, x)
        return x


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderKLConfig) -> None:
        super().__init__()
        g, e = cfg.norm_num_groups, cfg.norm_eps
        chs = list(reversed(cfg.num_channels))
        attn, nres = list(reversed(cfg.attention_levels)), list(reversed(cfg.num_res_blocks))
        ch = chs[0]
        blocks: list[nn.Module] = [MaisiConv(3, cfg.latent_channels, ch)]
        if cfg.with_decoder_nonlocal_attn:
            blocks += _nonlocal(cfg, ch)
        for level, out_ch in enumerate(chs):
            for _ in range(nres[level]):
                blocks.append(ResBlock(ch, out_ch, g, e))
                ch = out_ch
                if attn[level]:
                    blocks.append(_attention(cfg, ch))
            if level != len(chs) - 1:
                blocks.append(Upsample(ch, cfg.use_convtranspose))
        blocks += [GroupNorm(g, ch, e), MaisiConv(3, ch, cfg.out_channels)]
        self.blocks = nn.ModuleList(blocks)
        self.gradient_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            z = maybe_checkpoint(block, self.gradient_checkpointing, z)
        return z


class AutoencoderKL(PretrainedMixin, nn.Module):
    """MAISI's KL autoencoder; loads ``AutoencoderKlMaisi.state_dict()`` with ``strict=True``.

    Takes the keyword arguments of ``AutoencoderKlMaisi``; those that only steer MAISI's memory bookkeeping
    (``num_splits``, ``dim_split``, ``save_mem``, ...) are accepted and ignored, ``use_checkpointing``
    switches on gradient checkpointing.
    """

    config_class = AutoencoderKLConfig

    def __init__(self, config: AutoencoderKLConfig | None = None, **kwargs) -> None:
        super().__init__()
        checkpointing = bool(kwargs.pop("use_checkpointing", False))
        for k in MEMORY_KWARGS:
            kwargs.pop(k, None)
        cfg = config or AutoencoderKLConfig(**kwargs)
        if config is not None and kwargs:
            raise ValueError("pass either a config or keyword arguments, not both")
        cfg.validate()
        self.config = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        lc = cfg.latent_channels
        self.quant_conv_mu = Conv(3, lc, lc, kernel_size=1)
        self.quant_conv_log_sigma = Conv(3, lc, lc, kernel_size=1)
        self.post_quant_conv = Conv(3, lc, lc, kernel_size=1)
        self.set_gradient_checkpointing(checkpointing)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each encoder/decoder block in backward instead of keeping its activations."""
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = enabled

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (B, C, D, H, W) -> latent mean and standard deviation."""
        return self.posterior(self.encoder(x))

    def posterior(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output -> latent mean and standard deviation (log-variance clamped to [-30, 20])."""
        z_mu = self.quant_conv_mu(h)
        z_log_var = torch.clamp(self.quant_conv_log_sigma(h), -30.0, 20.0)
        return z_mu, torch.exp(z_log_var / 2)

    def sampling(self, z_mu: torch.Tensor, z_sigma: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(z_sigma.shape, generator=generator, device=z_sigma.device, dtype=z_sigma.dtype)
        return z_mu + eps * z_sigma

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, latent_channels, d, h, w) -> image."""
        return self.decoder(self.post_quant_conv(z))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x)[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z_mu, z_sigma = self.encode(x)
        return self.decode(self.sampling(z_mu, z_sigma)), z_mu, z_sigma
