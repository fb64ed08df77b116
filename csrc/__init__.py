"""C++ (OpenMP) CPU kernels, installed as package data of ``text2ct_engine.csrc``.

They are compiled on first use by ``text2ct_engine.ops.cpp_ext`` (``torch.utils.cpp_extension.load``), not at
install time, so installing the engine never needs a compiler.
"""
