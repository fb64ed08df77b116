"""Test set-up: Triton kernels run under the interpreter on this CPU-only machine.

On a GPU, ``TEXT2CT_TEST_DEVICE=cuda pytest tests/test_group_norm.py tests/test_attention.py`` runs the
tests marked ``kernel`` on compiled kernels instead (the interpreter stays off) and skips the rest.
"""
import os

from kernel_device import DEVICE

if DEVICE.type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Test tensors are tiny: one thread avoids OpenMP start-up and spin costs that made tiny 3D convs 5-10x slower
# on the 2-core machines when anything else was running.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if DEVICE.type == "cpu":
        return
    skip = pytest.mark.skip(reason=f"TEXT2CT_TEST_DEVICE={DEVICE} runs only the tests marked 'kernel'")
    for item in items:
        if "kernel" not in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
