"""CT-RATE-layout loader: preprocessing, old-layout metadata, workers, and a corpus of bad files."""
import csv
import gzip
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from text2ct_engine.data.ctrate import CTRATEDataset, build_index, collate
from text2ct_engine.data.errors import BadDataError, BadDataLog
from text2ct_engine.data.labels import CTRATE_LABELS, REPORT_COLUMNS
from text2ct_engine.data.nifti import read_volume, write_volume
from text2ct_engine.data.phantom import make_dataset
from text2ct_engine.data.transforms import crop_or_pad, hu_to_unit, reorient_to_ras, unit_to_hu


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ph"))
    make_dataset(root, n=3, size=(40, 40, 20), seed=2, workers=1, progress=False)  # 9.6 x 9.6 x 19.2 mm voxels
    return root


def test_loader_shapes_ranges_spacing(phantom_root):
    ds = CTRATEDataset(phantom_root, target_spacing=(8.0, 8.0, 16.0), target_size=(40, 44, 28))
    assert len(ds) == 3 and not ds.log.entries
    s = ds[0]
    assert s["volume"].shape == (1, 40, 44, 28) and s["volume"].dtype == torch.float32
    assert 0.0 <= float(s["volume"].min()) and float(s["volume"].max()) <= 1.0
    assert torch.allclose(s["spacing"], torch.tensor([8.0, 8.0, 16.0]))
    assert s["text"].startswith("Findings: ") and " Impression: " in s["text"]
    assert s["labels"].shape == (len(CTRATE_LABELS),)
    # padding is air (0 after the window), the body is in the middle
    assert float(s["volume"][0, :, :, 0].max()) == 0.0 and float(s["volume"][0, 20, 22, 14]) > 0.3


def test_loader_resize_mode_and_no_targets(phantom_root):
    ds = CTRATEDataset(phantom_root, target_spacing=(9.6, 9.6, 19.2), target_size=(32, 32, 16), mode="resize")
    s = ds[1]
    assert s["volume"].shape == (1, 32, 32, 16)
    assert torch.allclose(s["spacing"], torch.tensor([12.0, 12.0, 24.0]), atol=1e-4)
    raw = CTRATEDataset(phantom_root, target_spacing=None, target_size=None)[1]
    assert raw["volume"].shape == (1, 40, 40, 20)


def test_dataloader_with_workers(phantom_root):
    ds = CTRATEDataset(phantom_root, target_spacing=(9.6, 9.6, 19.2), target_size=(40, 40, 20))
    batches = list(DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate))
    assert [b["volume"].shape[0] for b in batches] == [2, 1]
    assert batches[0]["labels"].shape == (2, 18) and batches[0]["spacing"].shape == (2, 3)
    assert batches[0]["name"] == ["train_1_a_1.nii.gz", "train_2_a_1.nii.gz"]


def test_reorient_matches_nibabel_canonical():
    data = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    aff = np.array([[0, 0, -2.0, 10], [-0.7, 0, 0, 5], [0, 1.5, 0, -3], [0, 0, 0, 1]])
    canon = nib.as_closest_canonical(nib.Nifti1Image(data, aff))
    vol, sp = reorient_to_ras(torch.from_numpy(data), aff)
    assert np.allclose(vol.numpy(), np.asarray(canon.dataobj)) and np.allclose(sp, canon.header.get_zooms())


def test_window_and_crop_pad():
    v = torch.tensor([-2000.0, -1000.0, 0.0, 1000.0, 3000.0])
    assert torch.allclose(hu_to_unit(v), torch.tensor([0, 0, 0.5, 1, 1]))
    assert torch.allclose(unit_to_hu(hu_to_unit(v)), v.clamp(-1000, 1000))
    x = torch.arange(5 * 4 * 3, dtype=torch.float32).view(5, 4, 3)
    y = crop_or_pad(x, (3, 6, 3), fill=-1)
    assert y.shape == (3, 6, 3) and torch.equal(y[:, 1:5], x[1:4]) and (y[:, 0] == -1).all()


