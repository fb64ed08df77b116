"""ops.cpp_ext: the "building once" notice appears only when torch has no cached build to load."""
import os
import sys
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from text2ct_engine.ops import cpp_ext


def _fake_torch(monkeypatch, root):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(cpp_extension, "get_default_build_root", lambda: str(root))
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: kwargs["name"])


def test_build_dir_is_where_torch_builds(tmp_path, monkeypatch):
    _fake_torch(monkeypatch, tmp_path)
    folder = cpp_ext.build_dir("ext")
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert folder.name == "ext" and folder.parent.parent == tmp_path and folder.parent.name.startswith(py)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "own"))  # an explicit root is used as it is
    assert cpp_ext.build_dir("ext") == tmp_path / "own" / "ext"
    monkeypatch.delattr(cpp_extension, "_get_build_directory")  # a torch without the private helper
    assert cpp_ext.build_dir("ext") == tmp_path / "own" / "ext"


def test_notice_only_without_a_cached_build(tmp_path, monkeypatch, capsys):
    if cpp_ext.source_dir() is None:
        pytest.skip("no csrc/ here")
    _fake_torch(monkeypatch, tmp_path)
    name = cpp_ext._build()  # the fake load returns the extension's name
    assert "building the C++ CPU kernels once" in capsys.readouterr().err
    folder = cpp_ext.build_dir(name)
    os.makedirs(folder, exist_ok=True)
    Path(folder, f"{name}.so").write_bytes(b"")  # what a finished build leaves
    assert cpp_ext._build() == name
    assert capsys.readouterr().err == ""


def test_builds_of_other_environments_or_sources_get_their_own_folder(tmp_path, monkeypatch):
    """Two virtual environments (or checkouts with other sources) on one machine must not share a build
    folder: torch would rebuild each time the other one ran."""
    src = tmp_path / "group_norm.cpp"
    src.write_text("int f() { return 1; }\n")
    here = cpp_ext.build_tag(src)
    assert cpp_ext.build_tag(src) == here and len(here) == 10
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "other-venv"))
    other_env = cpp_ext.build_tag(src)
    src.write_text("int f() { return 2; }\n")
    other_text = cpp_ext.build_tag(src)
    checkout = tmp_path / "other-checkout"  # the same text at another path: torch's build.ninja names the path
    checkout.mkdir()
    (checkout / "group_norm.cpp").write_text(src.read_text())
    assert len({here, other_env, other_text, cpp_ext.build_tag(checkout / "group_norm.cpp")}) == 4
