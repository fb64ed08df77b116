"""text2ct_engine: text-to-CT 3D latent diffusion on custom Triton kernels, in little GPU memory."""
from __future__ import annotations

import os as _os
import sys as _sys

__version__ = "0.1.0"

BUSY_LOAD = 0.5  # 1-minute load average from which a command treats the CPU as shared with other jobs


def openmp_wait_policy(load: float | None, environ: dict[str, str]) -> str | None:
    """The ``OMP_WAIT_POLICY`` a command sets before torch loads: ``"PASSIVE"`` when other jobs keep the CPU
    busy (``load`` >= ``BUSY_LOAD``) and the user chose no wait policy; else None (OpenMP's default).

    OpenMP threads spin between parallel regions by default; on cores that other processes also want, the
    spinning steals the time the working threads need (the demo model's sampling took 122 s instead of 12 s on
    the 2-core CI machine beside two busy loops; on the idle machine passive waits cost 20-40 %).
    """
    if load is None or load < BUSY_LOAD or "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return None
    return "PASSIVE"


def _set_openmp_wait_policy() -> None:
    """For ``python -m text2ct_engine.<command>`` only (``sys.argv[0]`` is "-m" while Python imports the
    package of a ``-m`` module), before torch is loaded: a library import changes nothing."""
    if _sys.argv[:1] != ["-m"] or "torch" in _sys.modules:
        return
    try:
        load = _os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return
    policy = openmp_wait_policy(load, dict(_os.environ))
    if policy is not None:
        _os.environ["OMP_WAIT_POLICY"] = policy


_set_openmp_wait_policy()
