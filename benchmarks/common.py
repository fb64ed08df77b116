"""Shared pieces of the benchmark scripts: timing on CPU or CUDA, a printed table, a JSON record."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable, Sequence

import torch


@contextlib.contextmanager
def setting(module, name: str, value):
    """Set ``module.name`` to ``value`` for the block (``value`` None: leave it), then restore it: how a
    benchmark times a kernel path other than the default (read by the kernels at each call)."""
    saved = getattr(module, name)
    if value is not None:
        setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def time_fn(fn: Callable[[], object], device: torch.device | str, warmup: int = 2, reps: int = 5) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA events on GPU, perf_counter on CPU)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_mb(fn: Callable[[], object], device: torch.device | str) -> float | None:
    """Peak CUDA memory allocated during ``fn()`` above what was allocated before, in MiB (None on CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Print ``rows`` as an aligned text table over ``columns``."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "-" if v is None else str(v)
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_json(path: str, name: str, device: torch.device | str, rows: Sequence[dict], quiet: bool = False,
               **extra) -> None:
    """Write the rows with the device, date and versions, atomically."""
    record = {"benchmark": name, "device": device_name(device),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "rows": list(rows), **extra}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)
    if not quiet:
        print(f"wrote {path}")


class JsonRecord:
    """A benchmark's rows, rewritten to ``path`` (atomically, quietly) after every added row, so that a run
    cut short (out of time on a lent GPU, out of memory) still leaves every row it measured."""

    def __init__(self, path: str, name: str, device: torch.device | str, **extra) -> None:
        self.path, self.name, self.device, self.extra = path, name, device, dict(extra, complete=False)
        self.rows: list[dict] = []
        self.write()

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        self.write()
        return row

    def write(self, **more) -> None:
        self.extra.update(more)
        write_json(self.path, self.name, self.device, self.rows, quiet=True, **self.extra)

    def finish(self, **more) -> None:
        """The last write, marked complete, and say where it went."""
        self.write(complete=True, **more)
        print(f"wrote {self.path}")
