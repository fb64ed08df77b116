"""Mixed-precision regions: ``torch.autocast``, or a stand-in registered for a device type torch cannot autocast
(the memory planner's emulation of CUDA autocast on its fake ``meta`` device, ``memory/autocast.py``)."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

# device type -> (dtype, or None for "autocast off") -> context. Filled only while the planner plans.
AUTOCAST_STAND_INS: dict[str, Callable[[torch.dtype | None], contextlib.AbstractContextManager]] = {}


def bf16_autocast(device: torch.device, enabled: bool, dtype: torch.dtype = torch.bfloat16
                  ) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bf16 (or ``dtype``) on ``device``'s type when ``enabled``; otherwise nothing at all
    (an enclosing region stays on: see :func:`autocast_off`)."""
    if not enabled:
        return contextlib.nullcontext()
    stand_in = AUTOCAST_STAND_INS.get(device.type)
    return stand_in(dtype) if stand_in is not None else torch.autocast(device.type, dtype=dtype)


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A region where nothing is autocast on ``device``'s type, inside an enclosing autocast region or not."""
    stand_in = AUTOCAST_STAND_INS.get(device.type)
    if stand_in is not None:
        return stand_in(None)
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)
