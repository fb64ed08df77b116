"""python -m text2ct_engine.info names versions, devices and the backend of each op, with reasons."""
import os
import subprocess
import sys

import pytest

from text2ct_engine import info, ops


def test_report_lists_versions_devices_and_backends():
    text = info.report()
    assert "torch" in text and "triton" in text and "cpu:" in text
    for op in ("group_norm", "attention"):
        line = next(l for l in text.splitlines() if l.strip().startswith(op))
        assert "(" in line and ")" in line  # a reason is given


def test_forced_backend_is_reported():
    with ops.backend("torch"):
        rows = info.op_backends()
    assert all(": torch" in r for r in rows if " on cpu" in r)


def test_bad_backend_variable_gives_one_line():
    env = dict(os.environ, TEXT2CT_BACKEND="bogus")
    r = subprocess.run([sys.executable, "-m", "text2ct_engine.info"], capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: unknown backend 'bogus' from TEXT2CT_BACKEND: choose one of auto, triton, torch, cpp"]


def test_backend_context_manager_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        with ops.backend("gpu"):
            pass
