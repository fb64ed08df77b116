"""Binary morphology and connected components on 3-D masks (numpy in, numpy out; torch does the work)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def _t(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]


def dilate(mask: np.ndarray, r: int | tuple[int, int, int] = 1) -> np.ndarray:
    """Dilation by a (2r+1)^3 box (separable; ``r`` may differ per axis)."""
    rs = (r, r, r) if isinstance(r, int) else r
    x = _t(mask)
    for a, ra in enumerate(rs):
        if ra <= 0:
            continue
        k = [1, 1, 1]
        k[a] = 2 * ra + 1
        p = [0, 0, 0]
        p[a] = ra
        x = F.max_pool3d(x, kernel_size=k, stride=1, padding=p)
    return x[0, 0].numpy() > 0.5


def erode(mask: np.ndarray, r: int | tuple[int, int, int] = 1) -> np.ndarray:
    """Erosion by a (2r+1)^3 box; outside the volume counts as background."""
    return ~dilate(~np.asarray(mask, bool), r)


def erode6(mask: np.ndarray) -> np.ndarray:
    """Erosion by the 6-neighbour cross (a voxel stays if it and its face neighbours are set)."""
    m = np.asarray(mask, bool)
    out = m.copy()
    for a in range(3):
        sl_lo = [slice(None)] * 3
        sl_hi = [slice(None)] * 3
        sl_lo[a], sl_hi[a] = slice(1, None), slice(None, -1)
        shifted = np.zeros_like(m)
        shifted[tuple(sl_hi)] = m[tuple(sl_lo)]
        out &= shifted
        shifted = np.zeros_like(m)
        shifted[tuple(sl_lo)] = m[tuple(sl_hi)]
        out &= shifted
    return out


def bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Index slices of the smallest box holding every set voxel (None when empty)."""
    out = []
    for a in range(mask.ndim):
        proj = np.nonzero(mask.any(axis=tuple(b for b in range(mask.ndim) if b != a)))[0]
        if proj.size == 0:
            return None
        out.append(slice(int(proj[0]), int(proj[-1]) + 1))
    return tuple(out)


def label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """6-connected components: (int32 label volume, 0 = background, 1..n; n).

    Works on runs along the last axis: runs in face-adjacent rows that overlap are joined by union-find
    (hook each root under the smallest neighbouring root, compress paths by pointer jumping, repeat).
    """
    full = np.asarray(mask, dtype=bool)
    out_full = np.zeros(full.shape, np.int32)
    box = bbox(full)
    if box is None:
        return out_full, 0
    m = np.ascontiguousarray(full[box])
    X, Y, Z = m.shape
    out = out_full[box]
    rows = m.reshape(-1, Z)
    pad = np.zeros((rows.shape[0], Z + 2), np.int8)
    pad[:, 1:-1] = rows
    d = np.diff(pad, axis=1)
    r_id, c0 = np.nonzero(d == 1)
    _, c1 = np.nonzero(d == -1)
    n = r_id.size
    if n == 0:
        return out, 0
    key_s = r_id * (Z + 1) + c0
    key_e = r_id * (Z + 1) + c1
    ea, eb = [], []
    for off, ok in ((1, (r_id % Y) < Y - 1), (Y, r_id < (X - 1) * Y)):
        i = np.nonzero(ok)[0]
        t = r_id[i] + off
        first = np.searchsorted(key_e, t * (Z + 1) + c0[i], side="right")
        last = np.searchsorted(key_s, t * (Z + 1) + c1[i], side="left")
        cnt = np.maximum(last - first, 0)
        if cnt.sum() == 0:
            continue
        src = np.repeat(i, cnt)
        base = np.repeat(first - (np.cumsum(cnt) - cnt), cnt)
        ea.append(src)
        eb.append(base + np.arange(int(cnt.sum())))
    parent = torch.arange(n)
    if ea:
        a_t = torch.from_numpy(np.concatenate(ea))
        b_t = torch.from_numpy(np.concatenate(eb))
        while a_t.numel():
            pa, pb = parent[a_t], parent[b_t]
            lo_r, hi_r = torch.minimum(pa, pb), torch.maximum(pa, pb)
            sel = lo_r != hi_r
            if not bool(sel.any()):
                break
            a_t, b_t = a_t[sel], b_t[sel]  # pairs already merged never split again
            parent.scatter_reduce_(0, hi_r[sel], lo_r[sel], reduce="amin")
            while True:
                nxt = parent[parent]
                if torch.equal(nxt, parent):
                    break
                parent = nxt
    _, inv = torch.unique(parent, return_inverse=True)
    run_lab = inv.numpy().astype(np.int32) + 1
    lengths = c1 - c0
    starts = r_id * Z + c0
    total = int(lengths.sum())
    pos = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(total)
    flat = np.zeros(X * Y * Z, np.int32)
    flat[pos] = np.repeat(run_lab, lengths)
    out[...] = flat.reshape(X, Y, Z)
    return out_full, int(run_lab.max())


