"""Procedural phantom: volumes, determinism, findings, reports, labels and the data-set CLI."""
import csv
import os
from dataclasses import replace
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from text2ct_engine.data.labels import CTRATE_LABELS
from text2ct_engine.data.phantom import generate_phantom, main, make_dataset
from text2ct_engine.data.phantom_anatomy import LUNG_L, LUNG_R
from text2ct_engine.data.phantom_findings import (ATELECTASIS, CALCIFICATION, CONSOLIDATION, EFFUSION, METAL, NODULE,
                                                  Findings, sample_findings)
from text2ct_engine.data.reports import FINDING_TERMS, make_report, mentions, negated, sentences

SMALL = (64, 64, 32)
ALL = Findings(pleural_effusion_side="right", pleural_effusion_size="large", lung_nodule_side="left",
               lung_nodule_lobe="upper", lung_nodule_size_mm=20, consolidation_side="left", consolidation_lobe="lower",
               atelectasis_side="right", atelectasis_lobe="middle", emphysema=True, cardiomegaly=True,
               pericardial_effusion=True, arterial_wall_calcification=True, coronary_artery_wall_calcification=True,
               hiatal_hernia=True, lymphadenopathy_stations="subcarinal", medical_material="pacemaker")


def test_volume_layout_and_hu():
    ph = generate_phantom(seed=0, index=0, size=SMALL)
    assert ph.hu.dtype == np.int16 and ph.hu.shape == SMALL
    sx, sy, sz = ph.spacing
    assert np.allclose(np.diag(ph.affine)[:3], ph.spacing) and np.allclose(ph.affine[:3, 3], -(np.array(SMALL) - 1) / 2 * ph.spacing)
    assert ph.hu.min() >= -1024 and ph.hu.max() <= 3071
    # air around the body, soft tissue and bone inside
    assert np.median(ph.hu[0, 0, :]) < -900
    assert (ph.hu > 150).sum() > 20 and ((ph.hu > 0) & (ph.hu < 80)).sum() > 1000


def test_lungs_are_on_the_right_side_of_the_array():
    ph = generate_phantom(seed=3, index=1, size=SMALL, findings=Findings(), keep_tissue=True)
    x = np.arange(SMALL[0])[:, None, None]
    # RAS+: array index 0 increases toward the patient's right, so the right lung has the larger x
    assert (x * (ph.tissue == LUNG_R)).sum() / (ph.tissue == LUNG_R).sum() > (x * (ph.tissue == LUNG_L)).sum() / (ph.tissue == LUNG_L).sum()


def test_deterministic_per_seed_and_index():
    a = generate_phantom(seed=5, index=2, size=SMALL)
    b = generate_phantom(seed=5, index=2, size=SMALL)
    c = generate_phantom(seed=5, index=3, size=SMALL)
    assert np.array_equal(a.hu, b.hu) and a.report == b.report and a.findings == b.findings
    assert not np.array_equal(a.hu, c.hu)


def test_anatomy_and_findings_do_not_depend_on_the_grid():
    a = generate_phantom(seed=7, index=4, size=(48, 48, 24))
    b = generate_phantom(seed=7, index=4, size=(64, 64, 32))
    assert a.findings == b.findings and a.report == b.report


def test_every_requested_finding_is_painted():
    ph = generate_phantom(seed=1, index=0, size=(96, 96, 96), findings=ALL, keep_tissue=True)
    # all placed (a crowded lymph-node station may move to another station)
    assert replace(ph.findings, lymphadenopathy_size_mm=0.0, lymphadenopathy_stations="subcarinal") == ALL
    assert ph.findings.lymphadenopathy_stations and ph.findings.lymphadenopathy_size_mm >= 14
    for code in (EFFUSION, NODULE, CONSOLIDATION, ATELECTASIS, CALCIFICATION, METAL):
        assert (ph.tissue == code).any(), code
    # the nodule and the effusion are on their labelled sides
    x = np.broadcast_to((np.arange(96) - 47.5)[:, None, None], ph.tissue.shape)
    assert x[ph.tissue == NODULE].mean() < 0          # left = -x
    assert x[ph.tissue == EFFUSION].mean() > 0        # right = +x
    assert ph.labels["Lung nodule"] == 1 and ph.labels["Lung opacity"] == 0


