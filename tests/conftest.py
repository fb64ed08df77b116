"""Test set-up: Triton kernels run under the interpreter on this CPU-only machine."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Test tensors are tiny: one thread avoids OpenMP start-up and spin costs that made tiny 3D convs 5-10x slower
# on the 2-core machines when anything else was running.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
