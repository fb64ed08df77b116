"""World-space geometry of the procedural phantom: the voxel grid, analytic shapes and a painting canvas.

Conventions (shared by every phantom module):

* World coordinates are millimetres in a RAS+ frame centred on the field of view: ``+x`` toward the
  patient's right, ``+y`` anterior, ``+z`` superior.
* Volume arrays are indexed ``[i, j, k]`` = ``(x, y, z)``, so voxel ``(i, j, k)`` sits at
  ``origin + (i, j, k) * spacing``. The NIfTI affine is therefore ``diag(sx, sy, sz)`` plus a translation
  that puts the volume centre at world ``(0, 0, 0)`` (see :meth:`Grid.affine`).
* Shapes are defined in world space, so one phantom renders identically (up to sampling and noise) on any
  grid: a coarse and a fine rendering of the same seed show the same anatomy and findings.

Every shape method takes broadcastable coordinate arrays, so the same code evaluates open grids
(``(X,1,1)``, ``(1,Y,1)``, ``(1,1,Z)``) when rendering and flat point lists when placing findings.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

Vec3 = tuple[float, float, float]
Box = tuple[slice, slice, slice]


@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``shape`` (X, Y, Z) voxels of ``spacing`` (sx, sy, sz) mm, centred on the origin."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @cached_property
    def origin(self) -> np.ndarray:
        return -(np.asarray(self.shape, np.float64) - 1) / 2 * np.asarray(self.spacing, np.float64)

    @cached_property
    def voxel_mm(self) -> float:
        """Geometric-mean voxel edge (mm), the blur width used for anti-aliased painting."""
        return float(np.prod(self.spacing) ** (1 / 3))

    @cached_property
    def _axes(self) -> tuple[np.ndarray, ...]:
        return tuple((self.origin[a] + np.arange(n) * self.spacing[a]).astype(np.float32)
                     for a, n in enumerate(self.shape))

    def axis(self, a: int, sl: slice = slice(None)) -> np.ndarray:
        """World coordinates (float32) of the voxel centres along axis ``a``, restricted to ``sl``."""
        return self._axes[a][sl]

    def open_coords(self, box: Box | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable (X,1,1), (1,Y,1), (1,1,Z) world coordinates of the voxels in ``box``."""
        box = box or (slice(None),) * 3
        x, y, z = (self.axis(a, box[a]) for a in range(3))
        return x[:, None, None], y[None, :, None], z[None, None, :]

    def affine(self) -> np.ndarray:
        """4x4 voxel-to-world (RAS+, mm) matrix: diagonal spacing, origin at the volume centre."""
        aff = np.diag([*map(float, self.spacing), 1.0])
        aff[:3, 3] = self.origin
        return aff

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> Box | None:
        """Index slices of the voxels whose centres lie in the world box [lo, hi]; None when empty."""
        out = []
        for a in range(3):
            s, o, n = self.spacing[a], self.origin[a], self.shape[a]
            i0 = max(int(np.ceil((lo[a] - o) / s - 1e-6)), 0)
            i1 = min(int(np.floor((hi[a] - o) / s + 1e-6)) + 1, n)
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- shapes
class Shape:
    """An analytic solid. ``sdf`` is a signed distance (mm, negative inside), exact or approximate."""

    def bounds(self, margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def sdf(self, x, y, z) -> np.ndarray:
        raise NotImplementedError

    def contains(self, x, y, z, margin: float = 0.0) -> np.ndarray:
        return self.sdf(x, y, z) <= margin


class Ellipsoid(Shape):
    """Ellipsoid with semi-axes ``semi`` along the columns of the rotation ``rot`` (identity if None)."""

    def __init__(self, center: Sequence[float], semi: Sequence[float], rot: np.ndarray | None = None):
        self.c = np.asarray(center, np.float64)
        self.semi = np.asarray(semi, np.float64)
        self.rot = np.eye(3) if rot is None else np.asarray(rot, np.float64)

    def bounds(self, margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        ext = np.sqrt(((self.rot * self.semi[None, :]) ** 2).sum(1)) + margin
        return self.c - ext, self.c + ext

    def local(self, x, y, z) -> list[np.ndarray]:
        d = (x - self.c[0], y - self.c[1], z - self.c[2])
        r = self.rot
        return [d[0] * r[0, k] + d[1] * r[1, k] + d[2] * r[2, k] for k in range(3)]

    def rho(self, x, y, z) -> np.ndarray:
        """Normalised radius: 1 on the surface."""
        u = self.local(x, y, z)
        return np.sqrt((u[0] / self.semi[0]) ** 2 + (u[1] / self.semi[1]) ** 2 + (u[2] / self.semi[2]) ** 2)

    def sdf(self, x, y, z) -> np.ndarray:
        # (rho - 1) times the harmonic-mean semi-axis: exact for spheres, close for mild ellipsoids.
        hm = 3.0 / float((1.0 / self.semi).sum())
        return (self.rho(x, y, z) - 1.0) * hm

    def contains(self, x, y, z, margin: float = 0.0) -> np.ndarray:
        if margin == 0.0:
            u = self.local(x, y, z)
            return (u[0] / self.semi[0]) ** 2 + (u[1] / self.semi[1]) ** 2 + (u[2] / self.semi[2]) ** 2 <= 1.0
        return Ellipsoid(self.c, self.semi + margin, self.rot).contains(x, y, z)


class Capsule(Shape):
    """All points within ``r`` mm of the segment p0-p1 (a cylinder with round ends)."""

    def __init__(self, p0: Sequence[float], p1: Sequence[float], r: float):
        self.p0 = np.asarray(p0, np.float64)
        self.p1 = np.asarray(p1, np.float64)
        self.r = float(r)
        self.v = self.p1 - self.p0
        self.l2 = max(float(self.v @ self.v), 1e-9)

    def bounds(self, margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        m = self.r + margin
        return np.minimum(self.p0, self.p1) - m, np.maximum(self.p0, self.p1) + m

    def axis_dist(self, x, y, z) -> np.ndarray:
        dx, dy, dz = x - self.p0[0], y - self.p0[1], z - self.p0[2]
        t = np.clip((dx * self.v[0] + dy * self.v[1] + dz * self.v[2]) / self.l2, 0.0, 1.0)
        return np.sqrt((dx - t * self.v[0]) ** 2 + (dy - t * self.v[1]) ** 2 + (dz - t * self.v[2]) ** 2)

    def sdf(self, x, y, z) -> np.ndarray:
        return self.axis_dist(x, y, z) - self.r


class Region(Shape):
    """A solid given by a predicate ``fn(x, y, z) -> bool`` inside the box [lo, hi] (no distance field)."""

    def __init__(self, lo: Sequence[float], hi: Sequence[float], fn: Callable):
        self.lo, self.hi, self.fn = np.asarray(lo, np.float64), np.asarray(hi, np.float64), fn

    def bounds(self, margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        return self.lo - margin, self.hi + margin

    def contains(self, x, y, z, margin: float = 0.0) -> np.ndarray:
        inside = ((x >= self.lo[0]) & (x <= self.hi[0]) & (y >= self.lo[1]) & (y <= self.hi[1])
                  & (z >= self.lo[2]) & (z <= self.hi[2]))
        return inside & self.fn(x, y, z)


def polyline(points: Sequence[Sequence[float]], r: float | Sequence[float]) -> list[Capsule]:
    """Capsules along consecutive points (radius constant or one per segment)."""
    pts = [np.asarray(p, np.float64) for p in points]
    radii = [r] * (len(pts) - 1) if np.isscalar(r) else list(r)
    return [Capsule(a, b, rr) for a, b, rr in zip(pts[:-1], pts[1:], radii)]


def bezier(p0: Sequence[float], p1: Sequence[float], p2: Sequence[float], n: int = 8) -> list[np.ndarray]:
    """``n + 1`` points on the quadratic Bezier curve p0 -> p2 with control point p1."""
    p0, p1, p2 = (np.asarray(p, np.float64) for p in (p0, p1, p2))
    return [(1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2 for t in np.linspace(0, 1, n + 1)]


def frame_from_axis(d: Sequence[float]) -> np.ndarray:
    """Rotation whose first column is the unit vector ``d``; the second column is horizontal."""
    d = np.asarray(d, np.float64)
    d = d / np.linalg.norm(d)
    e2 = np.array([-d[1], d[0], 0.0])
    if np.linalg.norm(e2) < 1e-6:
        e2 = np.array([1.0, 0.0, 0.0])
    e2 /= np.linalg.norm(e2)
    e3 = np.cross(d, e2)
    return np.stack([d, e2, e3], axis=1)


def sphere_points(n: int = 48) -> np.ndarray:
    """``n`` roughly uniform unit vectors (Fibonacci sphere), shape (n, 3)."""
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5 ** 0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)


# ------------------------------------------------------------------------------------------ smooth noise
class SmoothField:
    """A smooth random field in world space: Gaussian values on a fixed lattice, trilinearly interpolated.

    The lattice covers a fixed cube around the origin, so the field at a world point does not depend on the
    grid that samples it.
    """

    def __init__(self, rng: np.random.Generator, cell_mm: float, half_extent_mm: float = 300.0):
        n = int(np.ceil(2 * half_extent_mm / cell_mm)) + 1
        self.values = torch.from_numpy(rng.standard_normal((n, n, n)).astype(np.float32))
        self.half = half_extent_mm

    def sample(self, x, y, z) -> np.ndarray:
        """Field values at broadcastable coordinates (returns the broadcast shape)."""
        x, y, z = np.broadcast_arrays(np.asarray(x, np.float32), np.asarray(y, np.float32), np.asarray(z, np.float32))
        shape = x.shape
        # grid_sample wants (N, C, D, H, W) input and (N, d, h, w, 3) points ordered (W, H, D) = (z, y, x).
        pts = np.stack([z.ravel(), y.ravel(), x.ravel()], axis=1) / self.half
        grid = torch.from_numpy(pts).view(1, 1, 1, -1, 3)
        out = F.grid_sample(self.values[None, None], grid, mode="bilinear", padding_mode="border",
                            align_corners=True)
        return out.view(shape).numpy()

    def sample_grid(self, grid: Grid) -> np.ndarray:
        """Field values on every voxel of ``grid``, shape ``grid.shape`` (float32).

        Trilinear interpolation on an axis-aligned grid is separable: contract the lattice with one
        (voxels x lattice) linear-interpolation matrix per axis.
        """
        n = self.values.shape[0]
        cell = 2 * self.half / (n - 1)
        out = self.values
        for a in range(3):
            pos = np.clip((grid.axis(a).astype(np.float64) + self.half) / cell, 0, n - 1 - 1e-6)
            i0 = np.floor(pos).astype(int)
            w = np.zeros((len(pos), n), np.float32)
            w[np.arange(len(pos)), i0] = 1 - (pos - i0)
            w[np.arange(len(pos)), i0 + 1] = pos - i0
            used = np.nonzero(w.any(0))[0]
            lo, hi = used[0], used[-1] + 1
            wt = torch.from_numpy(w[:, lo:hi])
            out = torch.tensordot(wt, out.narrow(a, lo, hi - lo).movedim(a, 0), dims=([1], [0])).movedim(0, a)
        return out.numpy()


# ---------------------------------------------------------------------------------------------- canvas
Predicate = Callable[[np.ndarray], np.ndarray]


class Canvas:
    """HU volume plus a tissue-code volume, painted shape by shape inside each shape's bounding box."""

    def __init__(self, grid: Grid, background_hu: float = -1000.0):
        self.grid = grid
        self.hu = np.full(grid.shape, background_hu, np.float32)
        self.tissue = np.zeros(grid.shape, np.uint8)

    def region(self, shape: Shape, margin: float = 0.0) -> tuple | None:
        """(box, x, y, z) for the voxels inside ``shape``'s bounds, or None when outside the grid."""
        lo, hi = shape.bounds(margin)
        box = self.grid.box(lo, hi)
        if box is None:
            return None
        return (box, *self.grid.open_coords(box))

    def paint(self, shape: Shape, hu: float | Callable, tissue: int | None = None,
              allowed: Sequence[int] | None = None, soft: bool = False, clip: Predicate | None = None) -> None:
        """Set voxels inside ``shape`` to ``hu`` (a number or ``f(x, y, z, mask)`` giving values).

        ``allowed`` restricts painting to voxels whose current tissue code is listed; ``clip`` is an extra
        world-space predicate ``f(x, y, z) -> bool``. With ``soft`` the edge is anti-aliased: each voxel is
        blended by its approximate coverage, and thin objects are dimmed to keep their partial-volume mass.
        """
        reg = self.region(shape, margin=self.grid.voxel_mm if soft else 0.0)
        if reg is None:
            return
        box, x, y, z = reg
        if soft:
            w = self.grid.voxel_mm
            cover = np.clip(0.5 - shape.sdf(x, y, z) / w, 0.0, 1.0)
            thin = _thinness(shape, w)
            if thin < 1.0:
                cover = cover * thin
            mask = cover > 0
        else:
            mask = shape.contains(x, y, z)
            cover = None
        mask = np.broadcast_to(mask, tuple(s.stop - s.start for s in box))
        if clip is not None:
            mask = mask & clip(x, y, z)
        tis = self.tissue[box]
        if allowed is not None:
            lut = np.zeros(256, bool)
            lut[list(allowed)] = True
            mask = mask & lut[tis]
        if not mask.any():
            return
        sub = self.hu[box]
        value = hu(x, y, z, mask) if callable(hu) else hu
        if cover is None:
            sub[mask] = value[mask] if isinstance(value, np.ndarray) else value
            if tissue is not None:
                tis[mask] = tissue
        else:
            c = np.broadcast_to(cover, mask.shape)[mask].astype(np.float32)
            v = value[mask] if isinstance(value, np.ndarray) else value
            sub[mask] = sub[mask] + c * (v - sub[mask])
            if tissue is not None:
                tis[mask & (np.broadcast_to(cover, mask.shape) >= 0.5)] = tissue


def _thinness(shape: Shape, w: float) -> float:
    """Dimming factor for objects thinner than a voxel (keeps their partial-volume mass about right)."""
    if isinstance(shape, Capsule):
        return min(1.0, 2 * shape.r / w)
    if isinstance(shape, Ellipsoid):
        return min(1.0, 2 * float(shape.semi.min()) / w) ** 2
    return 1.0


def binomial_blur(vol: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    """[1, 2, 1] / 4 smoothing along each listed axis (edge voxels replicated)."""
    out = vol
    for a in axes:
        p = np.concatenate([np.take(out, [0], axis=a), out, np.take(out, [-1], axis=a)], axis=a)
        n = out.shape[a]
        lo = np.take(p, np.arange(0, n), axis=a)
        mid = np.take(p, np.arange(1, n + 1), axis=a)
        hi = np.take(p, np.arange(2, n + 2), axis=a)
        out = 0.25 * lo + 0.5 * mid + 0.25 * hi
    return out.astype(vol.dtype, copy=False)
