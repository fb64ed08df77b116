"""Triton kernels (installed as ``text2ct_engine.kernels``). One file per op.

On a machine without CUDA, Triton can only run under its interpreter, which must be switched on before
triton is imported; importing this package does that unless the user already chose.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
