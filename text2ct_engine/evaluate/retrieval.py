"""Cross-modal retrieval recall: how often a report finds its own volume among all held-out volumes."""
from __future__ import annotations

from typing import Sequence

import torch


def retrieval_recall(text_embeds: torch.Tensor, volume_embeds: torch.Tensor,
                     ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Text -> volume recall@k: the share of texts whose own volume (same row) ranks in the top k.

    ``text_embeds`` / ``volume_embeds``: (N, P), row i of each a matching pair (L2-normalised for cosine
    similarity). Ties count against the text (its volume must score strictly above the others it passes).
    Returns ``{"top1": ..., "top5": ...}`` for the given ``ks`` (k >= N gives 1.0).
    """
    if text_embeds.shape != volume_embeds.shape or text_embeds.dim() != 2 or text_embeds.shape[0] == 0:
        raise ValueError(f"text_embeds {tuple(text_embeds.shape)} and volume_embeds "
                         f"{tuple(volume_embeds.shape)} must both be (N, P) with N >= 1")
    sim = text_embeds.float() @ volume_embeds.float().t()  # (texts, volumes)
    own = sim.diagonal()[:, None]
    rank = (sim >= own).sum(dim=1) - 1  # other volumes scoring at least as high as the right one
    return {f"top{k}": (rank < k).float().mean().item() for k in ks}
