"""Loader for directories in CT-RATE's layout (real CT-RATE or the phantom data set).

Layout (``root`` may be the directory holding ``dataset/`` or ``dataset/`` itself)::

    dataset/{train_fixed,valid_fixed}/<patient>/<study>/<volume>.nii.gz   (older copies: train/, valid/)
    dataset/radiology_text_reports/{train,validation}_reports.csv          VolumeName, ..., Findings_EN, Impressions_EN
    dataset/multi_abnormality_labels/{train,valid}_predicted_labels.csv    VolumeName + 18 labels (optional)
    dataset/metadata/{train,validation}_metadata.csv                       RescaleSlope/Intercept, XYSpacing, ZSpacing

A sample is a dict: ``volume`` (1, X, Y, Z) float32 in [0, 1] (RAS+ axes, HU window [-1000, 1000] by
default), ``text`` "Findings: ... Impression: ...", ``labels`` (18,) float32 in CT-RATE's column order (or
None without a labels CSV), ``spacing`` (3,) mm, ``name``. Bad data never raises mid-epoch: the index
skips volumes without a report, reports without a volume and rows with non-UTF-8 text, naming each; a
volume that cannot be read (truncated or corrupt file, non-3-D array, NaN/Inf) yields a ``skip`` sample
that :func:`collate` drops and reports. ``strict=True`` raises :class:`BadDataError` at the first problem.
"""
from __future__ import annotations

import csv
import io
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import BadDataError, BadDataLog, DataError
from .labels import CTRATE_LABELS
from .nifti import read_volume
from .transforms import preprocess

VOLUME_EXTS = (".nii.gz", ".nii")


@dataclass
class Record:
    """One usable study of the index."""

    name: str
    path: str
    text: str
    labels: list[float] | None = None
    rescale: tuple[float, float] | None = None
    spacing_override: tuple[float, float, float] | None = None
    extra: dict[str, str] = field(default_factory=dict)


def dataset_root(root: str) -> str:
    """The directory holding the split folders and CSV folders (``root`` or ``root/dataset``)."""
    sub = os.path.join(root, "dataset")
    return sub if os.path.isdir(sub) else root


def _split_prefixes(split: str) -> tuple[str, ...]:
    return ("valid", "validation") if split.startswith("valid") else (split,)


def find_csv(folder: str, split: str) -> str | None:
    """The CSV in ``folder`` whose name starts with the split ("train", "valid"/"validation")."""
    if not os.path.isdir(folder):
        return None
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(".csv"))
    for pre in _split_prefixes(split):
        for n in names:
            if n.lower().startswith(pre + "_") or n.lower().startswith(pre + "."):
                return os.path.join(folder, n)
    return None


def find_volume_dir(root: str, split: str) -> str | None:
    for pre in _split_prefixes(split):
        for name in (f"{pre}_fixed", pre):
            d = os.path.join(root, name)
            if os.path.isdir(d):
                return d
    return None


