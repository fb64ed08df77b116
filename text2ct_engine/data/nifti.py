"""Reading and writing NIfTI volumes: validated reads that name what is wrong, atomic writes."""
from __future__ import annotations

import os

import nibabel as nib
import numpy as np

from ..io_utils import atomic_path
from .errors import BadDataError

# nibabel raises many types for damaged files (ImageFileError, HeaderDataError, EOFError, zlib.error, ...):
# any Exception while reading is a property of the file, never of the caller.
_READ_ERRORS = (Exception,)


def read_volume(path: str, check_finite: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Load a 3-D NIfTI volume as float32 (header scaling applied) and its 4x4 affine.

    Raises :class:`BadDataError` naming the problem: unreadable header, truncated or corrupt data,
    a non-3-D array (trailing singleton axes are dropped first) or NaN/Inf voxels.
    """
    try:
        img = nib.load(path)
    except FileNotFoundError:
        raise BadDataError(path, "file not found") from None
    except _READ_ERRORS as e:
        raise BadDataError(path, f"not a readable NIfTI file ({type(e).__name__}: {_short(e)})") from None
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise BadDataError(path, f"not a 3-D volume (array shape {tuple(img.shape)})")
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except _READ_ERRORS as e:
        raise BadDataError(path, f"truncated or corrupt image data ({type(e).__name__}: {_short(e)})") from None
    if check_finite:
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise BadDataError(path, f"{bad} NaN/Inf voxel(s)")
    return data, np.asarray(img.affine, np.float64)


def write_volume(path: str, data: np.ndarray, affine: np.ndarray) -> None:
    """Write ``data`` (e.g. int16 HU) with ``affine`` to ``path`` atomically (temp file + rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    with atomic_path(path, suffix=".nii.gz" if str(path).endswith(".gz") else ".nii") as tmp:
        nib.save(img, tmp)


def _short(e: BaseException, n: int = 120) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= n else s[: n - 3] + "..."
