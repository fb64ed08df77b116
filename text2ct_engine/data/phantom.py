"""Procedural chest-CT phantoms with known findings, CT-RATE-style reports and labels; a data-set CLI.

Python::

    from text2ct_engine.data.phantom import generate_phantom
    ph = generate_phantom(seed=0, index=3, size=(128, 128, 128))      # 3 mm voxels over a 384 mm FOV
    ph.hu            # int16 HU, array axes (x, y, z) = (patient left->right, posterior->anterior, inferior->superior)
    ph.affine        # RAS+ voxel-to-mm: diag(spacing) with the volume centre at (0, 0, 0)
    ph.findings, ph.labels, ph.report.text

CLI (CT-RATE layout under OUT/dataset/)::

    python -m text2ct_engine.data.phantom --n 200 --size 128 128 128 --out data/phantom --seed 0 --workers 4

writes ``{split}_fixed/<patient>/<study>/<volume>.nii.gz``, ``radiology_text_reports/{train|validation}_reports.csv``,
``multi_abnormality_labels/{split}_predicted_labels.csv`` (18 CT-RATE columns + side/lobe/size fields) and
``metadata/{train|validation}_metadata.csv``. Sample ``i`` depends only on ``(seed, i)``, never on ``--workers``.
"""
from __future__ import annotations

import argparse
import csv
import io
import multiprocessing as mp
import os
import signal
import sys
from dataclasses import dataclass

import numpy as np

from ..cli import Parser as CLIParser, path as cli_path, run_guarded
from ..io_utils import atomic_dir, atomic_path
from .labels import CTRATE_LABELS, REPORT_COLUMNS
from .phantom_anatomy import Anatomy
from .phantom_findings import Findings, anatomy_kwargs, emphysema_mask, place_findings, render_findings, sample_findings
from .phantom_geometry import Canvas, Grid, binomial_blur
from .reports import Report, make_report

DEFAULT_FOV_MM = 384.0
EXTRA_COLUMNS = tuple(Findings().extra_fields().keys())
MARKER = ".text2ct_phantom"


@dataclass
class Phantom:
    """One generated study."""

    hu: np.ndarray             # int16 (X, Y, Z), RAS+ array axes
    spacing: tuple[float, float, float]
    affine: np.ndarray         # 4x4 voxel -> world (mm)
    findings: Findings
    report: Report
    tissue: np.ndarray | None = None  # uint8 tissue codes (only with keep_tissue=True)
    anatomy: Anatomy | None = None

    @property
    def labels(self) -> dict[str, int]:
        return self.findings.ctrate_labels()


def default_spacing(size: tuple[int, int, int]) -> tuple[float, float, float]:
    """Spacing that makes the field of view DEFAULT_FOV_MM (384 mm, CT-RATE's 512 x 0.75 mm) on every axis."""
    return tuple(DEFAULT_FOV_MM / n for n in size)  # type: ignore[return-value]


def generate_phantom(seed: int, index: int = 0, size: tuple[int, int, int] = (128, 128, 128),
                     spacing: tuple[float, float, float] | None = None, findings: Findings | None = None,
                     keep_tissue: bool = False, noise: bool = True) -> Phantom:
    """Make study ``index`` of data set ``seed`` on a ``size`` grid of ``spacing`` mm.

    The anatomy and the findings depend only on ``(seed, index)`` (and ``findings`` when given), not on the
    grid, so the same study can be rendered at several resolutions. Pass ``findings`` to choose them; a
    finding that cannot be placed is dropped from the returned ``findings`` (and from labels and report).
    """
    if seed < 0 or index < 0:
        raise ValueError("seed and index must be >= 0")
    size = tuple(int(n) for n in size)  # type: ignore[assignment]
    spacing = tuple(float(s) for s in (spacing or default_spacing(size)))  # type: ignore[assignment]
    r_find, r_anat, r_place, r_noise, r_text = (np.random.default_rng(c)
                                                for c in np.random.SeedSequence([seed, index]).spawn(5))
    f = sample_findings(r_find) if findings is None else findings
    an = Anatomy(r_anat, **anatomy_kwargs(f, r_find))
    placed = place_findings(an, f, r_place)
    grid = Grid(size, spacing)  # type: ignore[arg-type]
    canvas = Canvas(grid)
    emph = emphysema_mask(an, placed.emphysema_field) if placed.emphysema_field is not None else None
    an.render(canvas, emphysema=emph)
    render_findings(canvas, an, placed, r_place)
    vol = canvas.hu
    if noise:
        sigma = r_noise.uniform(6.0, 16.0)
        n = r_noise.standard_normal(grid.shape, dtype=np.float32)
        n = binomial_blur(n, (0, 1)) / np.float32(0.6124)  # mildly correlated in-plane, unit std again
        vol = vol + np.float32(sigma) * n
    hu = np.clip(np.rint(vol), -1024, 3071).astype(np.int16)
    report = make_report(placed.findings, r_text)
    return Phantom(hu, spacing, grid.affine(), placed.findings, report,  # type: ignore[arg-type]
                   canvas.tissue if keep_tissue else None, an if keep_tissue else None)


