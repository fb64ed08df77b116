"""Turn MONAI / MAISI / Text2CT ``.pt`` checkpoints into a model directory.

    python -m text2ct_engine.convert --unet diff_unet.pt --vae autoencoder_epoch273.pt --out models/text2ct

Checkpoints are read with ``torch.load(weights_only=True)`` only: a file that needs code to unpickle is
refused. A checkpoint may be a bare state dict or a dict holding one under a key such as
``unet_state_dict``; the key found is reported. Network settings default to Text2CT's and can be replaced
with a JSON file of MONAI keyword arguments (``--unet-config``, ``--vae-config``).
"""
from __future__ import annotations

import os
import pickle
import re
import sys
from typing import Sequence

import torch

from .cli import Parser, run_guarded, path as cli_path
from .io_utils import atomic_dir, check_creatable, check_replaceable_dir, read_json_object
from .models import AutoencoderKL, DiffusionUNet
from .models.serialization import build_on_meta, strict_load
from .pipeline import PIPELINE_FILE, PipelineConfig, Text2CTPipeline, check_scale_factor

STATE_KEYS = ("unet_state_dict", "autoencoder_state_dict", "state_dict", "model_state_dict", "model",
              "ema_state_dict", "ema", "net", "module")


class ConvertError(ValueError):
    """A checkpoint that cannot become a model directory; the message is one line for the user."""


def load_checkpoint(path: str) -> dict:
    """``torch.load`` with ``weights_only=True``, with one-line errors for missing or unsafe files."""
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found:
            raise ConvertError(f"{path}: refused, it needs code to unpickle ({found.group(1)}) and only plain "
                               f"weights are loaded; re-save it as a state dict") from None
        raise ConvertError(f"{path}: not a readable PyTorch checkpoint (corrupt or another format)") from None
    except Exception as err:  # corrupt zip, truncated file, not a torch file at all
        raise ConvertError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: "
                           f"{str(err).splitlines()[0][:160] if str(err) else ''})") from None
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return obj


def is_state_dict(d: object) -> bool:
    return isinstance(d, dict) and len(d) > 0 and all(isinstance(v, torch.Tensor) for v in d.values())


def find_state_dict(ckpt: dict, path: str, preferred: tuple[str, ...] = ()) -> tuple[dict, str]:
    """The tensors of a checkpoint and where they were found ("<top level>" or the key)."""
    if is_state_dict(ckpt):
        sd, where = ckpt, "<top level>"
    else:
        for key in (*preferred, *STATE_KEYS):
            if is_state_dict(ckpt.get(key)):
                sd, where = ckpt[key], key
                break
        else:
            keys = ", ".join(sorted(map(str, ckpt))[:8]) or "none"
            raise ConvertError(f"{path}: no state dict found (top-level keys: {keys}); expected a bare state "
                               f"dict or one under {', '.join(STATE_KEYS[:4])}, ...")
    if all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd, where = {k[len("module."):]: v for k, v in sd.items()}, where + " (module. prefix removed)"
    return sd, where


