"""Accuracy of the phantom finding detector on fresh phantoms (issue 6: >= 97 % per label).

    python benchmarks/bench_findings.py                       # 200 phantoms, 128^3 at 3 mm, seed 123456
    python benchmarks/bench_findings.py --n 20 --seed 7       # quick look

Prints accuracy, false positives/negatives and side accuracy per label, and writes
benchmarks/out/findings.json. The seed is chosen away from the seeds used while tuning the detector.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import write_json  # noqa: E402

from text2ct_engine.evaluate.findings import format_table, selftest  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--size", type=int, nargs=3, default=(128, 128, 128))
    p.add_argument("--seed", type=int, default=123456)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "findings.json"))
    a = p.parse_args()
    res = selftest(a.n, tuple(a.size), seed=a.seed)
    print(format_table(res))
    worst = min(r["accuracy"] for r in res["rows"])
    print(f"{a.n} phantoms {tuple(a.size)} (384 mm FOV), seed {a.seed}: lowest per-label accuracy {100 * worst:.1f}%, "
          f"{res['seconds']:.0f} s")
    write_json(a.out, "findings", "cpu", res["rows"], n=a.n, size=list(a.size), seed=a.seed, errors=res["errors"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
