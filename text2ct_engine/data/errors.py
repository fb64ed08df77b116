"""Bad-data reporting shared by the loaders: one exception type and a log that prints a summary."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TextIO


class BadDataError(Exception):
    """A file (or a row of one) that cannot be used: ``path`` and a one-line ``reason``."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


class DataError(Exception):
    """A data set that cannot be used at all (missing directory or CSV, no valid sample)."""


@dataclass
class BadDataLog:
    """Collects bad files; ``strict`` turns the first one into an exception instead."""

    strict: bool = False
    entries: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: str, reason: str) -> None:
        if self.strict:
            raise BadDataError(path, reason)
        if (str(path), reason) not in self.entries:
            self.entries.append((str(path), reason))

    def extend(self, entries) -> None:
        """Add (path, reason) pairs, e.g. a batch's ``skipped`` list from ``data.ctrate.collate``."""
        for path, reason in entries:
            self.add(path, reason)

    def __len__(self) -> int:
        return len(self.entries)

    def summary(self) -> str:
        if not self.entries:
            return "no bad files"
        lines = [f"{len(self.entries)} bad file(s) skipped:"]
        lines += [f"  {p}: {r}" for p, r in self.entries]
        return "\n".join(lines)

    def print_summary(self, stream: TextIO | None = None) -> None:
        if self.entries:
            print(self.summary(), file=stream or sys.stderr)
