"""Linear probe: how much of a set of binary labels a frozen embedding carries, read on held-out items.

Used to ask whether a text tower's conditioning vector holds the findings a report names (a UNet can only
follow what its context carries): fit one L2-regularised logistic regression per label on training
embeddings, then score held-out ones against the majority answer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def per_label_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(L,) share of the N items whose ``logits > 0`` equals their 0/1 ``labels``, for (N, L) inputs."""
    return ((logits > 0).to(labels.dtype) == labels).to(torch.float64).mean(0)


def label_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(accuracy of ``logits > 0``, accuracy of always answering each label's majority), averaged over the
    labels that are present at least once in ``labels`` (N, L), so never-seen labels do not inflate it."""
    present = labels.sum(0) > 0
    if not present.any():
        return float("nan"), float("nan")
    share = labels.double().mean(0)
    return (per_label_accuracy(logits, labels)[present].mean().item(),
            torch.maximum(share, 1 - share)[present].mean().item())


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 l2: float = 1e-3, max_iter: int = 500) -> dict[str, list[float]]:
    """Held-out accuracy of per-label logistic regressions on (N, P) embeddings and (N, L) 0/1 labels.

    Features are standardised with the training statistics; the fit is full-batch L-BFGS in float64 (the
    result depends only on the data). Returns per label ``accuracy`` and ``majority`` (always answering the
    training set's more common value); labels constant in training are left out (``kept`` their indices).
    """
    if train_x.dim() != 2 or test_x.dim() != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"embeddings {tuple(train_x.shape)} and {tuple(test_x.shape)} must be (N, P) alike")
    if train_y.shape != (train_x.shape[0], test_y.shape[1]) or test_y.shape[0] != test_x.shape[0]:
        raise ValueError(f"labels {tuple(train_y.shape)} / {tuple(test_y.shape)} must be (N, L) for "
                         f"{train_x.shape[0]} / {test_x.shape[0]} embeddings")
    share = train_y.double().mean(0)
    kept = [i for i in range(train_y.shape[1]) if 0.0 < share[i] < 1.0]
    if not kept:
        raise ValueError("no label takes both values in the training set: nothing to probe")
    mean, std = train_x.double().mean(0), train_x.double().std(0).clamp_min(1e-12)
    a, b = (train_x.double() - mean) / std, (test_x.double() - mean) / std
    ya, yb = train_y.double()[:, kept], test_y.double()[:, kept]
    w = torch.zeros(a.shape[1], len(kept), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(kept), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(a @ w + bias, ya) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        accuracy = per_label_accuracy(b @ w + bias, yb)
    majority = ((share[kept] >= 0.5).double() == yb).double().mean(0)
    return {"kept": kept, "accuracy": accuracy.tolist(), "majority": majority.tolist()}
