"""Clinical relevance: per-finding agreement between the labels of a volume's report and what the finding
detector reads on the volume (sensitivity, specificity, balanced accuracy, and their macro averages).

The detector reads the 12 findings the phantom draws (``findings.FINDING_KEYS``); CT-RATE's other six labels
(lung opacity, fibrotic sequela, mosaic attenuation, peribronchial and septal thickening, bronchiectasis)
are not scored. A label with no positive (negative) volume in the set has no sensitivity (specificity) and
no balanced accuracy; each macro average is the mean over the labels where it is defined.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..data.labels import CTRATE_LABELS
from .findings import FINDING_KEYS, WORK_MM

# detector key -> CT-RATE column ("lung_nodule" -> "Lung nodule")
LABEL_OF = {k: k.replace("_", " ").capitalize() for k in FINDING_KEYS}
assert set(LABEL_OF.values()) <= set(CTRATE_LABELS)
METAL_HU = 1500.0  # the detector reads medical material as voxels above this
COARSEST_MM = 3.5  # validated at WORK_MM voxels; coarser volumes are upsampled and over-read the fluid findings


def truth_matrix(labels: Sequence[Sequence[float]]) -> np.ndarray:
    """(N, 12) bool in ``FINDING_KEYS`` order from (N, 18) labels in CT-RATE's column order."""
    cols = [CTRATE_LABELS.index(LABEL_OF[k]) for k in FINDING_KEYS]
    return np.asarray(labels, dtype=np.float64).reshape(-1, len(CTRATE_LABELS))[:, cols] > 0.5


def detection_matrix(detected: Sequence[Mapping[str, bool]]) -> np.ndarray:
    """(N, 12) bool in ``FINDING_KEYS`` order from the detector's ``present`` dicts."""
    return np.array([[bool(d[k]) for k in FINDING_KEYS] for d in detected], dtype=bool).reshape(-1, len(FINDING_KEYS))


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def agreement_table(predicted: np.ndarray, truth: np.ndarray, names: Sequence[str] | None = None) -> dict:
    """Per-label confusion counts, sensitivity, specificity and balanced accuracy, plus macro averages.

    ``predicted``, ``truth``: (N, L) bool, one row per volume; ``names``: L label names (default: CT-RATE's
    names of the detector's findings).
    """
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    if predicted.shape != truth.shape or predicted.ndim != 2:
        raise ValueError(f"predicted {predicted.shape} and truth {truth.shape} must both be (N, labels)")
    names = list(names) if names is not None else [LABEL_OF[k] for k in FINDING_KEYS]
    rows = []
    for j, name in enumerate(names):
        p, t = predicted[:, j], truth[:, j]
        tp, fn = int((p & t).sum()), int((~p & t).sum())
        tn, fp = int((~p & ~t).sum()), int((p & ~t).sum())
        sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
        bal = 0.5 * (sens + spec) if sens is not None and spec is not None else None
        rows.append({"label": name, "positives": tp + fn, "negatives": tn + fp, "tp": tp, "fp": fp, "tn": tn,
                     "fn": fn, "sensitivity": sens, "specificity": spec, "balanced_accuracy": bal})
    macro = {key: _mean([r[key] for r in rows]) for key in ("sensitivity", "specificity", "balanced_accuracy")}
    macro["labels_with_balanced_accuracy"] = sum(r["balanced_accuracy"] is not None for r in rows)
    return {"n": int(truth.shape[0]), "rows": rows, "macro": macro}


def findings_agreement(detected: Sequence[Mapping[str, bool]], labels: Sequence[Sequence[float]],
                       hu_max: float | None = None, coarsest_mm: float | None = None) -> dict:
    """:func:`agreement_table` of detections vs report labels, with notes: medical material, when ``hu_max`` (the
    highest HU the volumes reach; pass the lower of two sets compared) is under what metal needs (e.g. generated
    volumes clipped to [-1000, 1000] HU), is left out of the macro averages; voxels coarser than
    ``COARSEST_MM`` (``coarsest_mm``: the largest voxel edge) are named."""
    truth, predicted = truth_matrix(labels), detection_matrix(detected)
    keep = list(range(len(FINDING_KEYS)))
    notes = []
    if hu_max is not None and hu_max <= METAL_HU:
        keep.remove(FINDING_KEYS.index("medical_material"))
        notes.append(f"Medical material cannot be detected: it needs voxels above {METAL_HU:g} HU and the volumes "
                     f"reach {hu_max:g} HU at most; it is left out of the macro averages")
    if coarsest_mm is not None and coarsest_mm > COARSEST_MM:
        notes.append(f"voxels of up to {coarsest_mm:g} mm: the detector is validated at {WORK_MM:g} mm and over-reads "
                     f"the fluid findings (pleural/pericardial effusion) above {COARSEST_MM:g} mm; use volumes "
                     f"of <= {WORK_MM:g} mm where it is the yardstick")
    table = agreement_table(predicted, truth)
    table["macro"] = agreement_table(predicted[:, keep], truth[:, keep],
                                     [table["rows"][j]["label"] for j in keep])["macro"]
    table["notes"] = notes
    return table
