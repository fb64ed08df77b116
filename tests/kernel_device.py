"""Where the kernel tests put their tensors: the CPU (Triton interpreter) unless TEXT2CT_TEST_DEVICE says
otherwise (``cuda`` on a GPU machine: the same tests on compiled kernels)."""
import os

import torch  # does not import triton: TRITON_INTERPRET may still be set after this

DEVICE = torch.device(os.environ.get("TEXT2CT_TEST_DEVICE", "cpu"))
ON_GPU = DEVICE.type != "cpu"
