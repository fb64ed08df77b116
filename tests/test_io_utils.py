"""Atomic writes: all or nothing, and the modes a plain open/mkdir would give (not tempfile's 0600/0700)."""
import os
import stat

import pytest

from text2ct_engine.io_utils import (atomic_dir, atomic_path, check_creatable, check_replaceable_dir,
                                     write_json)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_file_gets_umask_mode_and_replaces(tmp_path, umask_027):
    target = tmp_path / "out.json"
    target.write_text("old")
    write_json(target, {"a": 1})
    assert target.read_text().strip().startswith("{") and '"a": 1' in target.read_text()
    assert _mode(target) == 0o640  # 0666 & ~027: group-readable, unlike mkstemp's 0600
    assert sorted(os.listdir(tmp_path)) == ["out.json"]


def test_atomic_file_failure_leaves_old_content(tmp_path):
    target = tmp_path / "vol.nii.gz"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["vol.nii.gz"]


def test_atomic_dir_mode_replace_and_failure(tmp_path, umask_027):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("stale")
    with atomic_dir(out) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write("{}")
    assert sorted(os.listdir(out)) == ["config.json"]  # the old folder is replaced, not merged
    assert _mode(out) == 0o750
    with pytest.raises(ValueError):
        with atomic_dir(out) as tmp:
            open(os.path.join(tmp, "partial"), "w").close()
            raise ValueError("failed half way")
    assert sorted(os.listdir(out)) == ["config.json"]
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no temporary folder left behind
    plain = tmp_path / "file-in-the-way"
    plain.write_text("x")
    with atomic_dir(plain) as tmp:
        open(os.path.join(tmp, "a"), "w").close()
    assert os.listdir(plain) == ["a"]


def test_atomic_dir_with_marker_replaces_only_its_own_folders(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no pipeline.json"):
        with atomic_dir(out, marker="pipeline.json") as tmp:
            open(os.path.join(tmp, "pipeline.json"), "w").close()
    assert os.listdir(out) == ["notes.txt"] and sorted(os.listdir(tmp_path)) == ["model"]
    (out / "pipeline.json").write_text("{}")
    with atomic_dir(out, marker="pipeline.json") as tmp:
        open(os.path.join(tmp, "pipeline.json"), "w").close()
    assert os.listdir(out) == ["pipeline.json"]


def test_check_replaceable_dir_refuses_what_holds_other_things(tmp_path, monkeypatch):
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    (model / "pipeline.json").write_text("{}")
    (model / "ckpt.pt").write_bytes(b"w")
    check_replaceable_dir(model, "pipeline.json")  # a model folder
    check_replaceable_dir(tmp_path / "new", "pipeline.json")  # nothing there
    (tmp_path / "empty").mkdir()
    check_replaceable_dir(tmp_path / "empty", "pipeline.json")
    with pytest.raises(ValueError, match="holds the input"):
        check_replaceable_dir(model, "pipeline.json", inputs=[str(model / "ckpt.pt")])
    with pytest.raises(ValueError, match="holds no pipeline.json"):
        check_replaceable_dir(tmp_path / "models", "pipeline.json")
    monkeypatch.chdir(model)
    for path in (".", "..", str(model), str(tmp_path)):
        with pytest.raises(ValueError, match="current folder or above it"):
            check_replaceable_dir(path, "pipeline.json")


def test_check_creatable_tries_for_real(tmp_path):
    check_creatable(tmp_path / "a" / "b" / "new")  # missing folders are fine when they can be made
    assert os.listdir(tmp_path) == []  # the probe leaves nothing
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_creatable(tmp_path / "file" / "sub")
    if os.path.isdir("/sys"):  # sysfs takes no new files, even from root (whom os.access lets through)
        with pytest.raises(ValueError, match="folder /sys is not writable"):
            check_creatable("/sys/model")