def read_csv(path: str, log: BadDataLog) -> list[dict[str, str]]:
    """Rows of a UTF-8 CSV; rows holding bytes that are not UTF-8 are logged and skipped."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    text = raw.decode("utf-8-sig", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None:
        raise DataError(f"{path} is empty or not a CSV file")
    if any(_bad_text(f) for f in reader.fieldnames):
        raise DataError(f"{path}: header is not UTF-8 text")
    rows = []
    for i, row in enumerate(reader, start=2):
        bad = [k for k, v in row.items() if k is not None and isinstance(v, str) and _bad_text(v)]
        if bad:
            name = _clean(row.get("VolumeName", "") or "")
            log.add(f"{path} line {i} ({name})", f"non-UTF-8 text in column {bad[0]}")
            continue
        rows.append({k: (v if v is not None else "") for k, v in row.items() if k is not None})
    return rows


def _bad_text(s: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in s)


def _clean(s: str) -> str:
    return s.encode("utf-8", errors="replace").decode("utf-8", errors="replace")


def _float(s: str | None) -> float | None:
    try:
        v = float(str(s).strip().strip("[]"))
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def _spacing_from_meta(row: dict[str, str]) -> tuple[float, float, float] | None:
    xy = str(row.get("XYSpacing", "")).strip().strip("[]()").replace(",", " ").split()
    z = _float(row.get("ZSpacing"))
    try:
        vals = [float(v) for v in xy]
    except ValueError:
        return None
    if not vals or z is None:
        return None
    sx, sy = (vals[0], vals[0]) if len(vals) == 1 else (vals[0], vals[1])
    return (sx, sy, z)


def _text(findings: str, impression: str) -> str:
    f = " ".join((findings or "").split())
    i = " ".join((impression or "").split())
    return f"Findings: {f} Impression: {i}"


def build_index(root: str, split: str = "train", log: BadDataLog | None = None, use_metadata: bool | None = None,
                require_report: bool = True) -> tuple[list[Record], BadDataLog]:
    """Match volumes with report, label and metadata rows; every mismatch goes to ``log``."""
    log = log if log is not None else BadDataLog()
    if not os.path.isdir(root):
        raise DataError(f"data folder {root} does not exist")
    base = dataset_root(root)
    vol_dir = find_volume_dir(base, split)
    if vol_dir is None:
        raise DataError(f"no volume folder for split {split!r} under {base} (expected {split}_fixed/ or {split}/)")
    rep_csv = find_csv(os.path.join(base, "radiology_text_reports"), split)
    if rep_csv is None and require_report:
        raise DataError(f"no reports CSV for split {split!r} in {os.path.join(base, 'radiology_text_reports')}")
    lab_csv = find_csv(os.path.join(base, "multi_abnormality_labels"), split)
    meta_csv = find_csv(os.path.join(base, "metadata"), split)
    if use_metadata is None:
        use_metadata = not os.path.basename(vol_dir).endswith("_fixed")

    volumes: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(vol_dir):
        dirnames.sort()
        for fn in sorted(filenames):
            if fn.startswith(".") or not fn.endswith(VOLUME_EXTS):
                continue
            path = os.path.join(dirpath, fn)
            if fn in volumes:
                log.add(path, f"duplicate volume name (also {volumes[fn]})")
                continue
            volumes[fn] = path

    reports: dict[str, dict[str, str]] = {}
    if rep_csv is not None:
        for row in read_csv(rep_csv, log):
            name = (row.get("VolumeName") or "").strip()
            if not name:
                continue
            if name not in volumes:
                log.add(f"{rep_csv} ({name})", "report row without a volume file")
                continue
            reports[name] = row
    labels: dict[str, dict[str, str]] = {}
    if lab_csv is not None:
        for row in read_csv(lab_csv, log):
            labels[(row.get("VolumeName") or "").strip()] = row
    meta: dict[str, dict[str, str]] = {}
    if meta_csv is not None and use_metadata:
        for row in read_csv(meta_csv, log):
            meta[(row.get("VolumeName") or "").strip()] = row

    records = []
    bad_rows = {p for p, _ in log.entries}
    for name, path in volumes.items():
        if name not in reports and require_report:
            if not any(name in p for p in bad_rows):  # a non-UTF-8 row was already reported
                log.add(path, f"volume without a report row in {os.path.basename(rep_csv or '')}")
            else:
                log.add(path, "its report row is not valid UTF-8")
            continue
        row = reports.get(name, {})
        rec = Record(name, path, _text(row.get("Findings_EN", ""), row.get("Impressions_EN", "")))
        if name in labels:
            lab = labels[name]
            rec.labels = [float(_float(lab.get(k)) or 0.0) for k in CTRATE_LABELS]
            rec.extra = {k: v for k, v in lab.items() if k not in CTRATE_LABELS and k != "VolumeName"}
        if name in meta:
            m = meta[name]
            slope, inter = _float(m.get("RescaleSlope")), _float(m.get("RescaleIntercept"))
            if slope is not None and inter is not None:
                rec.rescale = (slope, inter)
            rec.spacing_override = _spacing_from_meta(m)
        records.append(rec)
    return records, log


class CTRATEDataset(Dataset):
    """Map-style dataset over a CT-RATE-layout directory (works with DataLoader workers).

    ``target_spacing`` (sx, sy, sz) mm and ``target_size`` (X, Y, Z) default to Text2CT's 0.75 x 0.75 x 3 mm
    and 512 x 512 x 128; ``mode`` "crop_pad" or "resize" (see :func:`transforms.preprocess`). ``use_metadata``
    None applies metadata rescale/spacing only for non-"fixed" volume folders.
    """

    def __init__(self, root: str, split: str = "train", target_spacing: Sequence[float] | None = (0.75, 0.75, 3.0),
                 target_size: Sequence[int] | None = (512, 512, 128), mode: str = "crop_pad",
                 window: tuple[float, float] = (-1000.0, 1000.0), strict: bool = False,
                 use_metadata: bool | None = None, require_report: bool = True, verbose: bool = True):
        self.root, self.split = root, split
        self.target_spacing = tuple(float(s) for s in target_spacing) if target_spacing else None
        self.target_size = tuple(int(s) for s in target_size) if target_size else None
        self.mode, self.window, self.strict = mode, tuple(window), strict
        self.log = BadDataLog(strict=strict)
        self.records, _ = build_index(root, split, self.log, use_metadata, require_report)
        if verbose:
            self.log.print_summary()

    def __len__(self) -> int:
        return len(self.records)

    def index_of(self, name: str) -> int:
        """Position of the record called ``name`` (a VolumeName)."""
        if getattr(self, "_pos", None) is None or len(self._pos) != len(self.records):
            self._pos = {r.name: k for k, r in enumerate(self.records)}
        return self._pos[name]

    def load(self, i: int) -> dict[str, Any]:
        """Sample ``i``; raises :class:`BadDataError` when its volume cannot be used."""
        rec = self.records[i]
        data, affine = read_volume(rec.path)
        try:
            vol, sp = preprocess(data, affine, self.target_spacing, self.target_size, self.mode, self.window,
                                 rec.rescale, rec.spacing_override, source=rec.path)
        except (ValueError, RuntimeError) as e:
            raise BadDataError(rec.path, f"cannot preprocess: {e}") from None
        return {"volume": vol, "text": rec.text, "name": rec.name, "spacing": torch.tensor(sp, dtype=torch.float32),
                "labels": torch.tensor(rec.labels, dtype=torch.float32) if rec.labels is not None else None}

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            return self.load(i)
        except BadDataError as e:
            if self.strict:
                raise
            return {"skip": True, "name": self.records[i].name, "path": e.path, "reason": e.reason}

    def check(self, workers: int = 0, progress: bool = True) -> BadDataLog:
        """Read every volume once; drop the bad ones from the index, log them and print the summary."""
        from torch.utils.data import DataLoader
        from tqdm import tqdm

        probe = _Probe(self.records)
        loader = DataLoader(probe, batch_size=None, num_workers=workers)
        bad: set[int] = set()
        for i, reason in tqdm(loader, total=len(probe), desc="checking", disable=not progress):
            if reason:
                bad.add(int(i))
                self.log.add(self.records[int(i)].path, reason)
        self.records = [r for k, r in enumerate(self.records) if k not in bad]
        self._pos = None
        self.log.print_summary()
        return self.log


class _Probe(Dataset):
    def __init__(self, records: list[Record]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, str]:
        try:
            read_volume(self.records[i].path)
        except BadDataError as e:
            return i, e.reason
        return i, ""


_REPORTED: set[str] = set()  # bad files collate has named in this process


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack good samples, drop ``skip`` samples and list them under ``skipped`` as (path, reason).

    With no good sample left, ``volume`` is None (the training loop skips the batch).
    """
    good = [b for b in batch if not b.get("skip")]
    out: dict[str, Any] = {"skipped": [(b["path"], b["reason"]) for b in batch if b.get("skip")]}
    for path, reason in out["skipped"]:
        if path not in _REPORTED:  # once per process: a training run meets a bad file every epoch
            _REPORTED.add(path)
            print(f"skipped {path}: {reason}", file=sys.stderr)
    if not good:
        out.update(volume=None, text=[], name=[], spacing=None, labels=None)
        return out
    out["volume"] = torch.stack([b["volume"] for b in good])
    out["text"] = [b["text"] for b in good]
    out["name"] = [b["name"] for b in good]
    out["spacing"] = torch.stack([b["spacing"] for b in good])
    labs = [b["labels"] for b in good]
    out["labels"] = torch.stack(labs) if all(lb is not None for lb in labs) else None
    return out
