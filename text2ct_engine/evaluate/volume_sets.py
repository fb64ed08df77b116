"""The sets an evaluation compares: a CT-RATE-layout folder, or a folder of NIfTIs with a prompt manifest.

CT-RATE layout (CT-RATE itself, or ``python -m text2ct_engine.data.phantom``): volumes, reports and labels
as :mod:`text2ct_engine.data.ctrate` reads them; split ``auto`` takes ``valid`` where there is one.

A folder of NIfTIs (``python -m text2ct_engine.sample`` writes ``ct_000.nii.gz``, ``ct_001.nii.gz``, ...
and no prompt beside them): the ``*.nii.gz`` / ``*.nii`` files directly in the folder, in name order
(numbers in names compared as numbers: ``ct_999`` before ``ct_1000``), and their prompts from
``--prompts FILE``, else ``prompts.csv`` or ``prompts.txt`` in the folder:

- ``.txt``: one prompt per line (blank lines skipped), line i for the i-th volume in name order: the very
  file given to ``sample --prompt-file``;
- ``.csv``: columns ``file`` (volume file name in the folder) and ``prompt``, optionally CT-RATE's 18 label
  columns (all of them) with the prompt's labels.

A volume without labels takes those of the real study whose report text equals its prompt (whitespace
folded), so volumes generated from the real set's reports need no labels of their own.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.ctrate import VOLUME_EXTS, build_index, dataset_root, find_csv, find_volume_dir, read_csv
from ..data.errors import BadDataLog, DataError
from ..data.labels import CTRATE_LABELS
from ..io_utils import read_text_lines
from ..data.nifti import read_volume
from ..data.transforms import reorient_to_ras, warn_if_not_ct

PROMPT_FILES = ("prompts.csv", "prompts.txt")
LAYOUT_HINT = ("a CT-RATE-layout folder (dataset/{train,valid}_fixed/... with reports; python -m "
               "text2ct_engine.data.phantom writes one) or a folder of .nii.gz volumes (python -m "
               "text2ct_engine.sample writes them)")


@dataclass
class Study:
    """One volume of a set, with its report text and labels where known."""

    name: str
    path: str
    text: str | None = None
    labels: list[float] | None = None  # 18 values in CT-RATE's column order
    rescale: tuple[float, float] | None = None
    spacing_override: tuple[float, float, float] | None = None


@dataclass
class VolumeSet:
    """The studies of one ``--generated`` / ``--real`` folder and what was skipped while indexing it."""

    flag: str
    root: str
    layout: str  # "ct-rate" or "folder"
    split: str | None
    studies: list[Study]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def describe(self) -> dict:
        return {"path": self.root, "layout": self.layout, "split": self.split, "volumes": len(self.studies),
                "with_text": sum(s.text is not None for s in self.studies),
                "with_labels": sum(s.labels is not None for s in self.studies),
                "skipped": [f"{p}: {r}" for p, r in self.skipped]}


def _fold(text: str) -> str:
    return " ".join(text.split())


def open_set(path: str, flag: str, split: str = "auto", prompts: str | None = None) -> VolumeSet:
    """Index the folder given as ``flag`` (``--generated`` / ``--real``); bad input is a one-line ValueError."""
    if not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is not a directory: give {LAYOUT_HINT}")
    base = dataset_root(path)
    if find_volume_dir(base, "train") or find_volume_dir(base, "valid"):
        if prompts is not None:
            raise ValueError(f"--prompts is for a folder of NIfTIs; {flag} {path} is in CT-RATE's layout and "
                             f"carries its reports")
        vs = _open_ctrate(path, base, flag, split)
    else:
        vs = _open_folder(path, flag, prompts)
    if not vs.studies:
        raise ValueError(f"{flag} {path} holds no usable volume"
                         + (f" ({len(vs.skipped)} skipped, first: {vs.skipped[0][0]}: {vs.skipped[0][1]})"
                            if vs.skipped else f": give {LAYOUT_HINT}"))
    return vs


def _open_ctrate(path: str, base: str, flag: str, split: str) -> VolumeSet:
    if split == "auto":
        split = "valid" if find_volume_dir(base, "valid") else "train"
    has_reports = find_csv(os.path.join(base, "radiology_text_reports"), split) is not None
    log = BadDataLog()
    try:
        records, _ = build_index(path, split, log, require_report=has_reports)
    except DataError as err:
        raise ValueError(f"{flag} {path}: {err}") from None
    studies = [Study(r.name, r.path, r.text if has_reports else None, r.labels, r.rescale, r.spacing_override)
               for r in records]
    return VolumeSet(flag, path, "ct-rate", split, studies, list(log.entries))


def name_order(name: str) -> list:
    """Sort key: runs of digits compare as numbers (``ct_999`` before ``ct_1000``), the rest as text."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def _open_folder(path: str, flag: str, prompts: str | None) -> VolumeSet:
    files = sorted((n for n in os.listdir(path) if n.endswith(VOLUME_EXTS) and not n.startswith(".")
                    and os.path.isfile(os.path.join(path, n))), key=name_order)
    if not files:
        raise ValueError(f"{flag} {path} holds no .nii.gz/.nii volume: give {LAYOUT_HINT}")
    studies = [Study(n, os.path.join(path, n)) for n in files]
    skipped: list[tuple[str, str]] = []
    if prompts is None:
        prompts = next((os.path.join(path, n) for n in PROMPT_FILES if os.path.isfile(os.path.join(path, n))), None)
    if prompts is not None:
        if not os.path.isfile(prompts):
            raise ValueError(f"--prompts {prompts}: no such file")
        if prompts.endswith(".csv"):
            skipped = _read_prompt_csv(prompts, studies)
        else:
            _read_prompt_lines(prompts, studies)
    return VolumeSet(flag, path, "folder", None, studies, skipped)


