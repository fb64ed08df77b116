"""kernels/launch.py: the kernel wrappers launch on their inputs' GPU, and leave CPU (interpreter) calls alone."""
import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from text2ct_engine.kernels import launch


def test_on_input_device_enters_the_first_tensor_s_cuda_device(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(torch.device(device))
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)

    @launch.on_input_device
    def wrapped(scale, x, y=None):
        """doc kept"""
        return x.shape, len(entered)

    with FakeTensorMode():  # CUDA tensors without a GPU: only their metadata exists
        x = torch.empty(3, 5, device="cuda:1")
        assert wrapped(2.0, x) == ((3, 5), 1)  # inside the device guard while it runs
    assert entered == [torch.device("cuda:1")]
    assert wrapped(2.0, torch.ones(2)) == ((2,), 1) and entered == [torch.device("cuda:1")]  # CPU: no guard
    assert wrapped.__doc__ == "doc kept"


def test_interpreting_reads_the_environment(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert launch.interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not launch.interpreting()