@dataclass
class Components:
    """Per-component statistics of a label volume, in mm (index 0 of every array is component 1)."""

    labels: np.ndarray
    n: int
    count: np.ndarray        # voxels
    volume_cc: np.ndarray
    centroid: np.ndarray     # (n, 3) world mm
    std_axes: np.ndarray     # (n, 3) sqrt of covariance eigenvalues, ascending (mm)
    lo: np.ndarray           # (n, 3) bounding box min (mm)
    hi: np.ndarray           # (n, 3) bounding box max (mm)

    @property
    def extent(self) -> np.ndarray:
        return self.hi - self.lo


def components(mask: np.ndarray, coords: tuple[np.ndarray, np.ndarray, np.ndarray], voxel_cc: float) -> Components:
    """Label ``mask`` and measure each component; ``coords`` are the 1-D world coordinates of the axes."""
    lab, n = label(mask)
    idx = np.nonzero(lab)
    lv = lab[idx] - 1
    pts = np.stack([coords[a][idx[a]] for a in range(3)], 1).astype(np.float64)
    cnt = np.bincount(lv, minlength=n).astype(np.float64)
    cen = np.stack([np.bincount(lv, pts[:, a], n) for a in range(3)], 1) / np.maximum(cnt, 1)[:, None]
    d = pts - cen[lv]
    cov = np.zeros((n, 3, 3))
    for i in range(3):
        for j in range(i, 3):
            cov[:, i, j] = cov[:, j, i] = np.bincount(lv, d[:, i] * d[:, j], n) / np.maximum(cnt, 1)
    ev = np.sqrt(np.clip(np.linalg.eigvalsh(cov), 0, None)) if n else np.zeros((0, 3))
    lv_t = torch.from_numpy(lv.astype(np.int64))
    lo = np.zeros((n, 3))
    hi = np.zeros((n, 3))
    for a in range(3):
        p = torch.from_numpy(pts[:, a])
        lo[:, a] = torch.full((n,), np.inf, dtype=torch.float64).scatter_reduce(0, lv_t, p, "amin").numpy()
        hi[:, a] = torch.full((n,), -np.inf, dtype=torch.float64).scatter_reduce(0, lv_t, p, "amax").numpy()
    return Components(lab, n, cnt, cnt * voxel_cc, cen, ev, lo, hi)


def shell(mask: np.ndarray, r: int = 2) -> np.ndarray:
    """Voxels within ``r`` (box) of ``mask`` but not in it."""
    return dilate(mask, r) & ~mask


def fill_holes_2d(mask: np.ndarray, axis: int = 2) -> np.ndarray:
    """Fill, slice by slice along ``axis``, the background not connected to the slice border."""
    m = np.moveaxis(np.asarray(mask, bool), axis, 0)
    bg = ~m
    border = np.zeros_like(bg)
    border[:, [0, -1], :] = True
    border[:, :, [0, -1]] = True
    # 2-D components of the background, per slice: label in 3-D with slices made unconnected
    pad = np.zeros((bg.shape[0] * 2 - 1, *bg.shape[1:]), bool)
    pad[::2] = bg
    lab, _ = label(pad)
    lab = lab[::2]
    outside = np.unique(lab[border & bg])
    filled = ~np.isin(lab, outside[outside > 0]) | m
    return np.moveaxis(filled, 0, axis)
