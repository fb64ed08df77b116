"""``python -m text2ct_engine.evaluate``: the Fréchet distance against closed forms, the HU histogram distance
by hand, the findings agreement on phantoms (perfect vs their own labels, worse vs swapped labels), CLIP score
and recall with a tiny random CLIP3D, and the CLI end to end with one ``error:`` line for bad input."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from text2ct_engine.data.ctrate import build_index
from text2ct_engine.data.labels import CTRATE_LABELS
from text2ct_engine.data.phantom import make_dataset
from text2ct_engine.evaluate.__main__ import main as evaluate_main
from text2ct_engine.evaluate.agreement import agreement_table, findings_agreement
from text2ct_engine.evaluate.alignment import (VolumeInput, alignment_scores, load_clip, text_embeddings,
                                              volume_features, volume_input)
from text2ct_engine.evaluate.evaluation import EvalOptions, evaluate
from text2ct_engine.evaluate.frechet import feature_frechet, frechet_distance, gaussian_fit, trace_sqrt_product
from text2ct_engine.evaluate.intensity import HU_LO, body_mask, hu_histogram, wasserstein1
from text2ct_engine.evaluate.retrieval import retrieval_recall
from text2ct_engine.evaluate.volume_sets import open_set, read_hu
from text2ct_engine.text import save_text_side
from text2ct_engine.tokenizer import CLIPTokenizer
from text2ct_engine.train.clip import fresh_clip

TINY = (16, 16, 8)  # x, y, z voxels of the tiny phantoms and of the tiny CLIP's volume tower
MODEL = {"text_config": dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
         "vision_config": dict(patch_size=[4, 8, 8], hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32),
         "projection_dim": 16}


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Two 128^3 phantoms the detector reads right (seed 0: they differ in consolidation, cardiomegaly and
    arterial calcification), five tiny ones, and a tiny random CLIP3D with a tokenizer of their reports."""
    root = tmp_path_factory.mktemp("evaluate")
    make_dataset(str(root / "phantoms"), 2, (128, 128, 128), seed=0, progress=False)
    make_dataset(str(root / "tiny"), 5, TINY, spacing=(24.0, 24.0, 48.0), seed=1, progress=False)
    texts = [r.text for d in ("phantoms", "tiny") for r in build_index(str(root / d), "train")[0]]
    tok = CLIPTokenizer.train(texts, vocab_size=400, min_frequency=1, context_length=512)
    save_text_side(root / "clip", fresh_clip(tok, TINY, MODEL, seed=0), tok)
    return root


@pytest.fixture(scope="module")
def phantom_run(work):
    """The CLI on the two phantoms against themselves, every metric (one detector pass per volume)."""
    out = work / "self.json"
    rc = evaluate_main(["--generated", str(work / "phantoms"), "--real", str(work / "phantoms"),
                        "--clip", str(work / "clip"), "--json", str(out), "--no-progress"])
    assert rc == 0
    return json.loads(out.read_text())


