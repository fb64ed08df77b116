"""Whole-model evaluation of the phantom demo model (step 8 of benchmarks/train_phantom_model.sh).

    python benchmarks/phantom_model/evaluate.py --model text2ct_engine/assets/phantom_model \
        --data runs/phantom --n-real 48 --n-gen 24 --out runs/eval.json

Held-out studies are the phantom data set's ``valid`` split (made with its own seed, never trained on).

1. Baseline: the findings detector (``text2ct_engine.evaluate.findings``, validated on 128^3 phantoms at 3 mm)
   reads the *real* held-out phantoms at the model's size and spacing; per finding, agreement of the detected
   labels with the true ones. This is the ceiling the detector allows at this resolution.
2. Generated: one volume per held-out report (seed i for report i), detected the same way, compared with the
   labels the report prompted. ``shuffled`` compares the same detections with the labels of another report
   (rotated by one): the agreement a model that ignores its prompt would reach.
3. VAE round trip: the real held-out phantoms encoded (posterior mean) and decoded by the model's VAE, detected
   the same way: the ceiling the VAE leaves for any diffusion model decoded through it.
4. HU structure: mean HU of the outer air frame (2 voxels in-plane) and of the central body block, real vs
   generated.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import numpy as np
import torch

from text2ct_engine.data.phantom import generate_phantom, volume_names
from text2ct_engine.data.transforms import hu_to_unit
from text2ct_engine.evaluate.agreement import agreement_table, detection_matrix
from text2ct_engine.evaluate.findings import FINDING_KEYS, detect_findings, truth_from_findings
from text2ct_engine.io_utils import write_json
from text2ct_engine.pipeline import Text2CTPipeline
from text2ct_engine.tokenizer import report_text

VALID_SEED_DEFAULT = 1


def hu_structure(v: np.ndarray) -> tuple[float, float]:
    v = np.asarray(v, dtype=np.float32)
    frame = np.ones(v.shape[:2], bool)
    frame[2:-2, 2:-2] = False
    x, y = v.shape[0] // 2, v.shape[1] // 2
    centre = v[x - 8:x + 8, y - 8:y + 8, :]
    return float(v[frame].mean()), float(centre.mean())


@torch.no_grad()
def vae_round_trip(pipe: Text2CTPipeline, hu: np.ndarray) -> np.ndarray:
    """HU volume -> VAE posterior mean -> decoded HU volume (the window of the model)."""
    x = hu_to_unit(torch.as_tensor(hu, dtype=torch.float32), pipe.config.hu_window)[None, None].to(pipe.device)
    mean = pipe.vae.encode(x)[0]
    return pipe.decode_latents(mean * pipe.config.scale_factor, slab=None)[0].numpy()


def agreement(detected: list[dict], truth: list[dict]) -> dict[str, float]:
    return {k: float(np.mean([d[k] == t[k] for d, t in zip(detected, truth)])) for k in FINDING_KEYS}


def rates(detected: list[dict], truth: list[dict]) -> tuple[dict, dict]:
    """Per finding: sensitivity, and false-positive rate (1 - specificity); None where undefined."""
    table = agreement_table(detection_matrix(detected), detection_matrix(truth), FINDING_KEYS)
    sens = {r["label"]: r["sensitivity"] for r in table["rows"]}
    fp = {r["label"]: None if r["specificity"] is None else 1.0 - r["specificity"] for r in table["rows"]}
    return sens, fp


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="phantom folder whose valid split was made with --valid-seed")
    p.add_argument("--valid-seed", type=int, default=VALID_SEED_DEFAULT)
    p.add_argument("--n-real", type=int, default=48)
    p.add_argument("--n-gen", type=int, default=24)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", required=True, help="JSON with every figure")
    a = p.parse_args()
    t0 = time.time()
    pipe = Text2CTPipeline.from_pretrained(a.model, dtype=torch.float32)
    size, spacing = tuple(pipe.config.size), tuple(pipe.config.spacing)
    with open(os.path.join(a.data, "dataset", "radiology_text_reports", "validation_reports.csv"),
              encoding="utf-8") as f:
        texts = {r["VolumeName"]: report_text(r["Findings_EN"], r["Impressions_EN"]) for r in csv.DictReader(f)}
    n = max(a.n_real, a.n_gen)
    prompts, truth, real_det, real_hu, vae_det = [], [], [], [], []
    for i in range(n):
        ph = generate_phantom(a.valid_seed, i, size, spacing)
        prompts.append(texts[volume_names("valid", i)[2]])
        truth.append(truth_from_findings(ph.findings)[0])
        if i < a.n_real:
            real_det.append(detect_findings(ph.hu, spacing).present)
            real_hu.append(hu_structure(ph.hu))
            vae_det.append(detect_findings(vae_round_trip(pipe, ph.hu), spacing).present)
    t_real = time.time() - t0
    gen_det, gen_hu, volumes = [], [], []
    t1 = time.time()
    for s in range(0, a.n_gen, a.batch):
        vols = pipe(prompts[s:min(s + a.batch, a.n_gen)], steps=a.steps, guidance=a.guidance, seed=s)
        volumes += [v.float().cpu().numpy() for v in vols]
    t_sample = time.time() - t1
    for v in volumes:
        gen_det.append(detect_findings(v, spacing).present)
        gen_hu.append(hu_structure(v))
    truth_g = truth[:a.n_gen]
    shuffled = truth_g[1:] + truth_g[:1]
    sens_real, fp_real = rates(real_det, truth[:a.n_real])
    sens_vae, fp_vae = rates(vae_det, truth[:a.n_real])
    sens_gen, fp_gen = rates(gen_det, truth_g)
    res = dict(
        model=a.model, size=list(size), spacing=list(spacing), steps=a.steps or pipe.config.steps,
        guidance=pipe.config.guidance if a.guidance is None else a.guidance, n_real=a.n_real, n_gen=a.n_gen,
        valid_seed=a.valid_seed,
        positives_real={k: int(sum(t[k] for t in truth[:a.n_real])) for k in FINDING_KEYS},
        positives_gen={k: int(sum(t[k] for t in truth_g)) for k in FINDING_KEYS},
        real=agreement(real_det, truth[:a.n_real]), vae=agreement(vae_det, truth[:a.n_real]),
        generated=agreement(gen_det, truth_g),
        shuffled=agreement(gen_det, shuffled),
        sensitivity_real=sens_real, sensitivity_vae=sens_vae, sensitivity_gen=sens_gen, fp_rate_real=fp_real,
        fp_rate_vae=fp_vae, fp_rate_gen=fp_gen,
        detections_gen=[{k: bool(v) for k, v in d.items()} for d in gen_det],
        labels_gen=[{k: bool(v) for k, v in t.items()} for t in truth_g], prompts_gen=prompts[:a.n_gen],
        detected_rate_gen={k: float(np.mean([d[k] for d in gen_det])) for k in FINDING_KEYS},
        hu_air_frame_real=float(np.mean([h[0] for h in real_hu])), hu_centre_real=float(np.mean([h[1] for h in real_hu])),
        hu_air_frame_gen=float(np.mean([h[0] for h in gen_hu])), hu_centre_gen=float(np.mean([h[1] for h in gen_hu])),
        seconds_real=round(t_real, 1), seconds_sampling=round(t_sample, 1), seconds_total=round(time.time() - t0, 1),
    )
    for key in ("real", "vae", "generated", "shuffled"):
        res[f"{key}_mean"] = float(np.mean(list(res[key].values())))
    def pct(x):
        return "   -" if x is None else f"{100 * x:3.0f}%"

    print(f"{'finding':38s} {'pos real':>8s} {'real':>6s} {'sens':>4s} {'fp':>4s} {'vae':>6s} {'sens':>4s} "
          f"{'fp':>4s} {'pos gen':>7s} {'gen':>6s} {'sens':>4s} {'fp':>4s} {'shuffled':>8s}")
    for k in FINDING_KEYS:
        print(f"{k:38s} {res['positives_real'][k]:8d} {100 * res['real'][k]:5.1f}% {pct(res['sensitivity_real'][k])} "
              f"{pct(res['fp_rate_real'][k])} {100 * res['vae'][k]:5.1f}% {pct(res['sensitivity_vae'][k])} "
              f"{pct(res['fp_rate_vae'][k])} {res['positives_gen'][k]:7d} {100 * res['generated'][k]:5.1f}% "
              f"{pct(res['sensitivity_gen'][k])} {pct(res['fp_rate_gen'][k])} {100 * res['shuffled'][k]:7.1f}%")
    print(f"{'mean':38s} {'':8s} {100 * res['real_mean']:5.1f}% {'':9s} {100 * res['vae_mean']:5.1f}% {'':9s} "
          f"{'':7s} {100 * res['generated_mean']:5.1f}% {'':9s} {100 * res['shuffled_mean']:7.1f}%")
    print(f"HU air frame real {res['hu_air_frame_real']:.0f} gen {res['hu_air_frame_gen']:.0f}; centre real "
          f"{res['hu_centre_real']:.0f} gen {res['hu_centre_gen']:.0f}; sampling {t_sample:.0f} s, total "
          f"{res['seconds_total']:.0f} s")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    write_json(a.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
