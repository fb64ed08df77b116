"""One pass over a set's volumes: each is read once and reduced to what the metrics need (HU histogram over
the body, the finding detector's reading, the CLIP volume tower's features), so nothing volume-sized is kept.

Reading, histograms and detection run in ``workers`` DataLoader processes (the detector takes seconds per
volume); the CLIP tower runs in this process. A volume that cannot be read is skipped with its reason. A
file measured once in a run (the same path in both sets) is not measured again.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.errors import BadDataError
from .findings import detect_findings
from .intensity import body_histogram
from .volume_sets import Study, read_hu


@dataclass
class Needs:
    """What to measure on every volume."""

    histogram: bool = False
    findings: bool = False
    clip_input: Callable[[torch.Tensor, tuple], torch.Tensor] | None = None  # HU, spacing -> tower input


@dataclass
class Measurement:
    """One volume reduced to the metrics' inputs; ``error`` set (and the rest None) when it was unreadable."""

    name: str
    error: str | None = None
    histogram: np.ndarray | None = None
    detected: dict[str, bool] | None = None
    hu_max: float | None = None
    spacing: tuple[float, float, float] | None = None  # mm per voxel, as read
    features: np.ndarray | None = None  # pooled volume-tower features (hidden,)
    embedding: np.ndarray | None = None  # normalised CLIP volume embedding (P,)


class _Reader(Dataset):
    def __init__(self, studies: list[Study], needs: Needs) -> None:
        self.studies, self.needs = studies, needs

    def __len__(self) -> int:
        return len(self.studies)

    def __getitem__(self, i: int) -> dict:
        study = self.studies[i]
        try:
            hu, spacing = read_hu(study)
        except BadDataError as err:
            return {"index": i, "error": err.reason}
        out: dict = {"index": i, "hu_max": float(hu.max()), "spacing": tuple(map(float, spacing))}
        if self.needs.histogram:
            out["histogram"] = body_histogram(hu.numpy(), spacing)
        if self.needs.findings:
            out["detected"] = {k: bool(v) for k, v in detect_findings(hu.numpy(), spacing).present.items()}
        if self.needs.clip_input is not None:
            out["clip_input"] = self.needs.clip_input(hu, spacing)
        return out


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def measure_studies(studies: list[Study], needs: Needs,
                    features: Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]] | None = None,
                    workers: int = 0, cache: dict[str, Measurement] | None = None,
                    progress: Callable[[int], None] | None = None) -> list[Measurement]:
    """Measure every study (in order); ``features`` maps a tower input (1, 1, Z, Y, X) to (pooled, embedding).

    ``cache`` (real path -> Measurement) is read and filled, so a file shared by two sets is measured once.
    """
    cache = {} if cache is None else cache
    keys = [os.path.realpath(s.path) for s in studies]
    todo = [i for i, k in enumerate(keys) if k not in cache]
    loader = DataLoader(_Reader([studies[i] for i in todo], needs), batch_size=None, num_workers=workers,
                        worker_init_fn=_one_thread if workers else None)
    for item in loader:
        study = studies[todo[item["index"]]]
        m = Measurement(study.name, error=item.get("error"), histogram=item.get("histogram"),
                        detected=item.get("detected"), hu_max=item.get("hu_max"), spacing=item.get("spacing"))
        if m.error is None and features is not None:
            pooled, embed = features(item["clip_input"])
            m.features, m.embedding = pooled[0], embed[0]
        cache[keys[todo[item["index"]]]] = m
        if progress is not None:
            progress(1)
    if progress is not None:
        progress(len(studies) - len(todo))
    return [replace(cache[k], name=s.name) for k, s in zip(keys, studies)]
