"""CLIP text tower: a causal transformer pooled at the end-of-text token, projected and L2-normalised.

Parameter names follow Hugging Face ``transformers``, so their weights load with ``strict=True``:

* :class:`CLIPTextTransformer` <-> ``transformers.CLIPTextModel`` (v5 layout; v4's ``text_model.`` prefix
  is what :meth:`CLIPTextModelWithProjection.load_hf_state_dict` strips):
  ``embeddings.{token,position}_embedding``, ``encoder.layers.N.self_attn.{q,k,v,out}_proj``,
  ``encoder.layers.N.layer_norm{1,2}``, ``encoder.layers.N.mlp.fc{1,2}``, ``final_layer_norm``.
* :class:`CLIPTextModelWithProjection` <-> ``transformers.CLIPTextModelWithProjection``:
  ``text_model.*`` + ``text_projection.weight`` (no bias).

The UNet's cross-attention context is ``encode_context(ids)``: the pooled, projected, L2-normalised text
embedding as a one-token sequence (B, 1, projection_dim); Text2CT uses projection_dim = 768.

Also here: :func:`convert_text2ct_clip_state_dict` (a Text2CT/CT-CLIP-style checkpoint -> this tower).
Model directories (``config.json`` + ``model.safetensors``) come from :class:`.serialization.PretrainedMixin`.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, Mapping, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import ops
from .serialization import PretrainedMixin, build_on_meta, strict_load

__all__ = [
    "CLIPTextConfig", "CLIPTextTransformer", "CLIPTextModelWithProjection", "CLIPTextOutput",
    "CLIPEncoderLayer", "convert_text2ct_clip_state_dict",
]

# --------------------------------------------------------------------------------------------- config

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def _check_positive(owner: str, **values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")


@dataclass
class CLIPTextConfig:
    """Shape of the text tower; field names are those of ``transformers.CLIPTextConfig``.

    ``max_position_embeddings`` is the context length (77 for OpenAI CLIP, 512 in Text2CT).
    Pooling follows HF: with ``eos_token_id == 2`` (configs saved before transformers PR #24773) the
    pooled token is the one with the highest id (OpenAI's vocabulary puts <|endoftext|> last); otherwise it
    is the first occurrence of ``eos_token_id``. ``projection_dim=None`` means no projection (the pooled
    output itself is normalised).
    """

    vocab_size: int = 49408
    max_position_embeddings: int = 77
    hidden_size: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = 768
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1

    def __post_init__(self) -> None:
        _check_positive("CLIPTextConfig", vocab_size=self.vocab_size,
                        max_position_embeddings=self.max_position_embeddings, hidden_size=self.hidden_size,
                        num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                        intermediate_size=self.intermediate_size)
        if self.projection_dim is not None:
            _check_positive("CLIPTextConfig", projection_dim=self.projection_dim)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIPTextConfig: hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIPTextConfig: hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; with ``model_type``/``architectures`` so ``transformers`` can read it too."""
        return {"model_type": "clip_text_model", "architectures": ["CLIPTextModelWithProjection"], **asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPTextConfig":
        """Build from our ``config.json``, HF's ``CLIPTextConfig`` JSON, or a CLIP/CLIP3D config holding
        ``text_config`` (whose top-level ``projection_dim`` then applies). Unknown keys are ignored."""
        d = dict(d)
        if isinstance(d.get("text_config"), Mapping):
            outer = d
            d = dict(outer["text_config"])
            if "projection_dim" in outer:
                d["projection_dim"] = outer["projection_dim"]
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# --------------------------------------------------------------------------------------------- layers


class CLIPAttention(nn.Module):
    """Multi-head self-attention with HF's ``{q,k,v,out}_proj`` names, causal or not, on ``ops.attention``."""

    def __init__(self, hidden_size: int, num_heads: int, causal: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.causal = causal
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = ops.attention(q, k, v, key_padding_mask, is_causal=self.causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class CLIPMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str) -> None:
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)). Shared by both CLIP towers."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, act: str, eps: float,
                 causal: bool) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(hidden_size, num_heads, causal)
        self.layer_norm1 = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = CLIPMLP(hidden_size, intermediate_size, act)
        self.layer_norm2 = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), key_padding_mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """A stack of :class:`CLIPEncoderLayer` with optional activation checkpointing per layer."""

    def __init__(self, layers: list[CLIPEncoderLayer], gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.gradient_checkpointing = gradient_checkpointing

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, key_padding_mask, use_reentrant=False)
            else:
                x = layer(x, key_padding_mask)
        return x


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        positions = torch.arange(n, device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPTextOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # (B, N, hidden), after final_layer_norm
    pooler_output: torch.Tensor  # (B, hidden), at the end-of-text token
    text_embeds: torch.Tensor | None = None  # (B, projection_dim), projected, NOT normalised (as HF)


def _bool_mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids "
                         f"{tuple(input_ids.shape)}")
    return attention_mask.to(device=input_ids.device, dtype=torch.bool)  # no all-ones shortcut: no host sync