def _read_prompt_lines(path: str, studies: list[Study]) -> None:
    lines = read_text_lines(path, "prompt file")
    if len(lines) != len(studies):
        raise ValueError(f"prompt file {path} has {len(lines)} prompts for {len(studies)} volumes: one line per "
                         f"volume, in the volumes' name order")
    for study, text in zip(studies, lines):
        study.text = text


def _read_prompt_csv(path: str, studies: list[Study]) -> list[tuple[str, str]]:
    log = BadDataLog()
    try:
        rows = read_csv(path, log)
    except DataError as err:
        raise ValueError(str(err)) from None
    columns = set(rows[0]) if rows else set()
    if rows and not {"file", "prompt"} <= columns:
        raise ValueError(f"prompt manifest {path} needs the columns file and prompt (has {sorted(columns)})")
    label_cols = [c for c in CTRATE_LABELS if c in columns]
    if label_cols and len(label_cols) != len(CTRATE_LABELS):
        missing = [c for c in CTRATE_LABELS if c not in columns]
        raise ValueError(f"prompt manifest {path} has some CT-RATE label columns but not {missing}: give all 18 "
                         f"or none")
    by_name = {s.name: s for s in studies}
    for i, row in enumerate(rows, start=2):
        study = by_name.get(row["file"].strip())
        if study is None:
            log.add(f"{path} line {i}", f"no volume {row['file']!r} in the folder")
            continue
        study.text = row["prompt"]
        if label_cols:
            try:
                study.labels = [float(row[c]) for c in CTRATE_LABELS]
            except ValueError:
                raise ValueError(f"prompt manifest {path} line {i}: labels must be numbers (0 or 1)") from None
    return list(log.entries)


def attach_labels_by_text(target: VolumeSet, source: VolumeSet) -> int:
    """Give ``target``'s unlabelled studies the labels of the ``source`` study with the same report text;
    returns how many got labels."""
    known = {_fold(s.text): s.labels for s in source.studies if s.text is not None and s.labels is not None}
    n = 0
    for s in target.studies:
        if s.labels is None and s.text is not None and _fold(s.text) in known:
            s.labels = list(known[_fold(s.text)])
            n += 1
    return n


def read_hu(study: Study) -> tuple[torch.Tensor, tuple[float, float, float]]:
    """The study's volume in HU, array axes in RAS+ order (X, Y, Z), and its spacing (mm).

    Raises :class:`~text2ct_engine.data.errors.BadDataError` for an unreadable file.
    """
    data, affine = read_volume(study.path)
    vol = torch.from_numpy(np.ascontiguousarray(data))
    if study.rescale is not None:
        vol = vol * float(study.rescale[0]) + float(study.rescale[1])
    warn_if_not_ct(vol, study.path)
    return reorient_to_ras(vol, affine, study.spacing_override)
