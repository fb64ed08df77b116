"""HU distribution over the body and the Wasserstein-1 distance between two such distributions (no network).

A volume's body is everything not connected to the air that touches the field of view's x/y border
(found on the detector's 3 mm grid, then mapped back to the native voxels): the patient with lungs and
airways, without the air around them. Its voxels' HU values go into 1-HU bins over [-1024, 3072) (values
outside fall into the end bins); a set's distribution is the mean of its volumes' normalised histograms,
so every volume weighs the same whatever its size.
"""
from __future__ import annotations

import numpy as np

from .findings import to_working_grid
from .morphology import label

HU_LO, HU_HI = -1024, 3072  # 1-HU bins
AIR_HU = -400.0


def body_mask(hu: np.ndarray, spacing) -> np.ndarray:
    """Voxels of ``hu`` (X, Y, Z) inside the body: not in air connected to the x/y faces."""
    hu = np.asarray(hu, np.float32)
    coarse, _ = to_working_grid(hu, spacing)
    lab, _ = label(coarse < AIR_HU)
    border = np.unique(np.concatenate([lab[[0, -1]].ravel(), lab[:, [0, -1]].ravel()]))
    body = ~np.isin(lab, border[border > 0])
    index = [np.minimum(((np.arange(n) + 0.5) * m / n).astype(np.int64), m - 1) for n, m in zip(hu.shape, body.shape)]
    return body[np.ix_(*index)]


def hu_histogram(values: np.ndarray) -> np.ndarray | None:
    """Normalised (sums to 1) float64 histogram of HU ``values`` in 1-HU bins over [HU_LO, HU_HI); None if empty."""
    v = np.asarray(values).ravel()
    if v.size == 0:
        return None
    idx = np.clip(np.floor(v).astype(np.int64) - HU_LO, 0, HU_HI - HU_LO - 1)
    counts = np.bincount(idx, minlength=HU_HI - HU_LO).astype(np.float64)
    return counts / counts.sum()


def body_histogram(hu: np.ndarray, spacing) -> np.ndarray | None:
    """:func:`hu_histogram` of the body voxels of ``hu`` (None when the volume has no body)."""
    hu = np.asarray(hu, np.float32)
    return hu_histogram(hu[body_mask(hu, spacing)])


def wasserstein1(p: np.ndarray, q: np.ndarray, bin_width: float = 1.0) -> float:
    """Wasserstein-1 (earth mover's) distance between two histograms on the same bins: the area between
    their cumulative distributions, in units of ``bin_width`` (HU here). Both are normalised first."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    if p.shape != q.shape or p.ndim != 1 or p.sum() <= 0 or q.sum() <= 0:
        raise ValueError(f"histograms must be non-empty and on the same bins, got shapes {p.shape} and {q.shape}")
    return float(np.abs(np.cumsum(p / p.sum()) - np.cumsum(q / q.sum())).sum() * bin_width)


def mean_hu(histogram: np.ndarray) -> float:
    """Mean HU of a normalised 1-HU histogram (values at the bins' lower edges, i.e. integer HU)."""
    return float(np.dot(histogram, np.arange(HU_LO, HU_HI)))


def histogram_distance(generated: list[np.ndarray], real: list[np.ndarray]) -> dict:
    """W1 between the sets' mean histograms, and each set's mean HU over the body."""
    g, r = np.mean(generated, axis=0), np.mean(real, axis=0)
    return {"wasserstein1_hu": wasserstein1(g, r), "mean_hu_generated": mean_hu(g), "mean_hu_real": mean_hu(r),
            "n_generated": len(generated), "n_real": len(real), "bins": [HU_LO, HU_HI, 1]}
