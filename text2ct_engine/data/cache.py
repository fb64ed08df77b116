"""Latent cache: encode every volume of a data set once with the VAE and store the latents on disk.

Layout of a cache directory::

    index.json                      config, shard list, one entry per volume, skipped files
    shard-00000.safetensors         "<VolumeName>/mu" and "<VolumeName>/sigma" tensors (C, x, y, z)
    ...

Shards and the index are written atomically (temp file + rename), the index after each shard, so an
interrupted run loses at most the shard in progress; running again resumes with the volumes not yet in the
index. The index records the split, the data set's folder, the preprocessing and the VAE (its path and a
digest of its weights): a cache made with other settings is refused rather than mixed. The VAE is any
module with ``encode(x) -> (mu, sigma)`` (the engine's :class:`AutoencoderKL`); latents are stored unscaled
(the diffusion trainer applies ``scale_factor``). Large volumes go through the engine's exact tiled encoder
(:mod:`text2ct_engine.tiling`): the same latents to float rounding, and at 512x512x128 in bf16 a GPU peak of
1.2 GiB with its activations in host RAM instead of 16.1 GiB (planned on fake tensors), so an 8 GB card can
build a full-size cache (a 12 GB card or more keeps them on the GPU: 5.2 GiB).

CLI::

    python -m text2ct_engine.data.cache --data data/phantom --vae model_dir --out cache/phantom \\
        --size 128 128 128 --spacing 3 3 3 --workers 2
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
from typing import Any, Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from ..cli import Parser as CLIParser, path as cli_path, run_guarded, slab as cli_slab
from ..io_utils import atomic_path, check_creatable, write_json
from ..tiling import SlabEncoder, auto_slab
from .ctrate import CTRATEDataset, collate, dataset_root
from .errors import BadDataError, DataError
from .labels import CTRATE_LABELS

INDEX = "index.json"
FORMAT = "text2ct-latent-cache"


def load_index(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, INDEX)
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        idx = json.load(fh)
    if idx.get("format") != FORMAT:
        raise DataError(f"{path} is not a latent-cache index")
    return idx


def module_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes): the same weights, the same digest."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_config(ds: CTRATEDataset, vae_name: str, dtype: torch.dtype, vae_weights: str = "") -> dict:
    """What a cache's latents depend on: split, data folder, preprocessing, VAE (name and weights), dtype."""
    return {"split": ds.split, "data": os.path.realpath(dataset_root(ds.root)),
            "target_spacing": ds.target_spacing, "target_size": ds.target_size, "mode": ds.mode,
            "window": list(ds.window), "vae": vae_name, "vae_weights": vae_weights,
            "dtype": str(dtype).replace("torch.", ""), "labels": list(CTRATE_LABELS)}


# Settings recorded by earlier versions that compute the same latents to float rounding as today's.
SAME_AS = {"compute": {"bf16-autocast": "bf16"}}  # bf16 autocast (before 2026-12-01) vs a bf16 VAE copy