# ------------------------------------------------------------------------------------------- data set
def volume_names(split: str, index: int) -> tuple[str, str, str]:
    """CT-RATE names of study ``index``: (patient dir, study dir, volume file)."""
    patient = f"{split}_{index + 1}"
    return patient, f"{patient}_a", f"{patient}_a_1.nii.gz"


def _csv_names(split: str) -> tuple[str, str, str]:
    long = "train" if split == "train" else "validation"
    return f"{long}_reports.csv", f"{split}_predicted_labels.csv", f"{long}_metadata.csv"


@dataclass(frozen=True)
class _Job:
    seed: int
    index: int
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    vol_dir: str  # the split's volume folder (being written)
    split: str


def _make_one(job: _Job) -> dict:
    from .nifti import write_volume

    ph = generate_phantom(job.seed, job.index, job.size, job.spacing)
    patient, study, name = volume_names(job.split, job.index)
    write_volume(os.path.join(job.vol_dir, patient, study, name), ph.hu, ph.affine)
    rep = ph.report
    return {
        "index": job.index,
        "report": {"VolumeName": name, "ClinicalInformation_EN": rep.clinical_information,
                   "Technique_EN": rep.technique, "Findings_EN": rep.findings, "Impressions_EN": rep.impression},
        "labels": {"VolumeName": name, **ph.labels, **ph.findings.extra_fields()},
        "meta": {"VolumeName": name, "Manufacturer": "text2ct_engine phantom", "Rows": job.size[1],
                 "Columns": job.size[0], "NumberofSlices": job.size[2],
                 "XYSpacing": f"[{job.spacing[0]:.6g}, {job.spacing[1]:.6g}]", "ZSpacing": f"{job.spacing[2]:.6g}",
                 "RescaleSlope": 1, "RescaleIntercept": 0},
    }


def _init_worker() -> None:
    """A pool worker: one torch thread, and Ctrl-C left to the parent (which ends the pool), so an interrupt
    prints one line instead of a traceback per worker."""
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def write_csv(path: str, rows: list[dict], columns: tuple[str, ...] | list[str]) -> None:
    """Write ``rows`` as a UTF-8 CSV atomically."""
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    wr.writeheader()
    wr.writerows(rows)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(buf.getvalue())


