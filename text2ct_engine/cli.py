"""What every ``python -m text2ct_engine.<verb>`` shares: a user's mistake is one ``error:`` line, exit 2."""
from __future__ import annotations

import sys
import warnings
from typing import Callable


def _warn_in_one_line(message, category, *_args, **_kwargs) -> None:
    print(f"warning: {message}", file=sys.stderr)


def run_guarded(job: Callable[[], object]) -> int:
    """Run ``job``; a ``ValueError`` (the engine's "bad input" signal) becomes one line on stderr and exit 2.

    Warnings are printed as one ``warning:`` line each, without source locations.
    """
    warnings.showwarning = _warn_in_one_line
    try:
        job()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