def _error_line(capsys, argv) -> str:
    capsys.readouterr()
    assert evaluate_main([*argv, "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ------------------------------------------------------------------------------------------- Fréchet
def _spd(rng, n, rank=None):
    a = rng.normal(size=(n, rank or n))
    return a @ a.T + (0 if rank else 0.1 * np.eye(n))


def test_frechet_matches_the_2x2_closed_form():
    # for 2x2 PSD M: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)), and S1^1/2 S2 S1^1/2 has det = det S1 det S2
    rng = np.random.default_rng(0)
    for _ in range(5):
        s1, s2, m1, m2 = _spd(rng, 2), _spd(rng, 2), rng.normal(size=2), rng.normal(size=2)
        tr = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
        want = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
        assert frechet_distance(m1, s1, m2, s2) == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_frechet_matches_the_commuting_closed_form_even_when_singular():
    # same eigenvectors: d^2 = |m1 - m2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2, zero eigenvalues included
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = np.array([4.0, 1.0, 0.0, 2.5, 0.3, 9.0]), np.array([1.0, 1.0, 2.0, 0.0, 0.7, 16.0])
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    want = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(m1, q @ np.diag(a) @ q.T, m2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(want, rel=1e-9)
    assert trace_sqrt_product(np.diag(a), np.diag(b)) == pytest.approx(np.sqrt(a * b).sum(), rel=1e-12)


def test_frechet_is_symmetric_and_zero_for_identical_sets():
    rng = np.random.default_rng(2)
    for n, p in ((50, 8), (5, 8)):  # the second: fewer samples than features, singular covariances
        x, y = rng.normal(size=(n, p)), rng.normal(1.0, 2.0, size=(n, p))
        assert frechet_distance(*gaussian_fit(x), *gaussian_fit(x)) == pytest.approx(0.0, abs=1e-9)
        dxy = frechet_distance(*gaussian_fit(x), *gaussian_fit(y))
        assert dxy > 0 and dxy == pytest.approx(frechet_distance(*gaussian_fit(y), *gaussian_fit(x)), rel=1e-9)
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_fit(np.zeros((1, 3)))


def test_frechet_estimate_approaches_the_true_distance_and_reports_its_floor():
    rng = np.random.default_rng(3)
    s1, s2 = _spd(rng, 3), _spd(rng, 3)
    m1, m2 = np.zeros(3), np.array([1.0, -2.0, 0.5])
    x = rng.multivariate_normal(m1, s1, size=40000)
    y = rng.multivariate_normal(m2, s2, size=40000)
    res = feature_frechet(y, x)
    assert res["value"] == pytest.approx(frechet_distance(m1, s1, m2, s2), rel=0.03)
    assert res["n_real"] == res["n_generated"] == 40000 and res["dim"] == 3 and "biased" in res["note"]
    assert 0 <= res["real_split_half"] < 0.05 * res["value"]


# ------------------------------------------------------------------------------------------- HU histogram
def test_wasserstein1_by_hand():
    p = np.array([1.0, 0.0, 0.0, 0.0])
    q = np.array([0.5, 0.0, 0.5, 0.0])  # half the mass moves two bins: 0.5 * 2
    assert wasserstein1(p, q) == pytest.approx(1.0) and wasserstein1(q, p) == pytest.approx(1.0)
    assert wasserstein1(p, q, bin_width=4.0) == pytest.approx(4.0)
    assert wasserstein1(2 * p, q) == pytest.approx(1.0)  # normalised first
    h = hu_histogram(np.array([-1000, -1000, 40, 40]))
    assert h.sum() == pytest.approx(1.0) and h[-1000 - HU_LO] == h[40 - HU_LO] == 0.5
    v = np.random.default_rng(4).integers(-900, 900, size=500)
    assert wasserstein1(hu_histogram(v), hu_histogram(v + 10)) == pytest.approx(10.0)  # a shift by 10 HU
    assert wasserstein1(hu_histogram([-3000]), hu_histogram([5000])) == pytest.approx(4095.0)  # end bins


def test_body_mask_keeps_the_lungs_and_drops_the_air_around():
    hu = np.full((40, 40, 20), -1000.0, np.float32)
    x, y = np.meshgrid(np.arange(40) - 19.5, np.arange(40) - 19.5, indexing="ij")
    hu[(x ** 2 + y ** 2) < 15 ** 2] = 40.0  # the trunk
    lung = (x ** 2 + y ** 2) < 8 ** 2
    hu[lung] = -850.0
    mask = body_mask(hu, (3.0, 3.0, 3.0))
    assert mask[lung].all() and mask[hu > 0].all() and not mask[(x ** 2 + y ** 2) > 17 ** 2].any()


# ------------------------------------------------------------------------------------------- findings
def test_agreement_table_by_hand():
    truth = np.array([[1, 0], [1, 0], [0, 0], [0, 0]], bool)
    pred = np.array([[1, 1], [0, 0], [0, 0], [1, 0]], bool)
    t = agreement_table(pred, truth, ["a", "b"])
    a, b = t["rows"]
    assert (a["tp"], a["fn"], a["tn"], a["fp"]) == (1, 1, 1, 1) and a["balanced_accuracy"] == 0.5
    assert b["sensitivity"] is None and b["specificity"] == 0.75 and b["balanced_accuracy"] is None
    assert t["macro"] == {"sensitivity": 0.5, "specificity": 0.625, "balanced_accuracy": 0.5,
                          "labels_with_balanced_accuracy": 1}


def test_findings_agree_perfectly_on_phantoms_and_not_with_swapped_labels(phantom_run):
    real = phantom_run["volumes"]["real"]
    assert len(real) == 2 and all(v["detected"] is not None for v in real)
    for role in ("generated", "real"):  # the same phantoms on both sides
        table = phantom_run["metrics"]["findings"][role]
        assert table["n"] == 2 and table["macro"]["balanced_accuracy"] == 1.0
        assert all(r["fp"] == r["fn"] == 0 for r in table["rows"])
        assert table["macro"]["labels_with_balanced_accuracy"] == 3  # labels where the two phantoms differ
    detected = [v["detected"] for v in real]
    swapped = findings_agreement(detected, [real[1]["labels"], real[0]["labels"]])
    assert swapped["macro"]["balanced_accuracy"] == 0.0 and swapped["macro"]["sensitivity"] < 1.0
    assert findings_agreement(detected, [v["labels"] for v in real], hu_max=3000.0)["notes"] == []  # metal shows
    metal = [list(v["labels"]) for v in real]
    metal[0][CTRATE_LABELS.index("Medical material")] = 1.0  # a report names metal the volume cannot show
    undetectable, counted = findings_agreement(detected, metal, hu_max=1000.0), findings_agreement(detected, metal)
    assert "Medical material cannot be detected" in undetectable["notes"][0] and counted["notes"] == []
    assert "left out" in findings_agreement(detected, [v["labels"] for v in real], hu_max=1000.0)["notes"][0]
    assert "left out of the macro averages" in undetectable["notes"][0]
    assert (undetectable["macro"]["labels_with_balanced_accuracy"], undetectable["macro"]["balanced_accuracy"]) \
        == (counted["macro"]["labels_with_balanced_accuracy"] - 1, 1.0)  # its miss no longer counts
    assert len(undetectable["rows"]) == len(counted["rows"])  # its row is still shown
    coarse = findings_agreement(detected, [v["labels"] for v in real], coarsest_mm=6.0)["notes"]
    assert len(coarse) == 1 and "6 mm" in coarse[0] and "over-reads" in coarse[0]
    assert findings_agreement(detected, [v["labels"] for v in real], coarsest_mm=3.0)["notes"] == []


# ------------------------------------------------------------------------------------------- CLIP
def test_alignment_scores_by_hand():
    t = torch.eye(4, dtype=torch.float64).numpy()
    assert alignment_scores(t, t) == {"clip_score": 1.0, "clip_score_std": 0.0, "top1": 1.0, "top5": 1.0, "n": 4}
    rolled = alignment_scores(t, np.roll(t, 1, axis=0))  # every text's own volume is orthogonal to it
    assert rolled["clip_score"] == 0.0 and rolled["top1"] == 0.0 and rolled["top5"] == 1.0


def test_volume_input_repeats_what_train_clip_recorded(work):
    model, _ = load_clip(str(work / "clip"))
    size = tuple(int(s) for s in model.config.vision_config.image_size[::-1])
    recorded = {"size": list(size), "spacing": [2.0, 2.0, 4.0], "resize": "crop_pad"}
    assert volume_input(model, recorded=recorded) == VolumeInput(size, (2.0, 2.0, 4.0), "crop_pad")
    assert volume_input(model, [1.0, 1.0, 1.0], "resize", recorded) == VolumeInput(size, (1.0, 1.0, 1.0), "resize")
    assert volume_input(model) == VolumeInput(size, None, "resize")  # nothing recorded: as stored, resized


def test_clip_score_and_recall_with_a_tiny_clip(work):
    model, tok = load_clip(str(work / "clip"))
    vs = open_set(str(work / "tiny"), "--real")
    to_input = volume_input(model)
    vols = np.concatenate([volume_features(model, to_input(*read_hu(s)))[1] for s in vs.studies])
    texts = text_embeddings(model, tok, [s.text for s in vs.studies])
    res = evaluate(str(work / "tiny"), str(work / "tiny"), EvalOptions(metrics=("clip",), clip=str(work / "clip")),
                   progress=False)
    gen, real = res["metrics"]["clip"]["generated"], res["metrics"]["clip"]["real"]
    assert gen == real and gen["n"] == 5  # identical sets score identically
    want = retrieval_recall(torch.from_numpy(texts), torch.from_numpy(vols))
    assert (gen["top1"], gen["top5"]) == (want["top1"], want["top5"]) and gen["top5"] == 1.0  # 5 candidates
    assert gen["clip_score"] == pytest.approx(float((texts * vols).sum(1).mean()), abs=1e-6)
    assert -1.0 <= gen["clip_score"] <= 1.0 and 0.0 <= gen["top1"] <= 1.0


def test_one_truncation_note_for_both_volume_sets(work):
    from text2ct_engine.train.common import TruncationNote
    model, tok = load_clip(str(work / "clip"))
    long = [" ".join(["Findings: pleural effusion on the right."] * 120)] * 3  # past the 512-token context
    logged = []
    note = TruncationNote(logged.append)
    first = text_embeddings(model, tok, long, batch_size=2, note=note)  # the generated set, then the real one
    again = text_embeddings(model, tok, long, batch_size=2, note=note)
    assert len(logged) == 1 and "truncated" in logged[0] and np.array_equal(first, again)


# ------------------------------------------------------------------------------------------- CLI
def test_cli_on_phantoms_against_themselves(phantom_run, capsys):
    m = phantom_run["metrics"]
    assert m["fid"]["value"] == pytest.approx(0.0, abs=1e-6) and m["fid"]["n_real"] == 2
    assert m["fid"]["real_split_half"] is None  # needs 4 real volumes
    assert m["hist"]["wasserstein1_hu"] == 0.0 and -1000 < m["hist"]["mean_hu_real"] < 200
    assert m["clip"]["generated"] == m["clip"]["real"]
    assert phantom_run["skipped_metrics"] == {} and phantom_run["generated"]["layout"] == "ct-rate"


def test_cli_on_a_folder_of_sampled_niftis_with_a_prompt_file(work, capsys):
    gen = work / "sampled"
    gen.mkdir()
    vs = open_set(str(work / "tiny"), "--real")
    for i, s in enumerate(vs.studies):  # what python -m text2ct_engine.sample --prompt-file writes
        shutil.copy(s.path, gen / f"ct_{i:03d}.nii.gz")
    # with a byte-order mark, as some editors save it: not part of the first prompt (all 5 match their labels)
    (work / "prompts.txt").write_text("\n".join(s.text for s in vs.studies) + "\n", encoding="utf-8-sig")
    out = work / "sampled.json"
    assert evaluate_main(["--generated", str(gen), "--prompts", str(work / "prompts.txt"), "--real",
                          str(work / "tiny"), "--clip", str(work / "clip"), "--metrics", "fid,hist,clip",
                          "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Frechet distance" in printed and "recall@1" in printed and f"wrote {out}" in printed
    res = json.loads(out.read_text())
    assert res["labels_matched_by_text"] == 5 and res["generated"]["with_labels"] == 5
    assert res["metrics"]["fid"]["value"] == pytest.approx(0.0, abs=1e-6)  # copies of the real volumes
    assert res["metrics"]["fid"]["real_split_half"] > 0  # 5 real volumes: halves of 3 and 2
    assert res["metrics"]["hist"]["wasserstein1_hu"] == 0.0
    assert res["metrics"]["clip"]["generated"] == res["metrics"]["clip"]["real"]
    assert not [n for n in os.listdir(work) if n.startswith(".tmp-")]  # the JSON was written atomically


def test_cli_reports_bad_input_in_one_line(work, tmp_path, capsys):
    tiny, clip = str(work / "tiny"), str(work / "clip")
    assert "is not a directory" in _error_line(capsys, ["--generated", str(tmp_path / "nope"), "--real", tiny])
    (tmp_path / "empty").mkdir()
    assert "no .nii.gz/.nii volume" in _error_line(capsys, ["--generated", str(tmp_path / "empty"), "--real", tiny])
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(open_set(tiny, "--real").studies[0].path, one / "ct.nii.gz")
    line = _error_line(capsys, ["--generated", str(one), "--real", tiny, "--clip", clip])
    assert "at least 2 volumes in each set" in line and "got 1 generated and 5 real" in line
    text_only = tmp_path / "text_only"
    model, tok = load_clip(clip)
    save_text_side(text_only, model.text_tower(), tok)
    assert "not a CLIP3D" in _error_line(capsys, ["--generated", tiny, "--real", tiny, "--clip", str(text_only)])
    assert "cannot be computed" in _error_line(capsys, ["--generated", str(one), "--real", tiny, "--metrics",
                                                        "findings"])
    (tmp_path / "two.txt").write_text("a prompt\nanother\n")
    assert "2 prompts for 1 volumes" in _error_line(capsys, ["--generated", str(one), "--prompts",
                                                             str(tmp_path / "two.txt"), "--real", tiny])
    assert "unknown metric" in _error_line(capsys, ["--generated", tiny, "--real", tiny, "--metrics", "fid,iou"])


def test_prompt_manifest_csv_gives_prompts_and_labels(work, tmp_path):
    gen = tmp_path / "gen"
    gen.mkdir()
    src = open_set(str(work / "tiny"), "--real").studies[:2]
    for i, s in enumerate(src):
        shutil.copy(s.path, gen / f"ct_{i:03d}.nii.gz")
    header = "file,prompt," + ",".join(CTRATE_LABELS)
    rows = [f'ct_00{i}.nii.gz,"{s.text}",' + ",".join(str(int(v)) for v in s.labels) for i, s in enumerate(src)]
    (gen / "prompts.csv").write_text("\n".join([header, *rows, "ct_009.nii.gz,a prompt without volume" +
                                                ",0" * 18]) + "\n", encoding="utf-8")
    vs = open_set(str(gen), "--generated")  # prompts.csv in the folder is read by default
    assert [s.text for s in vs.studies] == [s.text for s in src]
    assert [s.labels for s in vs.studies] == [s.labels for s in src]
    assert len(vs.skipped) == 1 and "no volume 'ct_009.nii.gz'" in vs.skipped[0][1]
    (gen / "prompts.csv").write_text("file,prompt,Cardiomegaly\nct_000.nii.gz,x,1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="give all 18 or none"):
        open_set(str(gen), "--generated")


def test_volume_input_takes_the_size_the_clip_was_trained_at(work):
    model, _ = load_clip(str(work / "clip"))
    assert tuple(model.config.vision_config.image_size[::-1]) == TINY
    recorded = {"size": [32, 32, 16], "spacing": None, "resize": "resize"}  # train clip --init --size 32 32 16
    assert volume_input(model, recorded=recorded) == VolumeInput((32, 32, 16), None, "resize")
    with pytest.raises(ValueError, match=r"records size \[32, 30, 16\]: it must be three multiples of the volume "
                                         r"tower's patch \(8, 8, 4\)"):
        volume_input(model, recorded={"size": [32, 30, 16]})


def test_json_target_is_checked_before_any_work(tmp_path, capsys):
    make_dataset(str(tmp_path / "set"), 2, TINY, spacing=(24.0, 24.0, 48.0), seed=2, progress=False)
    base = ["--generated", str(tmp_path / "set"), "--real", str(tmp_path / "set"), "--metrics", "hist"]
    assert "is a directory" in _error_line(capsys, [*base, "--json", str(tmp_path)])
    out = tmp_path / "eval.json"
    out.write_text("keep")
    line = _error_line(capsys, [*base, "--json", str(out)])
    assert "already exists" in line and "--force" in line
    assert out.read_text() == "keep"
    assert evaluate_main([*base, "--json", str(out), "--force", "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["metrics"]["hist"]["wasserstein1_hu"] == 0.0
    assert result["skipped_metrics"] == {}  # --metrics chose hist: the others are not "skipped"


def test_folder_volumes_pair_with_prompt_lines_in_number_order(work, tmp_path):
    """sample writes ct_998, ct_999, ct_1000 past 1000 prompts (or ct_0998 ... when it knows there are that
    many): line i of prompts.txt must meet volume i either way, not ct_1000 after ct_100."""
    from text2ct_engine.sample import numbered

    assert [numbered("ct.nii.gz", i, 1001) for i in (0, 999, 1000)] == \
        ["ct_0000.nii.gz", "ct_0999.nii.gz", "ct_1000.nii.gz"]
    assert numbered("ct.nii.gz", 7, 12) == "ct_007.nii.gz" and numbered("ct.nii.gz", 0, 1) == "ct.nii.gz"
    gen = tmp_path / "gen"
    gen.mkdir()
    src = open_set(str(work / "tiny"), "--real").studies[0].path
    numbers = [2, 10, 100, 101, 1000]
    for i in numbers:
        os.link(src, gen / f"ct_{i:03d}.nii.gz")
    (gen / "prompts.txt").write_text("".join(f"prompt {i}\n" for i in numbers), encoding="utf-8")
    vs = open_set(str(gen), "--generated")
    assert [(s.name, s.text) for s in vs.studies] == [(f"ct_{i:03d}.nii.gz", f"prompt {i}") for i in numbers]


def test_the_report_names_every_skipped_volume_and_why():
    from text2ct_engine.evaluate.report import format_report

    def volume_set(path, skipped):
        return {"layout": "folder", "split": None, "path": path, "volumes": 3, "with_text": 3, "with_labels": 0,
                "skipped": skipped}
    text = format_report({"generated": volume_set("gen", ["gen/ct_001.nii.gz: not a gzip file"]),
                          "real": volume_set("real", []), "metrics": {}, "skipped_metrics": {}})
    lines = text.splitlines()
    assert "1 skipped" in lines[0] and lines[2] == "  skipped gen/ct_001.nii.gz: not a gzip file", text
