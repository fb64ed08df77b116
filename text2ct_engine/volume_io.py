"""Writing generated volumes: int16 HU NIfTI with the affine from the spacing, and a PNG preview montage.

Arrays are (X, Y, Z) in RAS+ (axis 0 left->right, 1 posterior->anterior, 2 inferior->superior), so the
affine is diag(sx, sy, sz). Every write is atomic and never replaces an existing file unless asked.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from .data.nifti import write_volume
from .io_utils import atomic_path, check_creatable


def check_writable(path: str | os.PathLike, overwrite: bool) -> str:
    """Raise ``ValueError`` (one line) unless ``path`` can be written now; returns it as a string."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory: give a file path")
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{path} already exists: choose another path or pass --force to overwrite")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"cannot write {path}: {folder} is a file, not a folder")
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write {path}: folder {folder} does not exist")
    check_creatable(path)
    return path


def _as_array(volume: torch.Tensor | np.ndarray) -> np.ndarray:
    return volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)


def to_int16_hu(volume: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = _as_array(volume)
    return np.clip(np.rint(arr), -32768, 32767).astype(np.int16)


def save_nifti(volume: torch.Tensor | np.ndarray, spacing: Sequence[float], path: str | os.PathLike,
               overwrite: bool = False) -> str:
    """Write an (X, Y, Z) HU volume as int16 NIfTI (``.nii`` or ``.nii.gz``), RAS+ with affine diag(spacing)
    and the volume's centre at world (0, 0, 0), as the project's phantoms are (so the two overlay in a viewer)."""
    path = check_writable(path, overwrite)
    arr = _as_array(volume)
    if not np.isfinite(arr).all():
        raise ValueError(f"not writing {path}: the volume holds NaN or infinite values")
    data = to_int16_hu(arr)
    if data.ndim != 3:
        raise ValueError(f"a volume must be 3-D (X, Y, Z), got shape {data.shape}")
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = -(np.array(data.shape) - 1) / 2 * affine.diagonal()[:3]
    write_volume(path, data, affine)
    return path


def preview_montage(volume: torch.Tensor | np.ndarray, spacing: Sequence[float],
                    window: tuple[float, float] = (-1000.0, 1000.0)) -> np.ndarray:
    """Axial, coronal and sagittal mid-slices side by side, resampled to square pixels, as uint8 (H, W), in the
    radiological convention (the patient's right on the image's left; anterior / superior up)."""
    from PIL import Image

    arr = volume.detach().cpu().float().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume, float)
    x, y, z = arr.shape
    sx, sy, sz = map(float, spacing)
    lo, hi = window
    views = [(arr[:, :, z // 2], sx, sy), (arr[:, y // 2, :], sx, sz), (arr[x // 2, :, :], sy, sz)]
    tiles = []
    mm_per_px = min(sx, sy, sz)
    for plane, su, sv in views:
        img8 = np.clip((plane - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
        # radiological convention: rows = second axis flipped (anterior / superior up), columns = first axis
        # flipped (the patient's right on the image's left; in the sagittal view anterior on the left)
        img = Image.fromarray(np.ascontiguousarray(img8.T[::-1, ::-1]))
        w, h = max(1, round(plane.shape[0] * su / mm_per_px)), max(1, round(plane.shape[1] * sv / mm_per_px))
        tiles.append(np.asarray(img.resize((w, h), Image.BILINEAR)))
    height = max(t.shape[0] for t in tiles)
    padded = [np.pad(t, ((0, height - t.shape[0]), (0, 4))) for t in tiles]
    return np.concatenate(padded, axis=1)


def save_preview(volume: torch.Tensor | np.ndarray, spacing: Sequence[float], path: str | os.PathLike,
                 overwrite: bool = False, window: tuple[float, float] = (-1000.0, 1000.0)) -> str:
    """Write :func:`preview_montage` as a PNG."""
    from PIL import Image

    path = check_writable(path, overwrite)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(preview_montage(volume, spacing, window)).save(tmp, format="PNG")
    return path
