"""A command run on a busy CPU waits passively between OpenMP regions (text2ct_engine/__init__.py); a library
import and a user's own choice are left alone."""
import os
import subprocess
import sys

from text2ct_engine import BUSY_LOAD, openmp_wait_policy


def test_passive_waits_only_on_a_busy_cpu_and_never_over_the_users_choice():
    assert openmp_wait_policy(BUSY_LOAD, {}) == openmp_wait_policy(3.7, {"PATH": "/bin"}) == "PASSIVE"
    assert openmp_wait_policy(BUSY_LOAD - 0.01, {}) is None and openmp_wait_policy(None, {}) is None
    assert openmp_wait_policy(3.7, {"OMP_WAIT_POLICY": "ACTIVE"}) is None
    assert openmp_wait_policy(3.7, {"GOMP_SPINCOUNT": "1000"}) is None


def test_a_library_import_does_not_touch_the_environment():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", "import os, text2ct_engine; print(os.environ.get('OMP_WAIT_POLICY'))"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "None", out.stderr