def load_into(model: torch.nn.Module, sd: dict, path: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line explanation of any mismatch."""
    try:
        strict_load(model, sd, f"{path}:")
    except ValueError as err:
        flag = "--unet-config" if isinstance(model, DiffusionUNet) else "--vae-config"
        raise ConvertError(f"{err}; pass the matching {flag}") from None


def read_config(path: str | None) -> dict:
    """A JSON object of keyword arguments ({} for no file)."""
    return read_json_object(path, "JSON config") if path is not None else {}


def build(cls, kwargs: dict, path: str | None):
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConvertError(f"{path or 'default config'}: invalid {cls.__name__} settings ({err})") from None


def _looks_like_autoencoder(ckpt: dict) -> bool:
    """Its weights (at the top or one level down) are a MAISI autoencoder's: encoder.* and decoder.* keys."""
    for d in (ckpt, *(v for v in ckpt.values() if isinstance(v, dict))):
        keys = [k for k in d if isinstance(k, str)]
        if any(k.removeprefix("module.").startswith("encoder.") for k in keys) and \
                any(k.removeprefix("module.").startswith("decoder.") for k in keys):
            return True
    return False


def scale_factor_of(ckpt: dict, path: str) -> float:
    """The checkpoint's ``scale_factor`` (a number or a one-value tensor > 0), with one-line errors."""
    found = ckpt.get("scale_factor")
    if found is None:
        if _looks_like_autoencoder(ckpt):
            raise ConvertError(f"{path}: holds autoencoder weights (encoder./decoder. keys), not a diffusion UNet: "
                               f"are --unet and --vae swapped?")
        raise ConvertError(f"{path}: holds no scale_factor; pass --scale-factor (1 / std of the training latents)")
    if isinstance(found, torch.Tensor) and found.numel() != 1:
        raise ConvertError(f"{path}: scale_factor is a tensor of shape {tuple(found.shape)}, not one number; "
                           f"pass --scale-factor")
    try:
        return check_scale_factor(found.item() if isinstance(found, torch.Tensor) else found)
    except ValueError as err:
        raise ConvertError(f"{path}: {err}; pass --scale-factor") from None


def check_output(out: str, force: bool, inputs: tuple[str | None, ...]) -> None:
    """Before anything is loaded: ``out`` must be new (or, with ``force``, a model directory) and creatable."""
    if os.path.lexists(out) and not force:
        raise ConvertError(f"{out} already exists: choose another --out or pass --force to replace it")
    check_replaceable_dir(out, PIPELINE_FILE, inputs)
    check_creatable(out)


def convert(unet_path: str, vae_path: str, out: str, unet_config: str | None = None, vae_config: str | None = None,
            scale_factor: float | None = None, clip_path: str | None = None, tokenizer_path: str | None = None,
            clip_config: str | None = None, force: bool = False, log=print, size: Sequence[int] | None = None,
            spacing: Sequence[float] | None = None) -> Text2CTPipeline:
    """Build the model directory ``out`` from checkpoints; nothing is left behind on error.

    With ``force`` an existing ``out`` is replaced only if it is a model directory (or empty). ``size`` and
    ``spacing`` are ``pipeline.json``'s defaults for sampling (default: Text2CT's 512x512x128 at 0.75x0.75x3
    mm). Every setting and input path is checked before the first checkpoint is read."""
    check_output(out, force, (unet_path, vae_path, unet_config, vae_config, clip_path, tokenizer_path, clip_config))
    if scale_factor is not None:
        try:
            scale_factor = check_scale_factor(scale_factor)
        except ValueError as err:
            raise ConvertError(f"--scale-factor: {err}") from None
    unet_kwargs, vae_kwargs, clip_kwargs = read_config(unet_config), read_config(vae_config), read_config(clip_config)
    inputs = (("--unet", unet_path), ("--vae", vae_path), ("--clip", clip_path), ("--tokenizer", tokenizer_path))
    for flag, path in inputs:
        if path is not None and not os.path.isfile(path):
            raise ConvertError(f"{flag} {path}: no such file")
    if clip_path is not None:
        from .text import check_clip_inputs
        try:
            check_clip_inputs(clip_path, tokenizer_path, clip_kwargs)
        except ValueError as err:
            raise ConvertError(str(err)) from None
    with build_on_meta():  # the layouts and the sampling defaults, checked before any weight is read
        probe = Text2CTPipeline(build(DiffusionUNet, unet_kwargs, unet_config), build(AutoencoderKL, vae_kwargs,
                                                                                     vae_config))
    defaults = PipelineConfig()
    try:
        size = probe.check_size(defaults.size if size is None else size)
        spacing = probe.check_spacing(defaults.spacing if spacing is None else spacing)
    except ValueError as err:
        raise ConvertError(f"--size / --spacing: {err}") from None
    unet_ckpt = load_checkpoint(unet_path)
    unet_sd, where = find_state_dict(unet_ckpt, unet_path, ("unet_state_dict",))
    log(f"unet: {len(unet_sd)} tensors from {where} of {unet_path}")
    if scale_factor is None:
        scale_factor = scale_factor_of(unet_ckpt, unet_path)
        log(f"scale_factor: {scale_factor:.6g} from {unet_path}")
    vae_ckpt = load_checkpoint(vae_path)
    vae_sd, where = find_state_dict(vae_ckpt, vae_path, ("autoencoder_state_dict",))
    log(f"vae: {len(vae_sd)} tensors from {where} of {vae_path}")
    unet = build(DiffusionUNet, unet_kwargs, unet_config)
    vae = build(AutoencoderKL, vae_kwargs, vae_config)
    load_into(unet, unet_sd, unet_path)
    load_into(vae, vae_sd, vae_path)
    text_encoder = tokenizer = None
    if clip_path is not None:
        from .text import convert_clip_checkpoint
        text_encoder, tokenizer, what = convert_clip_checkpoint(load_checkpoint(clip_path), clip_path,
                                                                tokenizer_path, clip_kwargs or None)
        log(f"clip text tower: {what} from {clip_path}")
    pipe = Text2CTPipeline(unet.eval(), vae.eval(), PipelineConfig(scale_factor=scale_factor, size=size,
                                                                   spacing=spacing), text_encoder, tokenizer)
    with atomic_dir(out, marker=PIPELINE_FILE) as tmp:
        pipe.save_pretrained(tmp)
    log(f"wrote {out}")
    return pipe


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m text2ct_engine.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--unet", type=cli_path, required=True, help="diffusion UNet checkpoint (.pt)")
    p.add_argument("--vae", type=cli_path, required=True, help="MAISI autoencoder checkpoint (.pt)")
    p.add_argument("--out", type=cli_path, required=True, help="model directory to create")
    p.add_argument("--unet-config", type=cli_path, help="JSON file of DiffusionModelUNetMaisi keyword arguments")
    p.add_argument("--vae-config", type=cli_path, help="JSON file of AutoencoderKlMaisi keyword arguments")
    p.add_argument("--scale-factor", type=float, help="latent scale factor (default: read from the UNet checkpoint)")
    p.add_argument("--clip", type=cli_path, help="Text2CT CLIP checkpoint (.pt) holding the text tower")
    p.add_argument("--tokenizer", type=cli_path, help="tokenizer.json to ship with the CLIP text tower")
    p.add_argument("--clip-config", type=cli_path,
                   help="JSON file of the text tower's settings (heads, activation; HF names)")
    p.add_argument("--size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="default output voxels of sample (default 512 512 128, Text2CT's)")
    p.add_argument("--spacing", type=float, nargs=3, metavar=("SX", "SY", "SZ"),
                   help="default mm per voxel (default 0.75 0.75 3, Text2CT's)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    return run_guarded(lambda: convert(args.unet, args.vae, args.out, args.unet_config, args.vae_config,
                                       args.scale_factor, args.clip, args.tokenizer, args.clip_config, args.force,
                                       size=args.size, spacing=args.spacing))


if __name__ == "__main__":
    sys.exit(main())
