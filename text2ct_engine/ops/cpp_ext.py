"""Loader of the optional C++ (OpenMP) CPU kernels in ``csrc/``: JIT-built on first use, cached.

``load()`` builds ``csrc/group_norm.cpp`` with ``torch.utils.cpp_extension.load`` (cached under the default
torch extensions directory, so later processes only load the library) and returns the module, or None when
no source or compiler is found or the build fails; the reason is logged once as a warning and kept in
``load_error()``. Set ``TEXT2CT_NO_CPP=1`` to skip the build.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

_lock = threading.Lock()
_error: str | None = None
_NAME = "text2ct_group_norm_cpu"


def source_dir() -> Path | None:
    """``csrc/`` next to the checkout (editable install) or inside the installed package."""
    here = Path(__file__).resolve()
    candidates = [here.parents[2] / "csrc", here.parents[1] / "csrc"]
    try:  # installed: setup.py maps csrc/ to the package data of text2ct_engine.csrc
        import importlib.resources as resources
        candidates.append(Path(str(resources.files("text2ct_engine.csrc"))))
    except Exception:  # noqa: BLE001 - not installed that way
        pass
    for d in candidates:
        if (d / "group_norm.cpp").is_file():
            return d
    return None


def build_tag(source: Path) -> str:
    """Short hash of what a build depends on: the CPU's feature flags (the library is built with
    -march=native), the torch version and environment (headers, ABI), the source text and the source's path
    (torch's build.ninja names it, so the same text at another path is another build to ninja). Builds that
    differ in any of them get their own folder, so two virtual environments or checkouts on one machine never
    rebuild over each other's library (torch rebuilds silently, in ~20 s, when its build hash changes)."""
    import torch

    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            flags += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    text = source.read_text(errors="replace")
    key = "\0".join((flags, torch.__version__, sys.prefix, str(source.resolve()), text))
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def build_dir(name: str) -> Path:
    """The folder ``cpp_extension.load`` builds extension ``name`` in (``<root>/py311_cpu/<name>`` in recent
    torch, ``<root>/<name>`` in older ones): asked of torch where it can tell, else torch's documented rule."""
    from torch.utils import cpp_extension
    try:
        return Path(cpp_extension._get_build_directory(name, verbose=False))
    except Exception:  # noqa: BLE001 - a private helper: gone or changed in this torch
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
        return Path(root) / name


def _build() -> ModuleType:
    src = source_dir()
    if src is None:
        raise FileNotFoundError("csrc/group_norm.cpp not found next to the package")
    from torch.utils import cpp_extension
    flags = ["-O3", "-fopenmp", "-march=native", "-fno-math-errno", "-fno-trapping-math"]
    name = f"{_NAME}_{build_tag(src / 'group_norm.cpp')}"
    folder = build_dir(name)
    if not (folder / f"{name}.so").is_file():  # a first run stalls for the build: say why
        print(f"text2ct_engine: building the C++ CPU kernels once (~30 s; cached in {folder})", file=sys.stderr,
              flush=True)
    return cpp_extension.load(name=name, sources=[str(src / "group_norm.cpp")], extra_cflags=flags,
                              extra_ldflags=["-fopenmp"], verbose=False)


@functools.lru_cache(maxsize=None)
def _load_cached() -> ModuleType | None:
    global _error
    if os.environ.get("TEXT2CT_NO_CPP", "0") == "1":
        _error = "disabled by TEXT2CT_NO_CPP=1"
        return None
    try:
        return _build()
    except Exception as e:  # noqa: BLE001 - any build failure means: use torch
        lines = str(e).strip().splitlines()
        first = next((ln.strip() for ln in lines if "error" in ln.lower()), lines[-1].strip() if lines else "")
        _error = f"{type(e).__name__}: {first[:300]}"
        msg = f"text2ct_engine: C++ CPU kernels unavailable ({_error}); using torch on CPU"
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return None


def load() -> ModuleType | None:
    """The compiled extension module, or None (the reason is warned once and kept in ``load_error()``)."""
    with _lock:
        return _load_cached()


def load_error() -> str | None:
    """Why ``load()`` returned None (after it has been called), else None."""
    return _error


def is_loaded() -> bool:
    """Has ``load()`` already been tried (without triggering a build)?"""
    return _load_cached.cache_info().currsize > 0