def test_labels_have_ctrate_columns_and_round_trip():
    f = ALL
    lab = f.ctrate_labels()
    assert list(lab) == list(CTRATE_LABELS) and sum(lab.values()) == 12
    row = {k: str(v) for k, v in {**lab, **f.extra_fields()}.items()}
    assert Findings.from_row(row) == f
    assert Findings().is_normal()


@pytest.mark.parametrize("seed", range(3))
def test_reports_mention_present_findings_with_side_and_negate_absent(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        f = sample_findings(rng)
        rep = make_report(f, rng)
        sents = sentences(rep.findings) + sentences(rep.impression)
        truth = {"pleural_effusion": f.pleural_effusion_side, "lung_nodule": f.lung_nodule_side,
                 "consolidation": f.consolidation_side, "atelectasis": f.atelectasis_side,
                 "emphysema": f.emphysema, "cardiomegaly": f.cardiomegaly, "pericardial_effusion": f.pericardial_effusion,
                 "arterial_wall_calcification": f.arterial_wall_calcification,
                 "coronary_artery_wall_calcification": f.coronary_artery_wall_calcification,
                 "hiatal_hernia": f.hiatal_hernia, "lymphadenopathy": f.lymphadenopathy_stations,
                 "medical_material": f.medical_material}
        for key, val in truth.items():
            hits = [s for s in sents if mentions(s, key)]
            if val:
                pos = [s for s in hits if not negated(s)]
                assert pos, (key, rep.text)
                if isinstance(val, str) and val in ("left", "right", "bilateral"):
                    words = ("bilateral", "both") if val == "bilateral" else (val,)
                    assert any(any(w in s.lower() for w in words) for s in pos), (key, val, rep.text)
            else:
                assert all(negated(s) for s in hits), (key, hits)
        if f.is_normal():
            assert "no" in rep.impression.lower() or "normal" in rep.impression.lower()
        assert rep.text.startswith("Findings: ") and " Impression: " in rep.text
    assert set(FINDING_TERMS) == set(truth)


def test_reports_vary():
    f = Findings(pleural_effusion_side="left", pleural_effusion_size="small")
    texts = {make_report(f, np.random.default_rng(s)).findings for s in range(12)}
    assert len(texts) > 6


def _read_dataset(root):
    base = os.path.join(root, "dataset")
    with open(os.path.join(base, "radiology_text_reports", "train_reports.csv"), encoding="utf-8") as fh:
        reports = list(csv.DictReader(fh))
    with open(os.path.join(base, "multi_abnormality_labels", "train_predicted_labels.csv"), encoding="utf-8") as fh:
        labels = list(csv.DictReader(fh))
    vols = {}
    for r in reports:
        name = r["VolumeName"]
        patient, study = name.rsplit("_", 2)[0], name.rsplit("_", 1)[0]
        img = nib.load(os.path.join(base, "train_fixed", patient, study, name))
        vols[name] = (np.asarray(img.dataobj), img.affine)
    return reports, labels, vols


def test_dataset_is_deterministic_across_worker_counts(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_dataset(a, n=3, size=(40, 40, 20), seed=11, workers=1, progress=False)
    make_dataset(b, n=3, size=(40, 40, 20), seed=11, workers=2, progress=False)
    ra, la, va = _read_dataset(a)
    rb, lb, vb = _read_dataset(b)
    assert ra == rb and la == lb and list(va) == list(vb) == ["train_1_a_1.nii.gz", "train_2_a_1.nii.gz", "train_3_a_1.nii.gz"]
    for k in va:
        assert np.array_equal(va[k][0], vb[k][0]) and np.allclose(va[k][1], vb[k][1])
        assert va[k][0].dtype == np.int16
    assert set(ra[0]) >= {"VolumeName", "Findings_EN", "Impressions_EN", "ClinicalInformation_EN", "Technique_EN"}
    assert list(la[0])[:19] == ["VolumeName", *CTRATE_LABELS] and "lung_nodule_lobe" in la[0]
    assert not [p for p in os.listdir(os.path.join(a, "dataset", "train_fixed", "train_1", "train_1_a")) if "tmp" in p]


def test_cli_refuses_non_empty_dir_and_bad_arguments(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    for argv in (["--n", "1", "--out", str(out)], ["--n", "0", "--out", str(tmp_path / "p")],
                 ["--n", "1", "--size", "4", "4", "4", "--out", str(tmp_path / "p")],
                 ["--n", "1", "--spacing", "0", "1", "1", "--out", str(tmp_path / "p")],
                 ["--n", "x", "--out", str(tmp_path / "p")]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code != 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error" in err and "Traceback" not in err
    assert sorted(os.listdir(out)) == ["keep.txt"] and not (tmp_path / "p").exists()


def test_cli_subprocess_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "text2ct_engine.data.phantom", "--n", "-3", "--out", str(tmp_path / "q")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "q").exists()


def test_ctrl_c_with_workers_is_one_line_and_says_how_to_rerun(tmp_path):
    """SIGINT reaches the pool's workers too: they leave it to the parent, which ends in one line."""
    import signal
    import time

    out = tmp_path / "d"
    # SIGINT's default action for the child, whatever pytest inherited: a background job of a non-interactive
    # shell (`pytest &`) ignores SIGINT, and so would the command, which Python then never interrupts
    proc = subprocess.Popen([sys.executable, "-m", "text2ct_engine.data.phantom", "--n", "200", "--size", "64", "64",
                             "64", "--workers", "2", "--out", str(out)], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""
    deadline = time.time() + 120
    while " 1/200" not in seen and time.time() < deadline:  # a volume is done: the pool runs (the bar itself
        seen += proc.stderr.read(1)  # shows before the pool starts)
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[1]
    lines = [line for line in (seen + rest).replace("\r", "\n").splitlines() if line.strip()]
    assert proc.returncode == 130, rest[-800:]
    assert "Traceback" not in rest and lines[-1].startswith("interrupted: the train split was not swapped in")
    assert "--force" in lines[-1]
    assert not (out / "dataset" / "train_fixed").exists()  # nothing half-made swapped in


def test_cli_writes_and_force_rewrites(tmp_path, capsys):
    out = str(tmp_path / "d")
    assert main(["--n", "2", "--size", "32", "32", "16", "--out", out, "--quiet"]) == 0
    assert main(["--n", "1", "--size", "32", "32", "16", "--out", out, "--quiet", "--force", "--seed", "3"]) == 0
    vols = [f for _, _, fs in os.walk(os.path.join(out, "dataset", "train_fixed")) for f in fs]
    assert vols == ["train_1_a_1.nii.gz"]  # the stale second volume of the first run is gone


def _tree(root):
    """{relative path: bytes} of every file under ``root``."""
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            path = os.path.join(folder, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


def test_interrupted_force_rewrite_leaves_the_previous_data_set_whole(tmp_path, monkeypatch):
    import text2ct_engine.data.phantom as phantom

    out = str(tmp_path / "d")
    make_dataset(out, n=2, size=(16, 16, 8), seed=1, progress=False)
    before = _tree(out)
    make_one = phantom._make_one

    def stop_at_the_second(job):
        if job.index == 1:  # the first new volume is written, then the run is stopped
            raise KeyboardInterrupt
        return make_one(job)

    monkeypatch.setattr(phantom, "_make_one", stop_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        make_dataset(out, n=3, size=(16, 16, 8), seed=7, force=True, progress=False)
    monkeypatch.undo()
    assert _tree(out) == before  # old volumes with their own CSVs, no new volume, no staging folder left
    assert sorted(os.listdir(os.path.join(out, "dataset"))) == [".text2ct_phantom", "metadata",
                                                                "multi_abnormality_labels", "radiology_text_reports",
                                                                "train_fixed"]
    make_dataset(out, n=3, size=(16, 16, 8), seed=7, force=True, progress=False)
    fresh = str(tmp_path / "fresh")
    make_dataset(fresh, n=3, size=(16, 16, 8), seed=7, workers=2, progress=False)
    assert _tree(out) == _tree(fresh)  # a rewrite is byte for byte a fresh run, for any worker count


def test_force_does_not_replace_volumes_another_tool_wrote(tmp_path):
    foreign = tmp_path / "d" / "dataset" / "train_fixed"
    foreign.mkdir(parents=True)
    (foreign / "scan.nii.gz").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="was not written by this tool"):
        make_dataset(str(tmp_path / "d"), n=1, size=(16, 16, 8), force=True, progress=False)
    assert (foreign / "scan.nii.gz").read_bytes() == b"x"
