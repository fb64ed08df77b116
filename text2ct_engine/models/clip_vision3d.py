"""3D ViT volume tower for the 3D CLIP: CT volume -> pooled, projected, L2-normalised embedding.

Conv3d patch embedding (kernel = stride = patch size), learned position embeddings (trilinearly resized
when the patch grid differs from the configured one), pre-norm transformer blocks whose attention goes
through ``text2ct_engine.ops.attention`` (non-causal, the same :class:`CLIPEncoderLayer` as the text
tower), a final LayerNorm, CLS or mean pooling, a bias-free projection.

Names follow HF's CLIP vision tower where one exists (``embeddings.patch_embedding``,
``embeddings.class_embedding``, ``embeddings.position_embedding``, ``encoder.layers.N.*``,
``post_layernorm``; in CLIP3D the projection is ``visual_projection``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .clip_text import ACTIVATIONS, CLIPEncoder, CLIPEncoderLayer, _check_positive, _init_clip_weights
from .serialization import PretrainedMixin

__all__ = ["VisionConfig3D", "VisionTransformer3D", "CLIPVisionModel3D", "CLIPVisionOutput3D"]


def _triple(v: int | Sequence[int], name: str) -> tuple[int, int, int]:
    t = (v, v, v) if isinstance(v, int) else tuple(int(x) for x in v)
    if len(t) != 3:
        raise ValueError(f"VisionConfig3D: {name} must be an int or 3 ints (D, H, W), got {v!r}")
    return t  # type: ignore[return-value]


@dataclass
class VisionConfig3D:
    """Shape of the 3D ViT. ``image_size``/``patch_size`` are (D, H, W) = (z, y, x) in voxels."""

    in_channels: int = 1
    image_size: tuple[int, int, int] = (128, 256, 256)
    patch_size: tuple[int, int, int] = (8, 16, 16)
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    pool: str = "cls"  # "cls" or "mean"
    projection_dim: int | None = 768
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.image_size = _triple(self.image_size, "image_size")
        self.patch_size = _triple(self.patch_size, "patch_size")
        sizes = {f"{name}[{i}]": s for name in ("image_size", "patch_size")
                 for i, s in enumerate(getattr(self, name))}
        _check_positive("VisionConfig3D", in_channels=self.in_channels, hidden_size=self.hidden_size,
                        num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                        intermediate_size=self.intermediate_size, **sizes)
        if self.projection_dim is not None:
            _check_positive("VisionConfig3D", projection_dim=self.projection_dim)
        bad = [i for i in range(3) if self.image_size[i] % self.patch_size[i]]
        if bad:
            raise ValueError(f"VisionConfig3D: image_size {self.image_size} is not divisible by patch_size "
                             f"{self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"VisionConfig3D: hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"VisionConfig3D: hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"VisionConfig3D: pool must be 'cls' or 'mean', got {self.pool!r}")

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(s // p for s, p in zip(self.image_size, self.patch_size))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_size"], d["patch_size"] = list(self.image_size), list(self.patch_size)
        return {"model_type": "clip_vision3d", **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VisionConfig3D":
        """From our JSON, or a CLIP3D config holding ``vision_config``. Unknown keys are ignored."""
        d = dict(d)
        if isinstance(d.get("vision_config"), Mapping):
            outer, d = d, dict(d["vision_config"])
            if "projection_dim" in outer:
                d["projection_dim"] = outer["projection_dim"]
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class VisionEmbeddings3D(nn.Module):
    def __init__(self, config: VisionConfig3D) -> None:
        super().__init__()
        self.config = config
        self.patch_embedding = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        d, h, w = config.grid
        self.num_extra = 1 if config.pool == "cls" else 0
        if self.num_extra:
            self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.position_embedding = nn.Embedding(self.num_extra + d * h * w, config.hidden_size)

    def grid_positions(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """Position embeddings of the patches, (d*h*w, C); resized trilinearly to another grid."""
        pos = self.position_embedding.weight[self.num_extra:]
        if tuple(grid) == self.config.grid:
            return pos
        d, h, w = self.config.grid
        g = pos.t().reshape(1, -1, d, h, w)
        g = F.interpolate(g.float(), size=tuple(grid), mode="trilinear", align_corners=False).to(pos.dtype)
        return g.reshape(pos.shape[1], -1).t()

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(volume)  # (B, C, d, h, w)
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        x = x + self.grid_positions(grid)[None].to(x.dtype)
        if self.num_extra:
            cls = (self.class_embedding + self.position_embedding.weight[0]).to(x.dtype)
            x = torch.cat([cls.expand(x.shape[0], 1, -1), x], dim=1)
        return x


class CLIPVisionOutput3D(NamedTuple):
    last_hidden_state: torch.Tensor  # (B, N(+1), hidden), after post_layernorm
    pooler_output: torch.Tensor  # (B, hidden)
    volume_embeds: torch.Tensor | None = None  # (B, projection_dim), projected, not normalised


class VisionTransformer3D(nn.Module):
    """The 3D ViT without projection: volume (B, C, D, H, W) -> :class:`CLIPVisionOutput3D`.

    D, H, W must be multiples of ``patch_size``; a grid other than the configured one resizes the position
    embeddings. ``gradient_checkpointing`` (config, or the ``gradient_checkpointing`` attribute) recomputes
    each block in backward.
    """

    def __init__(self, config: VisionConfig3D) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings3D(config)
        self.encoder = CLIPEncoder(
            [CLIPEncoderLayer(config.hidden_size, config.num_attention_heads, config.intermediate_size,
                              config.hidden_act, config.layer_norm_eps, causal=False)
             for _ in range(config.num_hidden_layers)], config.gradient_checkpointing)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.encoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.encoder.gradient_checkpointing = bool(value)

    def forward(self, volume: torch.Tensor) -> CLIPVisionOutput3D:
        c = self.config
        if volume.dim() != 5 or volume.shape[1] != c.in_channels:
            raise ValueError(f"volume must be (B, {c.in_channels}, D, H, W), got {tuple(volume.shape)}")
        if any(s % p for s, p in zip(volume.shape[2:], c.patch_size)):
            raise ValueError(f"volume size {tuple(volume.shape[2:])} is not divisible by patch_size {c.patch_size}")
        x = self.embeddings(volume)
        x = self.post_layernorm(self.encoder(x))
        pooled = x[:, 0] if c.pool == "cls" else x.mean(dim=1)
        return CLIPVisionOutput3D(x, pooled)


def init_vision_weights(model: VisionTransformer3D) -> None:
    """CLIP-style initialisation of a :class:`VisionTransformer3D`."""
    _init_clip_weights(model, model.config.num_hidden_layers)
    emb = model.embeddings
    nn.init.normal_(emb.patch_embedding.weight, std=0.02)
    nn.init.zeros_(emb.patch_embedding.bias)
    if emb.num_extra:
        nn.init.normal_(emb.class_embedding, std=model.config.hidden_size ** -0.5)


class CLIPVisionModel3D(PretrainedMixin, nn.Module):
    """Volume tower + projection: ``vision_model.*`` + ``visual_projection.weight``.

    ``encode(volume)`` -> (B, P) L2-normalised. ``save_pretrained``/``from_pretrained`` as the text tower.
    """

    config_class = VisionConfig3D

    def __init__(self, config: VisionConfig3D, vision_model: VisionTransformer3D | None = None,
                 visual_projection: nn.Linear | None = None) -> None:
        super().__init__()
        self.config = config
        fresh = vision_model is None
        self.vision_model = vision_model if vision_model is not None else VisionTransformer3D(config)
        if visual_projection is None and config.projection_dim is not None:
            visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        self.visual_projection = visual_projection
        if fresh:
            init_vision_weights(self.vision_model)
            if self.visual_projection is not None:
                nn.init.normal_(self.visual_projection.weight, std=config.hidden_size ** -0.5)

    @property
    def embed_dim(self) -> int:
        return self.config.projection_dim or self.config.hidden_size

    def forward(self, volume: torch.Tensor) -> CLIPVisionOutput3D:
        out = self.vision_model(volume)
        proj = self.visual_projection
        return out._replace(volume_embeds=proj(out.pooler_output) if proj is not None else out.pooler_output)

    def encode(self, volume: torch.Tensor) -> torch.Tensor:
        """L2-normalised projected volume embedding, (B, P)."""
        return F.normalize(self(volume).volume_embeds, dim=-1)

    @classmethod
    def select_weights(cls, config: VisionConfig3D, state: dict[str, torch.Tensor]
                       ) -> tuple[VisionConfig3D, dict[str, torch.Tensor]]:
        """A directory of this class or of ``CLIP3D`` (its volume tower is taken)."""
        return config, {k: v for k, v in state.items() if k.startswith(("vision_model.", "visual_projection."))}
