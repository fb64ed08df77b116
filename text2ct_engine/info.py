"""``python -m text2ct_engine.info``: versions, devices, and which backend each op uses here, and why."""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import sys

import torch

from . import __version__, ops
from .cli import Parser, run_guarded


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def devices() -> list[str]:
    rows = [f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch threads {torch.get_num_threads()}"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
    else:
        rows.append("cuda: not available (torch built " + ("with" if torch.version.cuda else "without")
                    + " CUDA)")
    return rows


def op_backends() -> list[str]:
    """For each op and device type here: the backend chosen and the reason."""
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for dev in device_types:
        x = torch.empty(1, 64, 32, 32, 32, device=dev)  # a VAE-sized activation: size steers the CPU choice
        q = torch.empty(1, 1, 2, 32, device=dev)
        for name, choose, arg in (("group_norm", ops.choose_group_norm_backend, x),
                                  ("attention", ops.choose_attention_backend, q)):
            backend, reason = choose(arg)
            rows.append(f"{name:<11} on {dev:<4}: {backend:<7} ({reason})")
    return rows


def report() -> str:
    lines = [f"text2ct_engine {__version__}", ""]
    lines.append("versions:")
    cuda = torch.version.cuda or "none"
    lines.append(f"  python {platform.python_version()}, torch {torch.__version__} (CUDA {cuda})")
    for pkg in ("triton", "xformers", "monai", "numpy", "nibabel", "safetensors", "tokenizers"):
        lines.append(f"  {pkg}: {package_version(pkg)}")
    lines += ["", "devices:"] + [f"  {r}" for r in devices()]
    lines += ["", "backend:",
              f"  requested: {ops.requested_backend()} (TEXT2CT_BACKEND={os.environ.get('TEXT2CT_BACKEND', 'unset')}, "
              f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')})"]
    lines += [f"  {r}" for r in op_backends()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    Parser(prog="python -m text2ct_engine.info",
           description="Versions, devices, and which backend each op uses here, and why.").parse_args(argv)
    return run_guarded(lambda: print(report()))


if __name__ == "__main__":
    sys.exit(main())
