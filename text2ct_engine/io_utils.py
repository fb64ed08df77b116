"""Atomic file writes (a temporary file in the same folder, renamed over the target) and JSON reading.

``tempfile`` creates its files 0600 and its folders 0700; the renamed results get the modes that a plain
``open``/``mkdir`` would give under the process's umask instead, so collaborators can read them."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from typing import Any, Iterable, Iterator


def _umask() -> int:
    """The process's umask (os.umask can only be read by setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode a new file (0666) or folder (0777) gets from ``open``/``mkdir`` under the current umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def _inside(path: str, folder: str) -> bool:
    """Is ``path`` ``folder`` itself or somewhere below it (both resolved)?"""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_replaceable_dir(path: str | os.PathLike, marker: str, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Raise a one-line ``ValueError`` unless replacing ``path`` with a new folder loses nothing else: it must
    not exist, or be an empty folder or one holding ``marker`` (a folder this tool wrote), and be neither the
    working directory nor above it, nor hold any of ``inputs``."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        return
    if os.path.basename(os.path.normpath(path)) in (".", "..") or _inside(os.getcwd(), path):
        raise ValueError(f"refusing to replace {path}: it is the current folder or above it; choose a new folder")
    held = [os.fspath(i) for i in inputs if i is not None and _inside(os.fspath(i), path)]
    if held:
        raise ValueError(f"refusing to replace {path}: it holds the input {held[0]}; choose another folder")
    if not os.path.isdir(path):
        raise ValueError(f"refusing to replace {path}: it is a file, not a model folder; choose another path")
    if os.listdir(path) and not os.path.isfile(os.path.join(path, marker)):
        raise ValueError(f"refusing to replace {path}: it is not empty and holds no {marker}, so it is not a "
                         f"folder this tool wrote; choose another path")


def check_creatable(path: str | os.PathLike) -> None:
    """Raise a one-line ``ValueError`` unless ``path`` (and its missing parent folders) can be created now:
    tried for real, with a temporary file in the nearest existing folder (``os.access`` trusts root)."""
    path = os.fspath(path)
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"cannot write {path}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=existing)
    except OSError as err:
        raise ValueError(f"cannot write {path}: folder {existing} is not writable ({err.strerror})") from None
    os.close(fd)
    os.remove(probe)


STAGING_PREFIX = ".tmp-"  # folders being written, beside the one they replace
OLD_SUFFIX = ".old"  # the replaced folder, between the two renames of a swap


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, marker: str | None = None) -> Iterator[str]:
    """Yield a new folder beside ``path`` to write into; on success it replaces ``path`` as a whole.

    The old folder is renamed to ``path.old``, the new one to ``path``, then ``path.old`` is deleted: at
    every moment there is a complete folder at ``path`` or at ``path.old``, and :func:`recover_dir` (run
    first here) puts it back after an interruption. A file at ``path`` is removed. On error the new folder
    is deleted and ``path`` is left as it was. With ``marker``, ``path`` is first checked with
    :func:`check_replaceable_dir` (only an empty folder or one holding ``marker`` is replaced).
    """
    path = os.fspath(path)
    if marker is not None:
        check_replaceable_dir(path, marker)
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    recover_dir(path)
    tmp = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{name}-", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, default_mode(directory=True))
        old = path + OLD_SUFFIX
        if os.path.isdir(path) and not os.path.islink(path):
            os.replace(path, old)
        elif os.path.lexists(path):
            os.remove(path)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover_dir(path: str | os.PathLike) -> None:
    """Finish or undo an :func:`atomic_dir` swap that was interrupted: restore ``path.old`` when ``path`` is
    missing, else delete it; delete half-written staging folders."""
    path = os.fspath(path)
    old = path + OLD_SUFFIX
    if os.path.isdir(old):
        if os.path.exists(path):
            shutil.rmtree(old)
        else:
            os.replace(old, path)
    parent, name = os.path.split(os.path.abspath(path))
    for stale in glob.glob(os.path.join(glob.escape(parent), f"{STAGING_PREFIX}{glob.escape(name)}-*")):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error delete it."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix or os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def read_json_object(path: str | os.PathLike, what: str = "JSON file") -> dict[str, Any]:
    """The JSON object in ``path``; an unreadable file or another kind of JSON value is a one-line ValueError."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the {what} ({err})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: the {what} must be a JSON object")
    return obj


def read_text_lines(path: str | os.PathLike, what: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped (a byte-order mark is not text); ``what`` names the
    file in the one-line ``ValueError`` an unreadable or non-UTF-8 file gives (e.g. ``"--prompt-file"``)."""
    try:
        with open(path, encoding="utf-8-sig") as fh:
            return [line.strip() for line in fh if line.strip()]
    except OSError as err:
        raise ValueError(f"cannot read {what} {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not UTF-8 text") from None