def _check_same_config(out_dir: str, have: dict, want: dict) -> None:
    """One-line ``DataError`` naming the settings in which the cache ``out_dir`` differs from this run's."""
    have, want = json.loads(json.dumps(have)), json.loads(json.dumps(want))
    for key, same in SAME_AS.items():
        if key in have:
            have[key] = same.get(have[key], have[key])
    changed = [k for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
    if changed:
        diff = "; ".join(f"{k}: {have.get(k)!r} there, {want.get(k)!r} here" for k in changed if k != "labels")
        raise DataError(f"{out_dir} holds a cache made with other settings ({diff or 'labels'}); use another --out")


def volume_encoder(vae: torch.nn.Module, device: torch.device, size: Sequence[int] | None,
                   slab: int | str | None = "auto", storage: str = "auto", host_memory: str = "low"
                   ) -> Callable[[torch.Tensor], Any]:
    """``encode(x)`` for the cache: on a GPU in bf16 (a bf16 copy of the VAE: half the memory of fp32),
    on the CPU in the VAE's dtype. ``slab`` rows per slab of the exact tiled encoder (``tiling``: the same
    latents to float rounding in a fraction of the memory; the image stays on the host), None for one piece,
    "auto" to tile the engine's VAE where its widest activation at ``size`` exceeds 256 MiB and it has a slab
    form (no attention blocks). An explicit slab that cannot be used is refused here, before any work."""
    from ..models import AutoencoderKL

    vae = copy.deepcopy(vae).to(device, torch.bfloat16) if device.type == "cuda" else vae.to(device)
    vae.eval()
    weights = next(vae.parameters())
    engine_vae = isinstance(vae, AutoencoderKL)
    if slab == "auto":
        tileable = engine_vae and size and SlabEncoder.refusal(vae) is None
        slab = auto_slab(size, vae.config.num_channels[0], weights.dtype.itemsize) if tileable else None
    if slab is None:
        return lambda x: vae.encode(x.to(device, weights.dtype))
    if not engine_vae:
        raise ValueError(f"tiled encoding needs the engine's AutoencoderKL, not {type(vae).__name__}: "
                         f"use --encode-slab 0")
    try:
        return SlabEncoder(vae, slab, storage, host_memory)
    except ValueError as err:
        raise ValueError(f"{err} (--encode-slab 0)") from None


@torch.no_grad()
def build_latent_cache(dataset: CTRATEDataset, vae: torch.nn.Module, out_dir: str, shard_size: int = 32,
                       batch_size: int = 1, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float16,
                       workers: int = 0, vae_name: str = "", progress: bool = True, slab: int | str | None = "auto",
                       storage: str = "auto", host_memory: str = "low") -> dict:
    """Encode the volumes of ``dataset`` not yet in ``out_dir``'s index; returns the index.

    A cache built from another split or data folder, with other preprocessing or another VAE (name or
    weights) is refused (``DataError``) rather than mixed. ``slab``, ``storage`` and ``host_memory`` steer
    the exact tiled encoder (:func:`volume_encoder`); they change memory and time, the latents only by float
    rounding (so a cache may be resumed with other values).
    Bad volumes are skipped and listed under ``skipped`` (or raise with ``dataset.strict``).
    """
    from tqdm import tqdm

    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"--out {out_dir} exists and is not a folder: give a cache folder (new or resumed)")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, INDEX)):
        raise DataError(f"--out {out_dir} holds files but no {INDEX}: it is not a latent cache; give a new or "
                        f"empty folder, or an existing cache to resume")
    if not os.path.isdir(out_dir):
        check_creatable(out_dir)  # now: the folder itself is made with the first shard (see flush)
    config = cache_config(dataset, vae_name, dtype, module_digest(vae))
    device = torch.device(device)
    if device.type == "cuda":  # encoded in bf16 (see volume_encoder)
        config["compute"] = "bf16"
    idx = load_index(out_dir) or {"format": FORMAT, "version": 1, "config": config, "shards": [], "entries": {},
                                  "skipped": []}
    _check_same_config(out_dir, idx["config"], config)
    done = set(idx["entries"])
    todo = [i for i, r in enumerate(dataset.records) if r.name not in done]
    if not todo:
        return idx
    loader = DataLoader(_Subset(dataset, todo), batch_size=batch_size, num_workers=workers, collate_fn=collate)
    encode = volume_encoder(vae, device, dataset.target_size, slab, storage, host_memory)
    buf: dict[str, torch.Tensor] = {}
    meta: dict[str, dict] = {}
    skipped_before = {tuple(s) for s in idx["skipped"]}

    def flush() -> None:
        if not buf:
            return
        name = f"shard-{len(idx['shards']):05d}.safetensors"
        os.makedirs(out_dir, exist_ok=True)  # made with the first shard: a run that stops before leaves nothing
        path = os.path.join(out_dir, name)
        with atomic_path(path) as tmp:
            save_file(buf, tmp, metadata={"format": "pt"})
        idx["shards"].append(name)
        for k, m in meta.items():
            idx["entries"][k] = {**m, "shard": name}
        write_json(os.path.join(out_dir, INDEX), idx)
        buf.clear()
        meta.clear()

    bar = tqdm(total=len(todo), desc="encoding", unit="vol", disable=not progress)
    for batch in loader:
        for path, reason in batch["skipped"]:
            if (path, reason) not in skipped_before:
                idx["skipped"].append([path, reason])
        bar.update(len(batch["skipped"]))
        if batch["volume"] is None:
            continue
        out = encode(batch["volume"])
        mu, sigma = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
        for j, name in enumerate(batch["name"]):
            buf[f"{name}/mu"] = mu[j].to(dtype).cpu().contiguous()
            if sigma is not None:
                buf[f"{name}/sigma"] = sigma[j].to(dtype).cpu().contiguous()
            rec = dataset.records[dataset.index_of(name)]
            meta[name] = {"text": batch["text"][j], "spacing": batch["spacing"][j].tolist(),
                          "labels": rec.labels, "source": rec.path, "shape": list(mu[j].shape),
                          "has_sigma": sigma is not None}
            bar.update(1)
            if len(meta) >= shard_size:
                flush()
    flush()
    if idx["skipped"]:
        os.makedirs(out_dir, exist_ok=True)
        write_json(os.path.join(out_dir, INDEX), idx)
    bar.close()
    return idx


