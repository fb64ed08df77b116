"""VAE decode (or encode, ``--encode``): time and peak memory of the untiled pass against the exact tiled
pass's host-memory modes.

The VAE is Text2CT's MAISI layout (num_channels [64, 128, 256], 2 ResBlocks per level, 32 groups) with
random weights; the latent is random (seeded), 4 x D x H x W, decoded to 4D x 4H x 4W. Each variant runs in
its own process, one after the other, so that each peak RSS (``ru_maxrss``) is its own; "extra" is that
peak minus the RSS just before the decode (model and latent built, torch loaded). On the CPU the slabs'
working memory is in the RSS too; on a GPU the device peak is ``torch.cuda.max_memory_allocated`` and the
host RSS holds the stored activations. Every tiled output is compared with the untiled one (max |difference|,
against max |untiled|). ``stored`` is the decoder's own count of the bytes of whole activations it held at
once (``SlabDecoder.peak_stored_bytes``). Times are wall and CPU (user + system) seconds of one decode, and
their ratios to the first variant's; on one thread (the default) and a shared machine, CPU seconds are the
steadier measure of the work done.

    python benchmarks/bench_tiled_decode.py                          # 128x128x64 output, fp32, slab 32
    python benchmarks/bench_tiled_decode.py --slab 8                 # slab/length as slab 32 at 512 rows
    git show 8239c05:text2ct_engine/tiling.py > /tmp/old_tiling.py   # the decoder before host_memory
    python benchmarks/bench_tiled_decode.py --old-tiling /tmp/old_tiling.py
    python benchmarks/bench_tiled_decode.py --count --latent 128 128 32 --dtype bf16 --old-tiling /tmp/old_tiling.py

``--count`` runs no decode: at any size (512x512x128 above) it counts, on fake tensors computing on the
``meta`` device with activations stored on the ``cpu``, the conv FLOPs and the bytes each variant copies
between host and device, and the tiled decoders' peak stored bytes.

``--encode`` times the encoder instead, as the latent cache runs it: a random image of the output size (on
the host; the untiled encode moves it to the device) to latent mean and standard deviation, both compared
(the ``old`` variant is decode-only):

    python benchmarks/bench_tiled_decode.py --encode --variants untiled,fast,low
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, print_table, write_json  # noqa: E402

from text2ct_engine.memory import materialize  # noqa: E402
from text2ct_engine.models import AutoencoderKL  # noqa: E402
from text2ct_engine.tiling import SlabDecoder, SlabEncoder  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VARIANTS = ("untiled", "old", "fast", "low")
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def rss_mib() -> float:
    """Resident set size of this process now, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all threads), in seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def old_decoder(path: str):
    """``tiled_decode`` of an earlier ``tiling.py`` (saved from git), loaded inside the package."""
    spec = importlib.util.spec_from_file_location("text2ct_engine._old_tiling", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.tiled_decode


@torch.no_grad()
def run_variant(variant: str, vae: AutoencoderKL, z: torch.Tensor, args: argparse.Namespace,
                storage: str | None = None) -> tuple[torch.Tensor, int | None]:
    """Decode ``z`` (with ``--encode``: encode the image ``z`` to mean and std, stacked) one way; the output
    and the tiled pass's peak stored bytes (None where not counted)."""
    if args.encode:
        if variant == "untiled":
            weights = next(vae.parameters())
            return torch.stack(vae.encode(z.to(weights.device, weights.dtype))), None
        encoder = SlabEncoder(vae, args.slab, storage or "host", host_memory=variant)
        return torch.stack(encoder(z)), encoder.peak_stored_bytes
    if variant == "untiled":
        return vae.decode(z), None
    if variant == "old":
        return old_decoder(args.old_tiling)(vae, z, args.slab, storage=storage), None
    decoder = SlabDecoder(vae, args.slab, storage or "host", host_memory=variant)
    return decoder(z), decoder.peak_stored_bytes


class Traffic(TorchDispatchMode):
    """Conv FLOPs (2 per multiply-add) and bytes copied from host to device and back, op by op."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = self.h2d = self.d2h = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name == "convolution":
            self.flops += 2 * out.numel() * args[1][0].numel()
        elif name in ("_to_copy", "copy_"):
            src, dst = (args[1], args[0]) if name == "copy_" else (args[0], out)
            if src.device != dst.device:
                nbytes = src.numel() * src.element_size()
                if src.device.type == "cpu":
                    self.h2d += nbytes
                else:
                    self.d2h += nbytes
        return out


def pass_input(args: argparse.Namespace, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """The decoder's random latent on ``device``, or with ``--encode`` the encoder's random image in [0, 1] of
    the output size, on the host in float32 (as the latent cache reads it)."""
    g = torch.Generator().manual_seed(1)
    if args.encode:
        return torch.rand(1, 1, *(4 * s for s in args.latent), generator=g)
    return torch.randn(1, 4, *args.latent, generator=g).to(device, dtype)


def count(args: argparse.Namespace, variants: list[str]) -> list[dict]:
    """Each variant on fake tensors, computing on the fake ``meta`` device (the GPU) with activations stored
    on the fake ``cpu`` (the host): its conv work and host-device traffic, no time."""
    with torch.device("meta"):
        vae = AutoencoderKL().eval()
    rows = []
    for variant in variants:
        traffic = Traffic()
        with FakeTensorMode():
            materialize(vae, "meta", DTYPES[args.dtype])
            z = pass_input(args, "meta", DTYPES[args.dtype])
            with traffic:
                _, stored = run_variant(variant, vae, z, args, storage="cpu")
        rows.append({"variant": variant, "conv_tflop": round(traffic.flops / 1e12, 1),
                     "host_to_device_gib": round(traffic.h2d / 2**30, 1),
                     "device_to_host_gib": round(traffic.d2h / 2**30, 1),
                     "stored_gib": None if stored is None else round(stored / 2**30, 2)})
    return rows


def decode(args: argparse.Namespace) -> dict:
    """One variant in this process: build, decode once, save the output; time and memory figures."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    vae = AutoencoderKL().eval().to(device, dtype)
    z = pass_input(args, device, dtype)
    before = rss_mib()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    cpu_start = cpu_seconds()
    start = time.perf_counter()
    variant, _, storage = args.child.partition("@")  # "low@device": host_memory low, stored on the GPU
    out, stored = run_variant(variant, vae, z, args, storage or None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.save(out.float().cpu(), args.save)
    return {"variant": args.child, "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
            "rss_before_mib": round(before),
            "peak_rss_mib": round(peak), "extra_rss_mib": round(peak - before),
            "stored_mib": None if stored is None else round(stored / 2**20),
            "device_peak_mib": round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None}


def run_child(variant: str, args: argparse.Namespace, folder: str) -> dict:
    save = os.path.join(folder, f"{variant}.pt")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--save", save, "--device", args.device,
           "--dtype", args.dtype, "--slab", str(args.slab), "--threads", str(args.threads),
           "--latent", *map(str, args.latent)] + (["--encode"] if args.encode else [])
    if args.old_tiling:
        cmd += ["--old-tiling", args.old_tiling]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["save"] = save
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latent", type=int, nargs=3, default=[32, 32, 16], metavar=("D", "H", "W"),
                   help="latent size (default 32 32 16: a 128x128x64 output)")
    p.add_argument("--slab", type=int, default=32)
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: CPU seconds then measure work, without OpenMP spin-waits)")
    p.add_argument("--variants", default="untiled,old,fast,low",
                   help=f"comma list of {', '.join(VARIANTS)} (old needs --old-tiling)")
    p.add_argument("--old-tiling", help="an earlier text2ct_engine/tiling.py to time as the 'old' variant")
    p.add_argument("--storage", default="host",
                   help="comma list of host, device, auto: where fast/low keep their activations (a GPU matter: "
                        "on a CPU all three are the CPU); rows other than host are named like low@device")
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/out/tiled_<decode|encode>_<device>_slab<slab>.json)")
    p.add_argument("--count", action="store_true",
                   help="count conv FLOPs and host<->device bytes on fake tensors instead of timing (any size)")
    p.add_argument("--encode", action="store_true",
                   help="time the VAE encoder on an image of the output size instead of the decoder")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(decode(args)))
        return
    variants = [v for v in args.variants.split(",") if v != "old" or (args.old_tiling and not args.encode)]
    name, verb = ("tiled_encode", "encode") if args.encode else ("tiled_decode", "decode")
    storages = [st for st in args.storage.split(",") if st]
    if set(storages) - {"host", "device", "auto"}:
        p.error(f"--storage takes host, device and auto, got {args.storage!r}")
    if args.count:
        rows = count(args, variants)
        print(f"VAE {verb} {'to' if args.encode else 'of'} a 4x{'x'.join(map(str, args.latent))} latent, "
              f"{args.dtype}, slab {args.slab}, "
              f"counted on fake tensors (GPU = meta, host = cpu)")
        print_table(rows, list(rows[0]))
        write_json(args.out or os.path.join(OUT, f"{name}_count.json"), f"{name}_count", "meta", rows,
                   command=" ".join(sys.argv), latent=args.latent, dtype=args.dtype, slab=args.slab)
        return
    runs = [v if v in ("untiled", "old") or st == "host" else f"{v}@{st}"
            for v in variants for st in (storages if v in ("fast", "low") else storages[:1])]
    out_size = "x".join(str(4 * s) for s in args.latent)
    json_path = args.out or os.path.join(OUT, f"{name}_{torch.device(args.device).type}_slab{args.slab}.json")
    meta = dict(command=" ".join(sys.argv), output=out_size, dtype=args.dtype, slab=args.slab, threads=args.threads)
    with tempfile.TemporaryDirectory() as folder:
        rows = []
        for v in runs:  # each variant's figures are on disk as soon as it has run
            rows.append(run_child(v, args, folder))
            write_json(json_path, name, args.device, [{k: r[k] for k in r if k != "save"} for r in rows],
                       quiet=True, complete=False, **meta)
        ref = torch.load(rows[0]["save"]) if rows[0]["variant"] == "untiled" else None
        for row in rows:
            out = torch.load(row.pop("save"))
            row["max_abs_diff"] = None if ref is None else float((out - ref).abs().max())
            row["ref_max_abs"] = None if ref is None else float(ref.abs().max())
    for key in ("seconds", "cpu_seconds"):
        for row in rows:
            row[f"{key}_x"] = round(row[key] / rows[0][key], 2)
    torch.set_num_threads(args.threads)
    print(f"VAE {verb} {'of' if args.encode else 'to'} {out_size}, {args.dtype}, slab {args.slab}, "
          f"on {device_name(args.device)}")
    print_table(rows, ["variant", "seconds", "seconds_x", "cpu_seconds", "cpu_seconds_x", "peak_rss_mib",
                       "extra_rss_mib", "stored_mib", "device_peak_mib", "max_abs_diff", "ref_max_abs"])
    write_json(json_path, name, args.device, rows, complete=True, **meta)


if __name__ == "__main__":
    main()
