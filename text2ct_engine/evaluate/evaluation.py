"""Score a set of generated CT volumes against real ones, as the paper does, with networks this project owns.

Metrics (``METRICS``):

- ``fid``: Fréchet distance between Gaussian fits of the CLIP3D volume tower's pooled features of the
  generated and the real volumes (the paper's 3D FID, with our CLIP as the feature network);
- ``hist``: Wasserstein-1 distance (HU) between the sets' HU distributions over the body (no network);
- ``findings``: per-finding sensitivity / specificity / balanced accuracy of the finding detector on the
  generated volumes against their prompts' labels, and on the real volumes against their own labels (the
  ceiling the detector reaches on real data);
- ``clip``: CLIP score (prompt-volume cosine) and text -> volume recall@1/@5 over the set, generated and real.

Without ``metrics`` every metric the inputs allow is computed (``fid`` and ``clip`` need a CLIP3D,
``findings`` labels for the prompts, ``clip`` prompts) and the others are listed with the reason; a metric
asked for that cannot be computed is a one-line ``ValueError`` before any volume is read.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import numpy as np
import torch

from ..train.clip import clip_dir_of, read_preprocessing
from ..train.common import TruncationNote
from .agreement import findings_agreement
from .alignment import alignment_scores, load_clip, text_embeddings, volume_features, volume_input
from .frechet import MIN_SAMPLES, feature_frechet
from .intensity import histogram_distance
from .measure import Measurement, Needs, measure_studies
from .volume_sets import Study, VolumeSet, attach_labels_by_text, open_set

METRICS = ("fid", "hist", "findings", "clip")


@dataclass
class EvalOptions:
    metrics: Sequence[str] | None = None  # None: every metric the inputs allow
    clip: str | None = None  # CLIP3D directory (train clip's OUT/model or its clip/)
    tokenizer: str | None = None  # default: the one in or beside the CLIP3D directory
    clip_spacing: Sequence[float] | None = None  # as train clip's --spacing (default: as recorded in --clip)
    clip_resize: str | None = None  # as train clip's --resize (default: as recorded in --clip, else resize)
    split: str = "auto"  # CT-RATE layout: auto (valid if present, else train), train or valid
    prompts: str | None = None  # prompt file for a --generated folder of NIfTIs
    workers: int = 0
    device: str = "auto"
    batch_size: int = 16


def parse_metrics(text: str | None) -> tuple[str, ...] | None:
    """``"fid,hist"`` -> ("fid", "hist"); None or "all" -> None (every metric the inputs allow)."""
    if text is None or text.strip() in ("", "all"):
        return None
    names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(f"--metrics {text}: unknown metric(s) {unknown}; choose from {','.join(METRICS)}")
    return names


def check_counts(n_generated: int, n_real: int) -> None:
    """The Fréchet distance needs MIN_SAMPLES volumes per set."""
    if min(n_generated, n_real) < MIN_SAMPLES:
        raise ValueError(f"the Fréchet distance needs at least {MIN_SAMPLES} volumes in each set (a covariance "
                         f"needs two feature vectors; hundreds give a far less biased value), got {n_generated} "
                         f"generated and {n_real} real: add volumes, or leave fid out (--metrics hist,findings,clip)")


def plan(opts: EvalOptions, gen: VolumeSet, real: VolumeSet) -> tuple[list[str], dict[str, str]]:
    """The metrics to compute and, for the others, why not; an asked-for metric that cannot be is an error."""
    reasons: dict[str, str] = {}
    if opts.clip is None:
        reasons["fid"] = reasons["clip"] = "needs --clip (a CLIP3D from python -m text2ct_engine.train clip)"
    if not any(s.text for s in gen.studies):
        reasons.setdefault("clip", f"the --generated volumes have no prompts (give --prompts FILE, or prompts.csv/"
                                   f"prompts.txt in {gen.root})")
    if not any(s.labels is not None for s in gen.studies):
        reasons["findings"] = ("no labels for the --generated volumes' prompts: generate from the --real set's "
                               "reports (labels are matched by report text) or give a prompts.csv with CT-RATE's "
                               "18 label columns")
    if opts.metrics is None:
        chosen = [m for m in METRICS if m not in reasons]
    else:
        for m in opts.metrics:
            if m in reasons:
                raise ValueError(f"--metrics {m} cannot be computed: {reasons[m]}")
        chosen = list(opts.metrics)
    if "fid" in chosen:
        check_counts(len(gen.studies), len(real.studies))
    # metrics left out by --metrics are the user's choice, not something to explain
    return chosen, {m: r for m, r in reasons.items() if m not in chosen} if opts.metrics is None else {}


def _device(name: str) -> torch.device:
    from ..pipeline import available_device

    return available_device(name)


def _measure_sets(sets: Sequence[VolumeSet], needs: Needs, features, workers: int,
                  show: bool) -> list[list[Measurement]]:
    from tqdm import tqdm

    cache: dict[str, Measurement] = {}
    out = []
    for vs in sets:
        with tqdm(total=len(vs.studies), desc=f"measuring {vs.flag[2:]}", unit="vol", disable=not show,
                  file=sys.stderr) as bar:
            out.append(measure_studies(vs.studies, needs, features, workers, cache, bar.update))
    return out


def _readable(vs: VolumeSet, measured: list[Measurement]) -> list[tuple[Study, Measurement]]:
    pairs = [(s, m) for s, m in zip(vs.studies, measured) if m.error is None]
    vs.skipped += [(s.path, m.error) for s, m in zip(vs.studies, measured) if m.error is not None]
    if not pairs:
        raise ValueError(f"{vs.flag} {vs.root}: no volume could be read ({vs.skipped[-1][0]}: {vs.skipped[-1][1]})")
    return pairs


def _findings(pairs: list[tuple[Study, Measurement]], hu_max: float) -> dict | None:
    labelled = [(s, m) for s, m in pairs if s.labels is not None]
    if not labelled:
        return None
    table = findings_agreement([m.detected for _, m in labelled], [s.labels for s, _ in labelled],
                               hu_max, max(max(m.spacing) for _, m in labelled))
    table["unlabelled"] = len(pairs) - len(labelled)
    return table


def _alignment(model, tokenizer, pairs, batch_size: int, note: TruncationNote
               ) -> tuple[dict | None, dict[str, float]]:
    texted = [(s, m) for s, m in pairs if s.text]
    if not texted:
        return None, {}
    t = text_embeddings(model, tokenizer, [s.text for s, _ in texted], batch_size, note=note)
    v = np.stack([m.embedding for _, m in texted])
    scores = alignment_scores(t, v)
    scores["without_prompt"] = len(pairs) - len(texted)
    return scores, {s.name: float(np.dot(a, b)) for (s, _), a, b in zip(texted, t, v)}


def _volume_rows(pairs, cosines: dict[str, float]) -> list[dict]:
    return [{"name": s.name, "labels": s.labels, "detected": m.detected, "hu_max": m.hu_max,
             "clip_cosine": cosines.get(s.name)} for s, m in pairs]


def evaluate(generated: str, real: str, opts: EvalOptions | None = None, log: Callable[[str], None] = print,
             progress: bool = True) -> dict:
    """Every chosen metric of the ``generated`` folder against the ``real`` one, as a JSON-ready dict."""
    opts = opts or EvalOptions()
    start = time.perf_counter()
    gen = open_set(generated, "--generated", opts.split, opts.prompts)
    ref = open_set(real, "--real", opts.split)
    matched = attach_labels_by_text(gen, ref)
    metrics, skipped = plan(opts, gen, ref)
    needs = Needs(histogram="hist" in metrics, findings="findings" in metrics)
    model = tokenizer = features = None
    if "fid" in metrics or "clip" in metrics:
        model, tokenizer = load_clip(opts.clip, opts.tokenizer, _device(opts.device))
        needs.clip_input = volume_input(model, opts.clip_spacing, opts.clip_resize,
                                        read_preprocessing(clip_dir_of(opts.clip)))
        features = partial(volume_features, model)
    measured = _measure_sets((gen, ref), needs, features, opts.workers, progress)
    g, r = _readable(gen, measured[0]), _readable(ref, measured[1])
    results: dict = {}
    cosines: list[dict[str, float]] = [{}, {}]
    if "fid" in metrics:
        check_counts(len(g), len(r))
        results["fid"] = {"features": f"CLIP3D volume tower, pooled ({model.config.vision_config.pool}) before "
                                      f"the projection",
                          **feature_frechet(np.stack([m.features for _, m in g]), np.stack([m.features for _, m in r]))}
    if "hist" in metrics:
        hg = [m.histogram for _, m in g if m.histogram is not None]
        hr = [m.histogram for _, m in r if m.histogram is not None]
        if not hg or not hr:
            raise ValueError("no body found in the " + ("--generated" if not hg else "--real") + " volumes (every "
                             "voxel is air connected to the border): are they CT volumes in HU?")
        results["hist"] = histogram_distance(hg, hr)
    if "findings" in metrics:
        # one label set for both tables: metal is left out of both if either set cannot show it
        hu_max = min(max(m.hu_max for _, m in pairs) for pairs in (g, r))
        results["findings"] = {"generated": _findings(g, hu_max), "real": _findings(r, hu_max)}
    if "clip" in metrics:
        note = TruncationNote(log)  # one truncation note for both sets
        gen_scores, cosines[0] = _alignment(model, tokenizer, g, opts.batch_size, note)
        real_scores, cosines[1] = _alignment(model, tokenizer, r, opts.batch_size, note)
        results["clip"] = {"generated": gen_scores, "real": real_scores}
    return {"generated": gen.describe(), "real": ref.describe(), "labels_matched_by_text": matched,
            "clip": opts.clip, "metrics": results, "skipped_metrics": skipped,
            "volumes": {"generated": _volume_rows(g, cosines[0]), "real": _volume_rows(r, cosines[1])},
            "seconds": round(time.perf_counter() - start, 2)}