def make_dataset(out: str, n: int, size: tuple[int, int, int], spacing: tuple[float, float, float] | None = None,
                 seed: int = 0, workers: int = 1, split: str = "train", force: bool = False,
                 progress: bool = True) -> str:
    """Write ``n`` phantom studies in CT-RATE's layout under ``out/dataset``; returns that directory.

    The volumes are written into a staging folder and swapped in at the end (:func:`io_utils.atomic_dir`,
    which also recovers a swap cut short), the split's CSVs rewritten after them: an interrupted run leaves
    the previous data set as it was, never new volumes with old CSVs.
    """
    spacing = spacing or default_spacing(size)
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise FileExistsError(f"output directory {out} is not empty (use --force to write into it)")
    root = os.path.join(out, "dataset")
    vol_dir = os.path.join(root, f"{split}_fixed")
    if os.path.isdir(vol_dir) and not os.path.exists(os.path.join(root, MARKER)):
        raise FileExistsError(f"{vol_dir} was not written by this tool: not replacing it; choose another --out")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, MARKER), "w") as fh:
        fh.write("written by text2ct_engine.data.phantom\n")
    rep_csv, lab_csv, meta_csv = (os.path.join(root, folder, name) for folder, name in
                                  zip(("radiology_text_reports", "multi_abnormality_labels", "metadata"),
                                      _csv_names(split)))
    with atomic_dir(vol_dir) as staging:  # swapped in (old folder deleted) when the block ends without error
        results = _make_all(staging, n, size, spacing, seed, workers, split, progress)
        for path in (rep_csv, lab_csv, meta_csv):  # the old CSVs go just before the new volumes come in,
            if os.path.exists(path):  # the new CSVs after them: volumes never meet another run's reports
                os.remove(path)
    write_csv(rep_csv, [r["report"] for r in results], REPORT_COLUMNS)
    write_csv(lab_csv, [r["labels"] for r in results], ("VolumeName", *CTRATE_LABELS, *EXTRA_COLUMNS))
    write_csv(meta_csv, [r["meta"] for r in results], list(results[0]["meta"]))
    return root


def _make_all(vol_dir: str, n: int, size: tuple[int, int, int], spacing: tuple[float, float, float], seed: int,
              workers: int, split: str, progress: bool) -> list[dict]:
    """Write the ``n`` volumes under ``vol_dir``; their CSV rows, in index order."""
    from tqdm import tqdm

    jobs = [_Job(seed, i, tuple(size), tuple(spacing), vol_dir, split) for i in range(n)]  # type: ignore[arg-type]
    results: list[dict] = []
    with tqdm(total=n, desc="phantoms", unit="vol", disable=not progress) as bar:  # closed on Ctrl-C too
        if workers <= 1:
            for j in jobs:
                results.append(_make_one(j))
                bar.update()
        else:
            ctx = mp.get_context("spawn" if sys.platform == "darwin" else "fork")
            with ctx.Pool(workers, initializer=_init_worker) as pool:
                for r in pool.imap_unordered(_make_one, jobs):
                    results.append(r)
                    bar.update()
    return sorted(results, key=lambda r: r["index"])


# ------------------------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    p = CLIParser(prog="python -m text2ct_engine.data.phantom",
                description="Write a phantom chest-CT data set in CT-RATE's layout.")
    p.add_argument("--n", type=int, required=True, help="number of studies")
    p.add_argument("--size", type=int, nargs=3, default=(128, 128, 128), metavar=("X", "Y", "Z"))
    p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("SX", "SY", "SZ"),
                   help=f"voxel size in mm (default: {DEFAULT_FOV_MM:g} mm field of view / size)")
    p.add_argument("--out", type=cli_path, required=True, help="output directory (volumes go to OUT/dataset/...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--split", choices=("train", "valid"), default="train")
    p.add_argument("--force", action="store_true", help="write into a non-empty output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    if a.n < 1:
        p.error("--n must be >= 1")
    if any(s < 8 or s > 2048 for s in a.size):
        p.error("--size values must be between 8 and 2048")
    if a.spacing is not None and any(not (0.05 <= s <= 50) for s in a.spacing):
        p.error("--spacing values must be between 0.05 and 50 mm")
    if a.workers < 1:
        p.error("--workers must be >= 1")
    if a.seed < 0:
        p.error("--seed must be >= 0")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        p.error(f"--out {a.out} exists and is not a directory")
    if os.path.isdir(a.out) and os.listdir(a.out) and not a.force:
        p.error(f"output directory {a.out} is not empty (use --force to write into it)")

    def job() -> None:
        root = make_dataset(a.out, a.n, tuple(a.size), tuple(a.spacing) if a.spacing else None, a.seed, a.workers,
                            a.split, a.force, progress=not a.quiet)
        print(f"wrote {a.n} studies to {root}")
    return run_guarded(job, interrupted=f"the {a.split} split was not swapped in (a previous one is as it was); "
                                        f"rerun the command with --force to write it")


if __name__ == "__main__":
    sys.exit(main())
