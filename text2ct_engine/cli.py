"""What every ``python -m text2ct_engine.<verb>`` shares: a user's mistake is one ``error:`` line, exit 2."""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Callable

OOM_HINT = "try smaller inputs"
_OOM_MARKERS = ("out of memory", "can't allocate memory")


class Parser(argparse.ArgumentParser):
    """The engine's command lines: a bad one is one ``error:`` line (what is wrong, where the help is) and
    exit 2, never argparse's usage block; sub-commands inherit it."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def path(value: str) -> str:
    """argparse ``type`` of a file or folder option: an empty value (an unset shell variable, ``--out ""``)
    is refused, never read as the current folder."""
    if not value.strip():
        raise argparse.ArgumentTypeError("empty path: give a file or folder name")
    return value


def slab(value: str) -> int | str | None:
    """argparse ``type`` of an exact tiled VAE pass's rows per slab: a positive number, ``auto`` (tile only
    large volumes), or 0 for no tiling (None)."""
    if value == "auto":
        return value
    if value.isdigit():
        return int(value) or None
    raise argparse.ArgumentTypeError(f"must be a positive number of rows, 0 (no tiling) or auto, got {value!r}")


def check_output_file(flag: str, path: str, force: bool) -> None:
    """Before any work: ``flag``'s ``path`` must be a file that can be written now; an existing one needs
    --force (one-line ``ValueError`` naming the flag)."""
    from .volume_io import check_writable

    try:
        check_writable(path, force)
    except ValueError as err:
        raise ValueError(f"{flag} {err}") from None


def _warn_in_one_line(message, category, *_args, **_kwargs) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0].strip() if lines else type(err).__name__


def is_out_of_memory(err: BaseException) -> bool:
    """A failed allocation: ``MemoryError``, ``torch.OutOfMemoryError`` or an allocator's ``RuntimeError``."""
    torch = sys.modules.get("torch")  # only a job that imported torch can raise its error
    if isinstance(err, MemoryError) or (torch is not None and isinstance(err, torch.OutOfMemoryError)):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err).lower() for m in _OOM_MARKERS)


def describe_os_error(err: OSError) -> str:
    """``<path>: <reason>`` for an ``OSError`` (both paths of a failed rename)."""
    reason = err.strerror or _first_line(err)
    paths = [p for p in (err.filename, err.filename2) if p is not None]
    return f"{' -> '.join(map(str, paths))}: {reason}" if paths else reason


def run_guarded(job: Callable[[], object], oom_hint: str = OOM_HINT,
                interrupted: str = "every output written so far is complete; none is half-written") -> int:
    """Run ``job``; a ``ValueError`` (the engine's "bad input" signal) becomes one line on stderr and exit 2.

    So do a failed allocation (``out of memory: ...; <oom_hint>``) and an ``OSError`` (the path and why).
    Ctrl-C is one ``interrupted: <interrupted>`` line and exit 130. Warnings are printed as one ``warning:``
    line each, without source locations.
    """
    warnings.showwarning = _warn_in_one_line
    try:
        job()
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return 130
    except ValueError as err:
        message = str(err)
    except OSError as err:
        message = describe_os_error(err)
    except (MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        message = f"out of memory: {_first_line(err)[:200]}; {oom_hint}"
    else:
        return 0
    print(f"error: {message}", file=sys.stderr)
    return 2
