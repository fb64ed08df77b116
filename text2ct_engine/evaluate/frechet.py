"""Fréchet distance between Gaussian fits of two feature sets (the statistic behind FID), in float64.

For N(mu1, S1) and N(mu2, S2)::

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)

The last trace is taken in the symmetric product form: S1^1/2 from the eigendecomposition of S1, then the
eigenvalues of the symmetric PSD matrix S1^1/2 S2 S1^1/2 (the same as those of S1 S2), whose square roots
are summed. Eigenvalues at round-off level are set to 0, so singular covariances (fewer samples than
features) work.

Small-sample bias: the estimate from N samples per set is biased upwards. Already the mean term has
E|m1 - m2|^2 = |mu1 - mu2|^2 + tr(S1)/N1 + tr(S2)/N2, and the covariance term adds more (Binkowski et al.
2018; Chong & Forsyth 2020): two samples of one distribution give d^2 > 0, larger the fewer samples there
are (and with N < feature width the covariances are rank-deficient). Compare distances only at equal N;
the split-half distance of the real set shows the floor at N/2.
"""
from __future__ import annotations

import numpy as np

MIN_SAMPLES = 2  # a covariance needs two feature vectors
BIAS_NOTE = ("biased upwards at finite N (two samples of one distribution give d^2 > 0, larger for fewer "
             "samples; rank-deficient covariances when N < feature width): compare values only at equal N; "
             "real_split_half is the distance between the two halves of the real set, a floor at N/2")


def gaussian_fit(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (P,) and unbiased covariance (P, P), float64, of ``features`` (N, P) with N >= 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < MIN_SAMPLES:
        raise ValueError(f"features must be (N, P) with N >= {MIN_SAMPLES}, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False, ddof=1).reshape(f.shape[1], f.shape[1])


def _psd_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with round-off removed: those below n * eps * the largest become 0
    (the square root would turn an eigenvalue of 1e-16 into 1e-8)."""
    tol = w.size * np.finfo(np.float64).eps * max(float(np.abs(w).max(initial=0.0)), 1e-300)
    return np.where(w > tol, w, 0.0)


def sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (round-off eigenvalues -> 0)."""
    a = np.asarray(a, dtype=np.float64)
    w, v = np.linalg.eigh(0.5 * (a + a.T))
    return (v * np.sqrt(_psd_eigenvalues(w))) @ v.T


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
    """tr((S1 S2)^1/2), computed as tr((S1^1/2 S2 S1^1/2)^1/2) with symmetric eigendecompositions."""
    r1 = sqrtm_psd(cov1)
    m = r1 @ np.asarray(cov2, dtype=np.float64) @ r1
    return float(np.sqrt(_psd_eigenvalues(np.linalg.eigvalsh(0.5 * (m + m.T)))).sum())


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2); >= 0."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.size, mu1.size):
        raise ValueError(f"means {mu1.shape}, {mu2.shape} and covariances {cov1.shape}, {cov2.shape} do not match")
    d = mu1 - mu2
    value = float(d @ d + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt_product(cov1, cov2))
    return max(value, 0.0)


def feature_frechet(generated: np.ndarray, real: np.ndarray) -> dict:
    """Fréchet distance of two feature sets (N, P), the real set's split-half distance, sizes and the bias note."""
    value = frechet_distance(*gaussian_fit(generated), *gaussian_fit(real))
    real = np.asarray(real, np.float64)
    half = None
    if real.shape[0] >= 2 * MIN_SAMPLES:
        half = frechet_distance(*gaussian_fit(real[0::2]), *gaussian_fit(real[1::2]))
    return {"value": value, "real_split_half": half, "n_generated": int(np.shape(generated)[0]),
            "n_real": int(real.shape[0]), "dim": int(real.shape[1]), "note": BIAS_NOTE}
