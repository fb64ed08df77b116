"""CLIP3D: the text tower and the 3D volume tower in one embedding space, with a learnable temperature.

State-dict layout is HF ``CLIPModel``'s: ``text_model.*``, ``text_projection.weight``, ``vision_model.*``,
``visual_projection.weight``, ``logit_scale``. So a CLIP3D directory also serves
``CLIPTextModelWithProjection.from_pretrained`` (the sampling pipeline needs only the text side) and
``CLIPVisionModel3D.from_pretrained``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..precision import autocast_off
from .clip_text import CLIPTextConfig, CLIPTextModelWithProjection, convert_text2ct_clip_state_dict
from .clip_vision3d import CLIPVisionModel3D, VisionConfig3D
from .serialization import PretrainedMixin

__all__ = ["CLIP3DConfig", "CLIP3D", "CLIP3DOutput", "clip_contrastive_loss", "convert_text2ct_clip_state_dict",
           "LOGIT_SCALE_MAX"]

LOGIT_SCALE_MAX = math.log(100.0)  # CLIP caps the temperature's inverse at 100


@dataclass
class CLIP3DConfig:
    """Both towers and the shared embedding size (Text2CT: 768, the UNet's cross-attention size).

    ``projection_dim`` overrides each tower's own ``projection_dim``.
    """

    text_config: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    vision_config: VisionConfig3D = field(default_factory=VisionConfig3D)
    projection_dim: int = 768
    logit_scale_init_value: float = math.log(1 / 0.07)

    def __post_init__(self) -> None:
        if isinstance(self.text_config, Mapping):
            self.text_config = CLIPTextConfig.from_dict(self.text_config)
        if isinstance(self.vision_config, Mapping):
            self.vision_config = VisionConfig3D.from_dict(self.vision_config)
        if not isinstance(self.projection_dim, int) or self.projection_dim <= 0:
            raise ValueError(f"CLIP3DConfig: projection_dim must be a positive integer, got {self.projection_dim!r}")
        self.text_config = replace(self.text_config, projection_dim=self.projection_dim)
        self.vision_config = replace(self.vision_config, projection_dim=self.projection_dim)

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "clip3d", "text_config": self.text_config.to_dict(),
                "vision_config": self.vision_config.to_dict(), "projection_dim": self.projection_dim,
                "logit_scale_init_value": self.logit_scale_init_value}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIP3DConfig":
        for key in ("text_config", "vision_config"):
            if not isinstance(d.get(key), Mapping):
                raise ValueError(f"CLIP3D config has no {key!r} section")
        return cls(text_config=CLIPTextConfig.from_dict(d["text_config"]),
                   vision_config=VisionConfig3D.from_dict(d["vision_config"]),
                   projection_dim=int(d.get("projection_dim", 768)),
                   logit_scale_init_value=float(d.get("logit_scale_init_value", math.log(1 / 0.07))))


def clip_contrastive_loss(text_embeds: torch.Tensor, volume_embeds: torch.Tensor,
                          logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE: mean of the text->volume and volume->text cross-entropies over the batch.

    ``text_embeds`` / ``volume_embeds``: (B, P), L2-normalised, row i of each a matching pair.
    ``logit_scale``: the log inverse temperature (CLIP3D's parameter); it is capped at log(100) and
    exponentiated here, so logits = exp(min(logit_scale, log 100)) * t @ v^T.
    """
    if text_embeds.shape != volume_embeds.shape or text_embeds.dim() != 2:
        raise ValueError(f"text_embeds {tuple(text_embeds.shape)} and volume_embeds {tuple(volume_embeds.shape)} "
                         f"must both be (B, P)")
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=text_embeds.device)
    scale = scale.clamp(max=LOGIT_SCALE_MAX).exp()
    with autocast_off(text_embeds.device):  # fp32 logits: autocast would round the B x B matmul to bf16
        logits_per_text = scale * (text_embeds.float() @ volume_embeds.float().t())
        labels = torch.arange(text_embeds.shape[0], device=text_embeds.device)
        return 0.5 * (F.cross_entropy(logits_per_text, labels) + F.cross_entropy(logits_per_text.t(), labels))


class CLIP3DOutput(NamedTuple):
    loss: torch.Tensor | None
    logits_per_text: torch.Tensor  # (B_text, B_volume)
    logits_per_volume: torch.Tensor  # (B_volume, B_text)
    text_embeds: torch.Tensor  # (B, P), normalised
    volume_embeds: torch.Tensor  # (B, P), normalised


class CLIP3D(PretrainedMixin, nn.Module):
    """Text tower + volume tower + ``logit_scale``; ``forward`` gives logits and the contrastive loss.

    ``save_pretrained``/``from_pretrained``: a directory (``config.json`` + ``model.safetensors``) that the
    text and volume towers also load from.
    """

    config_class = CLIP3DConfig

    def __init__(self, config: CLIP3DConfig) -> None:
        super().__init__()
        self.config = config
        text = CLIPTextModelWithProjection(config.text_config)
        vision = CLIPVisionModel3D(config.vision_config)
        self.text_model, self.text_projection = text.text_model, text.text_projection
        self.vision_model, self.visual_projection = vision.vision_model, vision.visual_projection
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))

    def text_tower(self) -> CLIPTextModelWithProjection:
        """The text side as a stand-alone tower sharing these parameters (what the pipeline uses)."""
        return CLIPTextModelWithProjection(self.config.text_config, text_model=self.text_model,
                                           text_projection=self.text_projection)

    def volume_tower(self) -> CLIPVisionModel3D:
        """The volume side as a stand-alone tower sharing these parameters."""
        return CLIPVisionModel3D(self.config.vision_config, vision_model=self.vision_model,
                                 visual_projection=self.visual_projection)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, P) L2-normalised text embedding."""
        pooled = self.text_model(input_ids, attention_mask).pooler_output
        return F.normalize(self.text_projection(pooled), dim=-1)

    def encode_context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1, P): the UNet's cross-attention context."""
        return self.encode_text(input_ids, attention_mask)[:, None, :]

    def encode_volume(self, volume: torch.Tensor) -> torch.Tensor:
        """(B, P) L2-normalised volume embedding of (B, C, D, H, W) volumes."""
        pooled = self.vision_model(volume).pooler_output
        return F.normalize(self.visual_projection(pooled), dim=-1)

    def forward(self, input_ids: torch.Tensor, volume: torch.Tensor, attention_mask: torch.Tensor | None = None,
                return_loss: bool = True) -> CLIP3DOutput:
        t = self.encode_text(input_ids, attention_mask)
        v = self.encode_volume(volume)
        scale = self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()
        with autocast_off(t.device):
            logits_per_text = scale * (t.float() @ v.float().t())
        loss = clip_contrastive_loss(t, v, self.logit_scale) if return_loss else None
        return CLIP3DOutput(loss, logits_per_text, logits_per_text.t(), t, v)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute every transformer block of both towers in backward instead of keeping activations."""
        self.text_model.encoder.gradient_checkpointing = self.vision_model.gradient_checkpointing = enabled