def _write_old_copy(src_root, dst):
    """An older CT-RATE copy: raw stored values (HU + 1024), unit-voxel headers, LPS-flipped arrays,
    true spacing and rescale only in metadata/train_metadata.csv."""
    src = os.path.join(src_root, "dataset")
    base = os.path.join(dst, "dataset")
    rows = []
    for dirpath, _, files in os.walk(os.path.join(src, "train_fixed")):
        for f in files:
            data, aff = read_volume(os.path.join(dirpath, f))
            rel = os.path.relpath(dirpath, os.path.join(src, "train_fixed"))
            raw = (data[::-1, ::-1] + 1024).astype(np.uint16)  # stored LPS with an LPS affine
            write_volume(os.path.join(base, "train", rel, f), raw, np.diag([-1.0, -1.0, 1.0, 1.0]))
            sp = np.sqrt((aff[:3, :3] ** 2).sum(0))
            rows.append({"VolumeName": f, "XYSpacing": f"[{sp[0]}, {sp[1]}]", "ZSpacing": str(sp[2]),
                         "RescaleSlope": "1", "RescaleIntercept": "-1024"})
    for sub in ("radiology_text_reports", "multi_abnormality_labels"):
        os.makedirs(os.path.join(base, sub))
        for f in os.listdir(os.path.join(src, sub)):
            with open(os.path.join(src, sub, f), "rb") as a, open(os.path.join(base, sub, f), "wb") as b:
                b.write(a.read())
    os.makedirs(os.path.join(base, "metadata"))
    with open(os.path.join(base, "metadata", "train_metadata.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_old_layout_uses_metadata_rescale_and_spacing(phantom_root, tmp_path):
    _write_old_copy(phantom_root, str(tmp_path))
    kw = dict(target_spacing=(8.0, 8.0, 16.0), target_size=(48, 48, 24))
    new, old = CTRATEDataset(phantom_root, **kw), CTRATEDataset(str(tmp_path), **kw)
    assert len(old) == 3 and old.records[0].rescale == (1.0, -1024.0)
    for i in range(3):
        assert torch.allclose(new[i]["volume"], old[i]["volume"], atol=1e-5)
        assert torch.equal(new[i]["spacing"], old[i]["spacing"])


# ------------------------------------------------------------------------------------------- bad data
def _nifti(path, data, affine=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)


@pytest.fixture()
def bad_root(tmp_path):
    base = tmp_path / "dataset"
    vol = base / "train_fixed"
    good = np.full((8, 8, 8), -500, np.int16)
    names = {"good": "train_1_a_1.nii.gz", "trunc": "train_2_a_1.nii.gz", "corrupt": "train_3_a_1.nii.gz",
             "fourd": "train_4_a_1.nii.gz", "nan": "train_5_a_1.nii.gz", "noreport": "train_6_a_1.nii.gz",
             "utf": "train_7_a_1.nii.gz", "twod": "train_9_a_1.nii.gz"}
    p = {k: str(vol / f"p{k}" / "s" / v) for k, v in names.items()}
    _nifti(p["good"], good)
    _nifti(p["trunc"], np.random.default_rng(0).integers(-1000, 1000, (32, 32, 32)).astype(np.int16))
    blob = open(p["trunc"], "rb").read()
    open(p["trunc"], "wb").write(blob[: len(blob) // 3])
    os.makedirs(os.path.dirname(p["corrupt"]))
    with gzip.open(p["corrupt"], "wb") as fh:
        fh.write(b"this is not a nifti header at all" * 20)
    _nifti(p["fourd"], np.zeros((8, 8, 8, 2), np.int16))
    nan = np.zeros((8, 8, 8), np.float32)
    nan[1, 2, 3] = np.nan
    nan[4, 4, 4] = np.inf
    _nifti(p["nan"], nan)
    _nifti(p["noreport"], good)
    _nifti(p["utf"], good)
    _nifti(p["twod"], np.zeros((8, 8), np.int16))
    rep = base / "radiology_text_reports"
    rep.mkdir(parents=True)
    lines = [",".join(REPORT_COLUMNS).encode()]
    for k in ("good", "trunc", "corrupt", "fourd", "nan", "twod"):
        lines.append(f"{names[k]},c,t,Normal lungs.,No pathology.".encode())
    lines.append(f"{names['utf']},c,t,Bad bytes \xff\xfe here,x".encode("latin-1"))
    lines.append(b"train_8_a_1.nii.gz,c,t,Report without a volume.,x")
    (rep / "train_reports.csv").write_bytes(b"\n".join(lines) + b"\n")
    return str(tmp_path), p


def test_bad_data_is_named_skipped_and_summarised(bad_root, capsys):
    root, p = bad_root
    ds = CTRATEDataset(root, target_spacing=None, target_size=(8, 8, 8))
    err = capsys.readouterr().err
    reasons = dict(ds.log.entries)
    assert reasons[p["noreport"]].startswith("volume without a report row")
    assert any("train_8_a_1.nii.gz" in k and "without a volume" in v for k, v in reasons.items())
    assert any("non-UTF-8 text in column Findings_EN" in v for v in reasons.values())
    assert p["utf"] in reasons
    assert "bad file(s) skipped" in err and "train_8_a_1.nii.gz" in err
    # volume-level problems surface when a sample is read: named, skipped, never raised
    names = [r.name for r in ds.records]
    assert sorted(names) == sorted(os.path.basename(p[k]) for k in ("good", "trunc", "corrupt", "fourd", "nan", "twod"))
    got = {}
    for b in DataLoader(ds, batch_size=3, num_workers=0, collate_fn=collate):
        got.update(dict(b["skipped"]))
        if b["volume"] is not None:
            assert b["volume"].shape[1:] == (1, 8, 8, 8)
    assert "truncated or corrupt" in got[p["trunc"]]
    assert "not a readable NIfTI" in got[p["corrupt"]]
    assert "not a 3-D volume" in got[p["fourd"]] and "not a 3-D volume" in got[p["twod"]]
    assert got[p["nan"]] == "2 NaN/Inf voxel(s)"
    assert p["good"] not in got
    # check() finds the same files up front and drops them from the index
    log = ds.check(progress=False)
    assert [r.name for r in ds.records] == [os.path.basename(p["good"])]
    assert {p[k] for k in ("trunc", "corrupt", "fourd", "nan", "twod")} <= {path for path, _ in log.entries}


def test_strict_stops_at_first_problem(bad_root):
    root, p = bad_root
    with pytest.raises(BadDataError):
        CTRATEDataset(root, target_spacing=None, target_size=None, strict=True)
    records, _ = build_index(root, log=BadDataLog())
    ds = CTRATEDataset.__new__(CTRATEDataset)
    ds.__dict__.update(records=[r for r in records if r.path == p["nan"]], strict=True, target_spacing=None,
                       target_size=None, mode="crop_pad", window=(-1000.0, 1000.0))
    with pytest.raises(BadDataError, match="NaN"):
        ds[0]


def test_missing_layout_is_one_clear_error(tmp_path):
    from text2ct_engine.data.errors import DataError

    with pytest.raises(DataError, match="no volume folder"):
        CTRATEDataset(str(tmp_path))


def test_a_volume_without_air_is_flagged_once_as_not_ct(phantom_root, tmp_path):
    import shutil
    import warnings

    from text2ct_engine.data import transforms

    root = tmp_path / "mri"
    shutil.copytree(phantom_root, root)
    path = sorted((root / "dataset" / "train_fixed").rglob("*.nii.gz"))[0]
    data, affine = read_volume(str(path))
    write_volume(str(path), (np.asarray(data) + 1500).clip(0, 3000).astype(np.int16), affine)  # 0..3000: no air
    transforms._WARNED_NOT_CT.discard(str(path))
    ds = CTRATEDataset(str(root), target_spacing=(8.0, 8.0, 16.0), target_size=(48, 48, 24))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            for i in range(len(ds)):
                ds[i]
    got = [str(w.message) for w in caught if "not a CT in HU" in str(w.message)]
    assert len(got) == 1 and str(path) in got[0], got  # once, and only for that file
    assert f"lowest {int(np.asarray(read_volume(str(path))[0]).min())}" in got[0]
