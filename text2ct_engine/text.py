"""The text side of a model directory: ``clip/`` (CLIP text tower + projection) and ``tokenizer.json``.

Prompts become the UNet's cross-attention context: tokenize to the tower's context length, pool at the
end-of-text token, project, L2-normalise -> (B, 1, projection_dim). An empty prompt, allowed only for
unconditional sampling, gets the all-zero context that classifier-free guidance uses as "no condition".
"""
from __future__ import annotations

import os
import warnings
from typing import Sequence

import torch

from .models import CLIP3D, CLIPTextModelWithProjection, convert_text2ct_clip_state_dict
from .models.serialization import build_on_meta
from .tokenizer import CLIPTokenizer

CLIP_DIR, TOKENIZER_FILE = "clip", "tokenizer.json"


def check_text_side(encoder: CLIPTextModelWithProjection, tokenizer: CLIPTokenizer, where: str) -> None:
    """The tokenizer's ids must exist in the tower's embedding table."""
    if tokenizer.vocab_size > encoder.config.vocab_size:
        raise ValueError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the text tower only "
                         f"{encoder.config.vocab_size}: they do not belong together")


def load_text_side(directory: str | os.PathLike, device: torch.device,
                   dtype: torch.dtype | None = None) -> tuple[CLIPTextModelWithProjection, CLIPTokenizer]:
    clip_dir = os.path.join(directory, CLIP_DIR)
    tok_path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.isfile(tok_path):
        raise ValueError(f"{directory} has clip/ but no {TOKENIZER_FILE}: prompts cannot be tokenized")
    encoder = CLIPTextModelWithProjection.from_pretrained(clip_dir, device=device, dtype=dtype)
    tokenizer = CLIPTokenizer.from_file(tok_path, context_length=encoder.config.max_position_embeddings)
    check_text_side(encoder, tokenizer, str(directory))
    return encoder, tokenizer


def save_text_side(directory: str | os.PathLike, encoder: CLIPTextModelWithProjection | CLIP3D,
                   tokenizer: CLIPTokenizer | None) -> None:
    """Write ``clip/`` and ``tokenizer.json``; ``clip/`` may hold a whole CLIP3D (its text tower is read)."""
    if tokenizer is None:
        raise ValueError("a text encoder is saved together with its tokenizer")
    encoder.save_pretrained(os.path.join(directory, CLIP_DIR))
    tokenizer.save(os.path.join(directory, TOKENIZER_FILE))


def encode_prompts(encoder: CLIPTextModelWithProjection, tokenizer: CLIPTokenizer, prompts: Sequence[str],
                   device: torch.device, allow_empty: bool = False) -> torch.Tensor:
    """Prompts -> (B, 1, P) context; empty prompts (only with ``allow_empty``) give zeros."""
    tokens = tokenizer.encode(list(prompts), allow_empty=allow_empty).to(device)
    context = encoder.encode_context(tokens.input_ids, tokens.attention_mask)
    return context.masked_fill(tokens.empty[:, None, None], 0.0)


CLIP_CONFIG_KEYS = ("num_attention_heads", "hidden_act", "layer_norm_eps", "eos_token_id")  # what weights cannot tell


def check_clip_inputs(path: str, tokenizer_path: str | None, config: dict | None) -> CLIPTokenizer:
    """What converting the CLIP checkpoint ``path`` needs besides it, checked before it is read: the
    tokenizer (returned) and the ``--clip-config`` keys; one-line ``ValueError``s."""
    if tokenizer_path is None:
        raise ValueError(f"{path}: a CLIP text tower needs its tokenizer: pass --tokenizer tokenizer.json")
    if not os.path.isfile(tokenizer_path):
        raise ValueError(f"{tokenizer_path}: no such tokenizer file")
    unknown = sorted(set(config or {}) - set(CLIP_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"{path}: --clip-config: only {', '.join(CLIP_CONFIG_KEYS)} can be set (sizes come from "
                         f"the weights), got {unknown}")
    return CLIPTokenizer.from_file(tokenizer_path)


def convert_clip_checkpoint(checkpoint: dict, path: str, tokenizer_path: str | None, config: dict | None = None
                            ) -> tuple[CLIPTextModelWithProjection, CLIPTokenizer, str]:
    """A Text2CT CLIP checkpoint (+ its tokenizer.json) -> text tower, tokenizer, and a description.

    What the weights cannot tell comes from ``config`` (``num_attention_heads``, ``hidden_act``,
    ``layer_norm_eps``, ``eos_token_id``) or else CLIP's defaults (64-wide heads, quick_gelu, the
    tokenizer's end-of-text id).
    """
    tokenizer = check_clip_inputs(path, tokenizer_path, config)
    try:
        given = dict(config or {})
        given.setdefault("eos_token_id", tokenizer.eos_id)
        config, state = convert_text2ct_clip_state_dict(checkpoint, **given)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    with build_on_meta():
        encoder = CLIPTextModelWithProjection(config)
    encoder.load_hf_state_dict(state)
    tokenizer = CLIPTokenizer.from_file(tokenizer_path, context_length=config.max_position_embeddings)
    check_text_side(encoder, tokenizer, path)
    if tokenizer.vocab_size < config.vocab_size:  # fits the table, but a tower's own tokenizer fills it
        warnings.warn(f"{tokenizer_path} has {tokenizer.vocab_size} tokens, the text tower of {path} embeds "
                      f"{config.vocab_size}: unless it is the tokenizer that tower was trained with, prompts "
                      f"will be encoded wrongly")
    heads = config.num_attention_heads
    how = "as given" if "num_attention_heads" in given else \
        "CLIP's 64-wide rule: a checkpoint does not store the head count, --clip-config sets num_attention_heads"
    return encoder.eval(), tokenizer, (f"a {config.num_hidden_layers}-layer text tower ({config.hidden_size} wide, "
                                       f"{heads} head{'s' * (heads != 1)} of {config.hidden_size // heads}, {how})")