class CLIPTextTransformer(nn.Module):
    """The CLIP text transformer (HF ``CLIPTextModel`` parameter names). forward -> :class:`CLIPTextOutput`.

    ``attention_mask`` (B, N; 1/True = token) only changes the hidden states at padded positions: attention
    is causal, so padding after the end-of-text token never reaches the pooled output.
    """

    def __init__(self, config: CLIPTextConfig, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(
            [CLIPEncoderLayer(config.hidden_size, config.num_attention_heads, config.intermediate_size,
                              config.hidden_act, config.layer_norm_eps, causal=True)
             for _ in range(config.num_hidden_layers)], gradient_checkpointing)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def pooled_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B,) index of the token pooled per row, HF's rule (see :class:`CLIPTextConfig`). A row without an
        end-of-text token pools its last position (HF would take position 0, the start token)."""
        eos = self.config.eos_token_id
        if eos == 2:
            return input_ids.argmax(dim=-1)
        is_eos = input_ids == eos
        first = is_eos.int().argmax(dim=-1)
        return torch.where(is_eos.any(dim=-1), first, torch.full_like(first, input_ids.shape[1] - 1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> CLIPTextOutput:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor (B, N), got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens, more than the context length "
                             f"{self.config.max_position_embeddings}")
        input_ids = input_ids.long()
        x = self.embeddings(input_ids)
        x = self.encoder(x, _bool_mask(attention_mask, input_ids))
        x = self.final_layer_norm(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), self.pooled_positions(input_ids)]
        return CLIPTextOutput(x, pooled)


def _init_clip_weights(module: nn.Module, num_layers: int, std: float = 0.02) -> None:
    """CLIP's initialisation: embeddings N(0, 0.02); attention/MLP scaled by width and depth."""
    for m in module.modules():
        if isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, CLIPAttention):
            width = m.q_proj.in_features
            for p in (m.q_proj, m.k_proj, m.v_proj):
                nn.init.normal_(p.weight, std=width ** -0.5 * (2 * num_layers) ** -0.5)
            nn.init.normal_(m.out_proj.weight, std=width ** -0.5)
            for p in (m.q_proj, m.k_proj, m.v_proj, m.out_proj):
                nn.init.zeros_(p.bias)
        elif isinstance(m, CLIPMLP):
            width = m.fc1.in_features
            nn.init.normal_(m.fc1.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(m.fc2.weight, std=width ** -0.5 * (2 * num_layers) ** -0.5)
            nn.init.zeros_(m.fc1.bias)
            nn.init.zeros_(m.fc2.bias)


class CLIPTextModelWithProjection(PretrainedMixin, nn.Module):
    """Text tower + projection (HF ``CLIPTextModelWithProjection`` names): prompt ids -> UNet context.

    ``forward`` returns HF's outputs (``text_embeds`` unnormalised); ``encode`` gives the L2-normalised
    embedding (B, P) and ``encode_context`` the cross-attention context (B, 1, P).
    """

    config_class = CLIPTextConfig

    def __init__(self, config: CLIPTextConfig, gradient_checkpointing: bool = False,
                 text_model: CLIPTextTransformer | None = None, text_projection: nn.Linear | None = None) -> None:
        super().__init__()
        self.config = config
        fresh = text_model is None
        self.text_model = text_model if text_model is not None else CLIPTextTransformer(config, gradient_checkpointing)
        if text_projection is None and config.projection_dim is not None:
            text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        self.text_projection = text_projection
        if fresh:
            _init_clip_weights(self.text_model, config.num_hidden_layers)
            if self.text_projection is not None:
                nn.init.normal_(self.text_projection.weight, std=config.hidden_size ** -0.5)

    @property
    def embed_dim(self) -> int:
        return self.config.projection_dim or self.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> CLIPTextOutput:
        out = self.text_model(input_ids, attention_mask)
        embeds = self.text_projection(out.pooler_output) if self.text_projection is not None else out.pooler_output
        return out._replace(text_embeds=embeds)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised projected text embedding, (B, P)."""
        return F.normalize(self(input_ids, attention_mask).text_embeds, dim=-1)

    def encode_context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's cross-attention context: (B, 1, P), L2-normalised (Text2CT: P = 768)."""
        return self.encode(input_ids, attention_mask)[:, None, :]

    # ------------------------------------------------------------------------------------ weights I/O

    def load_hf_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load, strictly, HF ``CLIPTextModelWithProjection`` / ``CLIPModel`` (text part) / ``CLIPTextModel``
        weights (v4 ``text_model.`` prefix or v5 bare names; the latter only if ``projection_dim`` is None)."""
        strict_load(self, _text_weights(state_dict), "CLIP text tower weights")

    @classmethod
    def select_weights(cls, config: CLIPTextConfig, state: dict[str, torch.Tensor]
                       ) -> tuple[CLIPTextConfig, dict[str, torch.Tensor]]:
        """``from_pretrained`` reads our directories, ``transformers``' (safetensors) and ``CLIP3D``'s (its text
        tower is taken); a bare HF ``CLIPTextModel`` (no projection) gives ``projection_dim=None``."""
        state = _text_weights(state)
        if "text_projection.weight" not in state:
            config = replace(config, projection_dim=None)
        return config, state


def _text_weights(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text tower's tensors under our (HF v4) names: drops ``position_ids`` and other towers' tensors
    (``vision_model.*``, ``logit_scale`` ...), adds the ``text_model.`` prefix to HF v5 bare names."""
    sd = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
    if not any(k.startswith("text_model.") for k in sd):
        sd = {"text_model." + k: v for k, v in sd.items()}
    if any(k.startswith(("vision_model.", "visual_projection.")) for k in sd):
        sd = {k: v for k, v in sd.items() if k.startswith(("text_model.", "text_projection."))}
    return sd


# --------------------------------------------------------------------------------------------- converter

_TOKEN_EMB = "embeddings.token_embedding.weight"
_WRAPPERS = ("state_dict", "model_state_dict", "model", "module", "clip", "clip_state_dict")
_PROJ_SUFFIXES = ("text_projection.weight", "to_text_latent.weight")


def _unwrap(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Descend through a training checkpoint's wrappers ({"state_dict": {...}}, ...) to the tensors."""
    sd: Mapping[str, Any] = state_dict
    for _ in range(3):
        if any(isinstance(v, torch.Tensor) for v in sd.values()):
            break
        inner = next((sd[k] for k in _WRAPPERS if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            break
        sd = inner
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def convert_text2ct_clip_state_dict(
    state_dict: Mapping[str, Any], *, config: CLIPTextConfig | Mapping[str, Any] | None = None,
    num_attention_heads: int | None = None, hidden_act: str = "quick_gelu", layer_norm_eps: float = 1e-5,
    eos_token_id: int = 2,
) -> tuple[CLIPTextConfig, dict[str, torch.Tensor]]:
    """A Text2CT-style CLIP checkpoint -> (config, state dict) for :class:`CLIPTextModelWithProjection`.

    The text tower is found by its ``embeddings.token_embedding.weight`` key under any prefix
    (``text_transformer.``, ``text_model.``, ``model.text_transformer.text_model.``, ``module.`` ...); the
    projection is ``*text_projection.weight`` or ``*to_text_latent.weight`` (nn.Linear, (P, hidden)) or a
    bare ``text_projection`` parameter (OpenAI layout (hidden, P), transposed here). Sizes are read from the
    weights; what weights cannot tell (heads, activation, eps, pooling) comes from ``config`` when given,
    else the arguments (heads default hidden // 64, OpenAI CLIP's rule; ``eos_token_id=2`` = HF's legacy
    highest-id pooling, right for the OpenAI vocabulary). Raises ``ValueError`` with one line naming what
    is missing or mismatched. Tensors are returned as stored (dtype unchanged, not copied).
    """
    sd = _unwrap(state_dict)
    towers = sorted(k[: -len(_TOKEN_EMB)] for k in sd if k.endswith(_TOKEN_EMB))
    if not towers:
        raise ValueError(f"Text2CT CLIP checkpoint: no text tower found (no key ending in '{_TOKEN_EMB}')")
    if len(towers) > 1:
        raise ValueError(f"Text2CT CLIP checkpoint: several text towers found, prefixes {towers}")
    prefix = towers[0]
    tok = sd[prefix + _TOKEN_EMB]
    vocab_size, hidden = tok.shape
    pos_key = prefix + "embeddings.position_embedding.weight"
    fc1_key = prefix + "encoder.layers.0.mlp.fc1.weight"
    for key in (pos_key, fc1_key):
        if key not in sd:
            raise ValueError(f"Text2CT CLIP checkpoint is missing key: {key}")
    layer_ids = {int(m.group(1)) for k in sd
                 if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", k))}
    num_layers = max(layer_ids) + 1

    # projection: if several, the one sharing the longest dotted prefix with the tower
    cands = [k for k in sd if k.endswith(_PROJ_SUFFIXES) or k == "text_projection" or k.endswith(".text_projection")]
    cands = [k for k in cands if sd[k].dim() == 2 and hidden in sd[k].shape]
    if not cands:
        raise ValueError("Text2CT CLIP checkpoint is missing the text projection weight (looked for keys "
                         "ending in 'text_projection.weight', 'to_text_latent.weight' or 'text_projection')")
    if len(cands) > 1:
        def shared(key: str) -> int:
            n = 0
            for a, b in zip(key.split("."), prefix.split(".")):
                if a != b:
                    break
                n += 1
            return n
        best = max(shared(k) for k in cands)
        cands = [k for k in cands if shared(k) == best]
    if len(cands) > 1:
        raise ValueError(f"Text2CT CLIP checkpoint: several text projection weights found: {cands}")
    proj_key = cands[0]
    proj = sd[proj_key]
    if not proj_key.endswith(".weight"):  # OpenAI-style parameter used as x @ P: (hidden, P)
        proj = proj.t().contiguous()
    if proj.shape[1] != hidden:
        raise ValueError(f"Text2CT CLIP checkpoint: projection {proj_key} has shape {tuple(sd[proj_key].shape)}, "
                         f"which does not take the text hidden size {hidden}")

    found = dict(vocab_size=int(vocab_size), hidden_size=int(hidden),
                 max_position_embeddings=int(sd[pos_key].shape[0]), num_hidden_layers=num_layers,
                 intermediate_size=int(sd[fc1_key].shape[0]), projection_dim=int(proj.shape[0]))
    if config is not None:
        given = asdict(config) if isinstance(config, CLIPTextConfig) else asdict(CLIPTextConfig.from_dict(config))
        clash = {k: (given[k], v) for k, v in found.items() if given[k] != v}
        if clash:
            raise ValueError(f"Text2CT CLIP checkpoint does not match the given config (config, weights): {clash}")
        cfg = CLIPTextConfig(**given)
    else:
        cfg = CLIPTextConfig(**found, num_attention_heads=num_attention_heads or max(1, hidden // 64),
                             hidden_act=hidden_act, layer_norm_eps=layer_norm_eps, eos_token_id=eos_token_id)

    roots = ("embeddings.", "encoder.", "final_layer_norm.")  # the text tower's own keys under the prefix
    out = {"text_model." + k[len(prefix):]: v for k, v in sd.items()
           if k.startswith(prefix) and k[len(prefix):].startswith(roots) and not k.endswith("position_ids")}
    out["text_projection.weight"] = proj
    with build_on_meta():
        model = CLIPTextModelWithProjection(cfg)
    expected = model.state_dict()
    missing = [prefix + k[len("text_model."):] for k in expected if k not in out]
    if missing:
        raise ValueError(f"Text2CT CLIP checkpoint is missing {len(missing)} text tower key(s): "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    unexpected = [prefix + k[len("text_model."):] for k in out if k not in expected]
    if unexpected:
        raise ValueError(f"Text2CT CLIP checkpoint has text tower key(s) this model does not know: "
                         f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    source = {"text_model." + k[len(prefix):]: k for k in sd if k.startswith(prefix)}
    source["text_projection.weight"] = proj_key
    bad = [f"{source[k]} {tuple(out[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
           if tuple(out[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"Text2CT CLIP checkpoint: wrong shape for {'; '.join(bad[:3])}")
    return cfg, out
