"""3D PatchGAN discriminator and the adversarial losses that train a VAE against it.

The discriminator scores overlapping patches of a volume as real or reconstructed: 4x4x4 convs with
LeakyReLU(0.2), each halving the grid but the last two, with instance norm after all but the first and the
last, ending in one logit per patch (the layout of MONAI's ``PatchDiscriminator`` that MAISI trains with).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

ADV_LOSSES = ("least_squares", "hinge")


class PatchDiscriminator(nn.Module):
    """``num_layers`` stride-2 stages from ``channels`` wide (doubling, at most x8), then two stride-1 convs."""

    def __init__(self, in_channels: int = 1, channels: int = 32, num_layers: int = 3) -> None:
        super().__init__()
        if num_layers < 1 or channels < 1:
            raise ValueError("the discriminator needs at least one layer and one channel")
        self.num_layers = num_layers
        layers: list[nn.Module] = [nn.Conv3d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, num_layers + 1):
            out = channels * 2 ** min(i, 3)
            layers += [nn.Conv3d(ch, out, 4, 2 if i < num_layers else 1, 1, bias=False),
                       nn.InstanceNorm3d(out, affine=True), nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv3d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def output_size(self, size: Sequence[int]) -> tuple[int, ...]:
        """The logit grid for an input grid ``size`` (every axis must stay >= 1)."""
        out = []
        for n in size:
            for _ in range(self.num_layers):
                n = (n - 2) // 2 + 1  # 4x4x4, stride 2, padding 1
            out.append(n - 2)         # two 4x4x4, stride 1, padding 1
        return tuple(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def generator_adv_loss(fake_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """What the VAE minimises to make its reconstructions score as real."""
    if kind == "least_squares":
        return (fake_logits.float() - 1).pow(2).mean()
    if kind == "hinge":
        return -fake_logits.float().mean()
    raise ValueError(f"adversarial loss must be one of {ADV_LOSSES}, got {kind!r}")


def discriminator_adv_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """What the discriminator minimises: real patches towards 1 (hinge: >= 1), fakes towards 0 (<= -1)."""
    real, fake = real_logits.float(), fake_logits.float()
    if kind == "least_squares":
        return 0.5 * ((real - 1).pow(2).mean() + fake.pow(2).mean())
    if kind == "hinge":
        return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    raise ValueError(f"adversarial loss must be one of {ADV_LOSSES}, got {kind!r}")