class _Subset(Dataset):
    def __init__(self, ds: CTRATEDataset, indices: Sequence[int]):
        self.ds, self.indices = ds, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.ds[self.indices[i]]


class LatentCacheDataset(Dataset):
    """Samples of a latent cache: ``mu``, ``sigma`` (or None), ``text``, ``labels``, ``spacing``, ``name``.

    ``sample=True`` adds ``latent`` = mu + sigma * eps, eps drawn from a generator seeded with ``(seed, i)``:
    the same draw for the same seed and item (a trainer that wants a fresh draw per step draws eps itself).
    """

    def __init__(self, cache_dir: str, sample: bool = False, seed: int = 0):
        idx = load_index(cache_dir)
        if idx is None:
            raise DataError(f"{cache_dir} has no {INDEX}: not a latent cache")
        self.dir, self.sample, self.seed = cache_dir, sample, seed
        self.config = idx["config"]
        self.names = sorted(idx["entries"])
        self.entries = idx["entries"]
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.names)

    def _open(self, shard: str):
        if shard not in self._handles:  # one handle per shard and per worker process
            self._handles[shard] = safe_open(os.path.join(self.dir, shard), framework="pt")
        return self._handles[shard]

    def __getitem__(self, i: int) -> dict[str, Any]:
        name = self.names[i]
        e = self.entries[name]
        f = self._open(e["shard"])
        mu = f.get_tensor(f"{name}/mu").float()
        sigma = f.get_tensor(f"{name}/sigma").float() if e.get("has_sigma") else None
        out = {"name": name, "text": e["text"], "spacing": torch.tensor(e["spacing"], dtype=torch.float32),
               "labels": torch.tensor(e["labels"], dtype=torch.float32) if e.get("labels") is not None else None,
               "mu": mu, "sigma": sigma}
        if self.sample:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            out["latent"] = mu + (sigma if sigma is not None else 0) * torch.randn(mu.shape, generator=generator)
        return out

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


# ------------------------------------------------------------------------------------------------ CLI
def vae_dir_of(path: str) -> str:
    """The VAE directory of a model directory (``DIR/vae``), or ``path`` itself."""
    return os.path.join(path, "vae") if os.path.isdir(os.path.join(path, "vae")) else path


def load_vae(path: str, device: str = "cpu") -> torch.nn.Module:
    """The engine's AutoencoderKL from a model directory (``DIR/vae``) or a VAE directory."""
    from ..models import AutoencoderKL

    return AutoencoderKL.from_pretrained(vae_dir_of(path), device=device)


