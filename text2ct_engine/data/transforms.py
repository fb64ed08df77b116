"""Torch preprocessing of CT volumes, as Text2CT does it: orient to RAS, rescale, clip HU to a window and map
it to [0, 1], resample to a target spacing (trilinear), then crop/pad (or resize) to a target size.

Layout everywhere: a volume is (X, Y, Z) in RAS+ order (axis 0 toward the patient's right, 1 anterior,
2 superior) and a model input is (1, X, Y, Z); spacing is (sx, sy, sz) in mm. This matches MAISI's
(channel, x, y, z) layout and the engine's NIfTI writer (affine diag(spacing), the volume centred at world 0).
"""
from __future__ import annotations

import warnings
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

Spacing = tuple[float, float, float]


def affine_spacing(affine: np.ndarray) -> Spacing:
    """Voxel size (mm) along each array axis of a 4x4 affine."""
    z = np.sqrt((np.asarray(affine, np.float64)[:3, :3] ** 2).sum(0))
    return tuple(float(v) for v in z)  # type: ignore[return-value]


def reorient_to_ras(vol: torch.Tensor, affine: np.ndarray, spacing: Sequence[float] | None = None
                    ) -> tuple[torch.Tensor, Spacing]:
    """Permute/flip the array axes of ``vol`` (X, Y, Z) so they run along R, A, S; returns (vol, spacing).

    ``spacing`` (per input array axis) overrides the affine's voxel sizes, e.g. for old CT-RATE copies whose
    headers carry wrong sizes and whose true spacing is in the metadata CSV.
    """
    aff = np.asarray(affine, np.float64)
    ornt = nib.orientations.io_orientation(aff)
    if np.isnan(ornt).any():
        raise ValueError("affine has no usable orientation (degenerate axes)")
    sp_in = affine_spacing(aff) if spacing is None else tuple(float(s) for s in spacing)
    order = [0, 0, 0]
    sp = [0.0, 0.0, 0.0]
    for i, (target, _) in enumerate(ornt):
        order[int(target)] = i
        sp[int(target)] = sp_in[i]
    out = vol.permute(*order)
    flips = [int(ornt[order[j], 1]) for j in range(3)]
    dims = [j for j in range(3) if flips[j] < 0]
    if dims:
        out = out.flip(dims)
    return out.contiguous(), (sp[0], sp[1], sp[2])


def hu_to_unit(vol: torch.Tensor, window: tuple[float, float] = (-1000.0, 1000.0)) -> torch.Tensor:
    """Clip HU to ``window`` and map it linearly to [0, 1]."""
    lo, hi = window
    return (vol.clamp(lo, hi) - lo) / (hi - lo)


def unit_to_hu(vol: torch.Tensor, window: tuple[float, float] = (-1000.0, 1000.0)) -> torch.Tensor:
    """Inverse of :func:`hu_to_unit` (values outside [0, 1] are clipped first)."""
    lo, hi = window
    return vol.clamp(0, 1) * (hi - lo) + lo


def resample(vol: torch.Tensor, spacing: Sequence[float], target: Sequence[float]) -> torch.Tensor:
    """Trilinear resampling of an (X, Y, Z) volume from ``spacing`` to ``target`` mm (field of view kept)."""
    size = [max(int(round(n * s / t)), 1) for n, s, t in zip(vol.shape, spacing, target)]
    if list(size) == list(vol.shape):
        return vol
    return F.interpolate(vol[None, None].float(), size=size, mode="trilinear", align_corners=False)[0, 0]


def crop_or_pad(vol: torch.Tensor, size: Sequence[int], fill: float = 0.0) -> torch.Tensor:
    """Centre-crop or pad (with ``fill``) an (X, Y, Z) volume to ``size``."""
    out = vol
    for a, n in enumerate(size):
        cur = out.shape[a]
        if cur > n:
            start = (cur - n) // 2
            out = out.narrow(a, start, n)
        elif cur < n:
            before = (n - cur) // 2
            shape = list(out.shape)
            shape[a] = n
            padded = torch.full(shape, fill, dtype=out.dtype)
            padded.narrow(a, before, cur).copy_(out)
            out = padded
    return out


NOT_CT_ABOVE_HU = -500.0  # a CT in HU has air (about -1000 HU) around the body and in the lungs
_WARNED_NOT_CT: set[str] = set()


def warn_if_not_ct(hu: torch.Tensor, source: str) -> None:
    """Warn once per ``source`` when a volume has no voxel below -500 HU: no air, so not a CT in HU (an
    MRI, or a CT stored without its slope/intercept): it is still used, but scores and training suffer."""
    if source not in _WARNED_NOT_CT and hu.numel() and float(hu.min()) > NOT_CT_ABOVE_HU:
        _WARNED_NOT_CT.add(source)
        warnings.warn(f"{source}: no voxel below {NOT_CT_ABOVE_HU:g} HU (lowest {float(hu.min()):.0f}): not a CT "
                      f"in HU? (air is -1000 HU; check the file, or its rescale slope/intercept in metadata/*.csv)",
                      stacklevel=2)


def preprocess(data: np.ndarray | torch.Tensor, affine: np.ndarray, target_spacing: Sequence[float] | None,
               target_size: Sequence[int] | None, mode: str = "crop_pad", window: tuple[float, float] = (-1000.0, 1000.0),
               rescale: tuple[float, float] | None = None, spacing_override: Sequence[float] | None = None,
               source: str | None = None) -> tuple[torch.Tensor, Spacing]:
    """HU volume as stored -> model input (1, X, Y, Z) in [0, 1] and its spacing (mm).

    ``rescale`` = (slope, intercept) is applied first (raw stored values -> HU). ``mode`` is "crop_pad"
    (resample to ``target_spacing`` then centre-crop/pad to ``target_size``; spacing stays the target) or
    "resize" (Text2CT's forced resize to ``target_size`` after resampling; spacing becomes FOV / size).
    Either target may be None to skip that step. ``source`` (the file) names a volume without air in the
    one warning :func:`warn_if_not_ct` gives.
    """
    vol = torch.as_tensor(np.asarray(data) if not isinstance(data, torch.Tensor) else data).float()
    if rescale is not None:
        vol = vol * float(rescale[0]) + float(rescale[1])
    if source is not None:
        warn_if_not_ct(vol, source)
    vol, sp = reorient_to_ras(vol, affine, spacing_override)
    vol = hu_to_unit(vol, window)
    if target_spacing is not None:
        vol = resample(vol, sp, target_spacing)
        sp = tuple(float(t) for t in target_spacing)  # type: ignore[assignment]
    if target_size is not None:
        if mode == "resize":
            fov = [n * s for n, s in zip(vol.shape, sp)]
            vol = F.interpolate(vol[None, None], size=list(target_size), mode="trilinear", align_corners=False)[0, 0]
            sp = tuple(f / n for f, n in zip(fov, target_size))  # type: ignore[assignment]
        elif mode == "crop_pad":
            vol = crop_or_pad(vol, target_size, fill=0.0)
        else:
            raise ValueError(f"unknown mode {mode!r} (use 'crop_pad' or 'resize')")
    return vol[None].contiguous(), sp  # type: ignore[return-value]