def main(argv: list[str] | None = None) -> int:
    p = CLIParser(prog="python -m text2ct_engine.data.cache",
                  description="Encode a CT-RATE-layout data set into a latent cache.")
    p.add_argument("--data", type=cli_path, required=True,
                   help="CT-RATE-layout directory (holding dataset/ or its contents)")
    p.add_argument("--vae", type=cli_path, required=True, help="model directory (with vae/) or VAE directory")
    p.add_argument("--out", type=cli_path, required=True, help="cache directory (resumed if it exists)")
    p.add_argument("--split", default="train", choices=("train", "valid"))
    p.add_argument("--size", type=int, nargs=3, default=(512, 512, 128), metavar=("X", "Y", "Z"))
    p.add_argument("--spacing", type=float, nargs=3, default=(0.75, 0.75, 3.0), metavar=("SX", "SY", "SZ"))
    p.add_argument("--mode", choices=("crop_pad", "resize"), default="crop_pad")
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    p.add_argument("--encode-slab", type=cli_slab, default="auto",
                   help="rows per slab of the exact tiled VAE encoder (same latents, a fraction of the memory), "
                        "0 for no tiling, auto (default: tile where the widest activation exceeds 256 MiB)")
    p.add_argument("--encode-host-memory", choices=("low", "fast"), default="low",
                   help="tiled encoder: low (default) recomputes the full-resolution level's first two convs to "
                        "keep ~half as much (~1.2x the conv work); fast stores every activation, each conv once")
    p.add_argument("--encode-storage", choices=("auto", "host", "device"), default="auto",
                   help="tiled encoder on a GPU: keep its activations on the GPU when they fit its free memory "
                        "(auto, default), always in host RAM (host: least GPU memory), or on the GPU (device)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad file")
    a = p.parse_args(argv)
    if a.shard_size < 1 or a.batch_size < 1 or a.workers < 0:
        p.error("--shard-size and --batch-size must be >= 1, --workers >= 0")
    if any(s < 1 for s in a.size) or any(s <= 0 for s in a.spacing):
        p.error("--size and --spacing must be positive")
    size = " ".join(map(str, a.size))
    hint = (f"encoding at --size {size} on {a.device}: use --batch-size 1, --encode-slab 8 --encode-storage host "
            f"(the exact tiled encoder), a smaller --size, or a device with more memory; the shards written so far "
            f"are kept and a rerun resumes")
    return run_guarded(lambda: _run(a), oom_hint=hint,
                       interrupted="the shards written so far are complete; the same command resumes from them")


def _run(a: argparse.Namespace) -> None:
    """The command's job; bad data and bad arguments are one ``ValueError`` line (see ``cli.run_guarded``)."""
    try:
        ds = CTRATEDataset(a.data, a.split, a.spacing, a.size, a.mode, strict=a.strict)
        if not len(ds):
            raise DataError(f"no usable volume in {a.data}")
        from ..pipeline import available_device
        device = available_device(a.device)
        vae = load_vae(a.vae)  # on the CPU: the encoder takes a copy to --device (in bf16 on a GPU)
        f = vae.config.downsample_factor
        if any(s % f for s in a.size):
            raise DataError(f"--size {' '.join(map(str, a.size))} must be multiples of the VAE's downsampling "
                            f"factor {f} (or volumes lose their last rows): e.g. --size "
                            f"{' '.join(str(max(f, s // f * f)) for s in a.size)}")
        idx = build_latent_cache(ds, vae, a.out, a.shard_size, a.batch_size, device, getattr(torch, a.dtype),
                                 a.workers, vae_name=os.path.abspath(a.vae), slab=a.encode_slab,
                                 storage=a.encode_storage, host_memory=a.encode_host_memory)
    except (DataError, BadDataError) as e:
        raise ValueError(str(e)) from None
    print(f"{len(idx['entries'])} latents in {a.out} ({len(idx['skipped'])} skipped)")
    for path, reason in idx["skipped"]:
        print(f"  skipped {path}: {reason}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
