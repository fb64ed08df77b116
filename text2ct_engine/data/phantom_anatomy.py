"""Normal chest anatomy of the phantom: sampled per seed, defined analytically in world space, rendered in HU.

The body is a superelliptic cylinder (skin, subcutaneous fat, muscle) around an elliptic thoracic cavity;
the lungs fill the cavity above the diaphragm domes except for the mediastinum (a central band, the
pericardial sac, the aorta, oesophagus and spine). Heart, great vessels, airways, lung vessel and airway
trees, spine, ribs, sternum, clavicles and upper-abdominal organs are painted on top. Habitus, lung and
heart size and position vary per seed. See :mod:`phantom_geometry` for the coordinate conventions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .phantom_geometry import (Canvas, Capsule, Ellipsoid, Shape, SmoothField, bezier, frame_from_axis, polyline,
                               sphere_points)

# Tissue codes of Canvas.tissue (used for placement checks and tests, never written to disk).
AIR, SKIN, FAT, MUSCLE, BONE, CARTILAGE, LUNG_R, LUNG_L, MED_FAT, HEART = range(10)
VESSEL, AIRWAY, ESOPHAGUS, ABDOMEN, LIVER, SPLEEN, STOMACH, LUNG_VESSEL, LUNG_AIRWAY, PERICARDIUM = range(10, 20)
CANAL, DIAPHRAGM, NODE = 20, 21, 22
LUNG_TISSUES = (LUNG_R, LUNG_L, LUNG_VESSEL, LUNG_AIRWAY)
LOBES = ("upper", "middle", "lower")

# Nominal HU of the normal tissues (non-contrast CT).
HU = dict(air=-1000.0, lung=-855.0, fat=-95.0, med_fat=-90.0, skin=30.0, muscle=45.0, blood=40.0,
          myocardium=46.0, chamber=38.0, pericardium=30.0, abdomen=42.0, liver=58.0, spleen=48.0,
          stomach=32.0, cortex=760.0, marrow=230.0, disc=80.0, cartilage=110.0, canal=32.0)


def _u(rng: np.random.Generator, a: float, b: float) -> float:
    return float(rng.uniform(a, b))


def _smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def union_mask(shapes: list[Shape], x, y, z, margin: float = 0.0) -> np.ndarray:
    """Union of ``shapes`` at broadcastable coordinates; open grids are evaluated box by box."""
    shape = np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z))
    out = np.zeros(shape, bool)
    is_open = (np.ndim(x) == 3 and np.shape(x)[1:] == (1, 1) and np.shape(y)[::2] == (1, 1)
               and np.shape(z)[:2] == (1, 1))
    for s in shapes:
        if not is_open:
            out |= s.contains(x, y, z, margin)
            continue
        lo, hi = s.bounds(margin)
        sl = []
        for a, c in enumerate((x.ravel(), y.ravel(), z.ravel())):
            idx = np.nonzero((c >= lo[a]) & (c <= hi[a]))[0]
            if idx.size == 0:
                break
            sl.append(slice(idx[0], idx[-1] + 1))
        else:
            xs, ys, zs = x[sl[0]], y[:, sl[1]], z[:, :, sl[2]]
            out[tuple(sl)] |= s.contains(xs, ys, zs, margin)
    return out


@dataclass
class Tree:
    """Segments of one branching lung tree (vessels or an airway)."""

    kind: str  # "artery" | "vein" | "airway"
    side: str  # "right" | "left"
    segments: list[Capsule] = field(default_factory=list)


class Anatomy:
    """A sampled normal chest. All lengths in mm, world frame of :mod:`phantom_geometry`.

    ``ctr`` (cardiothoracic ratio) and ``pericardial_effusion_mm`` are set by the caller before
    :meth:`build` (findings change the heart); everything else is drawn from ``rng``.
    """

    def __init__(self, rng: np.random.Generator, ctr: float | None = None, pericardial_effusion_mm: float = 0.0,
                 hernia: bool = False):
        u = lambda a, b: _u(rng, a, b)  # noqa: E731
        s = self.s = u(0.9, 1.08)
        self.cx, self.cy = u(-8, 8), u(-12, 6)
        self.a_body = 168 * s * u(0.94, 1.06)
        self.b_ant = 122 * s * u(0.93, 1.06)
        self.b_post = self.b_ant + 18 * s
        self.p_body = u(2.2, 2.8)
        self.skin, self.fat, self.muscle_out, self.rib_t = 2.0, u(4, 22), u(5, 10), 10 * s
        wall = self.skin + self.fat + self.muscle_out + self.rib_t
        self.a_c, self.b_c, self.cyc = self.a_body - wall, self.b_ant - wall, self.cy
        self.z0 = u(-18, 12)
        self.z_apex = self.z0 + 150 * s
        self.z_taper = self.z_apex - 70 * s
        self.dome_r = self.z0 - 75 * s * u(0.9, 1.1)
        self.dome_l = self.dome_r - u(8, 20)
        self.recess = 55 * s * u(0.9, 1.1)
        self.z_carina = self.z0 + 45 * s
        self.z_arch = self.z_carina + 26 * s
        self.xm = self.cx + 3 * s
        # spine and posterior mediastinum
        self.rv = (18 * s, 15 * s)
        self.y_v = self.cyc - self.b_c + 6 * s + self.rv[1]
        self.spine_front = self.y_v + self.rv[1]
        self.y_canal = self.y_v - self.rv[1] - 9 * s
        self.vert_period, self.vert_phase = 27 * s, u(0, 27 * s)
        self.eso = (self.xm - 6 * s, self.spine_front + 9 * s, 7 * s)
        self.y_tr = self.eso[1] + self.eso[2] + 3 + 10 * s
        self.r_tr = 9.5 * s
        self.aorta_desc_xy = (self.cx - 33 * s, self.y_v + 0.4 * self.rv[1])
        self.r_desc = 11.5 * s
        # ribs
        self.rib_top, self.rib_period, self.rib_h = self.z_apex - 20 * s, 24 * s, 5 * s
        self.rib_drop = 55 * s * u(0.85, 1.15)
        self.rib_level_jitter = rng.uniform(-2, 2, 12)
        self.texture = SmoothField(rng, 10.0)
        normal_ctr = u(0.36, 0.46)  # always drawn, so findings never shift the rest of the anatomy
        self._heart(rng, normal_ctr if ctr is None else ctr, pericardial_effusion_mm)
        self._vessels(rng)
        self._abdomen(rng)
        self._hernia(rng, hernia)
        self.trees = self._trees(rng)

    # ---------------------------------------------------------------- heart
    def _heart(self, rng, ctr: float, eff: float) -> None:
        s, u = self.s, (lambda a, b: _u(rng, a, b))
        self.ctr, self.eff = ctr, eff
        self.peri_fat = u(5, 7)
        self.eff_hu = u(5, 15)
        az, el = np.radians(u(12, 24)), np.radians(u(10, 20))
        ratio = np.array([1.0, u(0.62, 0.72), u(0.78, 0.9)])
        width = ctr * 2 * self.a_c
        back = max(self.eso[1] + self.eso[2], self.aorta_desc_xy[1] + self.r_desc) + 2 + self.peri_fat + eff
        front = self.cyc + self.b_c - 3 - self.peri_fat - eff
        surf = sphere_points(96)
        shift = 0.0
        z_bottom = min(self.dome_r, self.dome_l) - 12 * s
        z_room = self.z_carina - 28 * s - z_bottom
        for _ in range(40):
            # the heart's transverse extent is ctr * cavity width; flatten and straighten it until it fits
            # between oesophagus and sternum, then shift it right (+x) until the myocardium clears the wall
            # (the pericardial sac is clipped by the cavity when painted).
            d = np.array([-np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), -np.sin(el)])
            rot = frame_from_axis(d)
            semi = width / 2 / np.sqrt(((rot[0] * ratio) ** 2).sum()) * ratio
            ext = np.sqrt(((rot * semi[None, :]) ** 2).sum(1))
            x_h, y_h = self.cx + 0.35 * width - ext[0] + shift, back + ext[1]
            if 2 * ext[1] > front - back and ratio[1] > 0.45:
                ratio[1] *= 0.95
                az *= 0.9
                continue
            if 2 * ext[2] > z_room and ratio[2] > 0.5:
                ratio[2] *= 0.95
                continue
            pts = surf * semi @ rot.T
            rho = ((pts[:, 0] + x_h - self.cx) / self.a_c) ** 2 + ((pts[:, 1] + y_h - self.cyc) / self.b_c) ** 2
            if rho.max() <= 0.9:
                break
            shift += 2.0
        z_h = z_bottom + ext[2]
        self.heart = Ellipsoid((x_h, y_h, z_h), semi, rot)
        self.heart_ext = ext
        self.heart_width = float(2 * ext[0])
        self.sac = Ellipsoid((x_h, y_h, z_h), semi + eff + self.peri_fat, rot)

    def heart_point(self, fx: float, fy: float, fz: float) -> np.ndarray:
        """A point of the heart's bounding box in units of its half-extents from the centre."""
        return self.heart.c + np.array([fx, fy, fz]) * self.heart_ext

    # -------------------------------------------------------------- vessels
    def _vessels(self, rng) -> None:
        s, xm, c = self.s, self.xm, self.heart.c
        y_asc = self.cyc + 0.2 * self.b_c
        xd, yd = self.aorta_desc_xy
        z_top = self.z_apex + 80
        root = self.heart_point(0.05, 0.1, 0.35)
        asc_top = np.array([xm + 14 * s, y_asc, self.z_arch - 5 * s])
        self.aorta_asc = polyline([root, (xm + 12 * s, y_asc, c[2] + 0.9 * self.heart_ext[2]), asc_top], 14.5 * s)
        arch_pts = bezier(asc_top, (xm - 34 * s, self.y_tr + 28 * s, self.z_arch + 30 * s), (xd, yd, self.z_arch - 5 * s))
        self.arch_points = arch_pts
        self.aorta_arch = polyline(arch_pts, 13 * s)
        self.aorta_desc = polyline([(xd, yd, self.z_arch - 5 * s), (xd + 8 * s, yd, self.z0 - 120 * s),
                                    (xd + 22 * s, yd + 4, -400.0)], self.r_desc)
        a1, a2, a3 = arch_pts[2], arch_pts[4], arch_pts[6]
        self.arch_branches = (polyline([a1, (xm + 24 * s, y_asc - 8, z_top)], 6.5 * s)
                              + polyline([a2, (xm - 16 * s, self.y_tr + 12 * s, z_top)], 4.5 * s)
                              + polyline([a3, (xm - 30 * s, self.y_tr - 2, self.z_apex + 5 * s),
                                          (self.cx - 0.7 * self.a_body, self.y_tr, self.z_apex + 15 * s)], 5.5 * s))
        pa_root = self.heart_point(-0.1, 0.55, 0.45)
        bif = np.array([xm - 14 * s, self.y_tr + 20 * s, self.z_carina - 12 * s])
        self.hilum = {"right": np.array([self.cx + 0.36 * self.a_c, self.y_tr - 2, self.z_carina - 25 * s]),
                      "left": np.array([self.cx - 0.36 * self.a_c, self.y_tr - 2, self.z_carina - 18 * s])}
        self.pa = (polyline([pa_root, bif], 13 * s)
                   + polyline([bif, (xm + 12 * s, self.y_tr + 19 * s, self.z_carina - 20 * s), self.hilum["right"]], 9.5 * s)
                   + polyline([bif, (self.cx - 0.25 * self.a_c, self.y_tr + 8 * s, self.z_carina - 8 * s),
                               self.hilum["left"]], 9.5 * s))
        self.svc = polyline([(xm + 34 * s, y_asc - 4, z_top), (xm + 34 * s, y_asc - 4, c[2] + 0.8 * self.heart_ext[2]),
                             self.heart_point(0.75, 0.0, 0.25)], 9 * s)
        la = self.heart_point(0.1, -0.55, 0.2)
        self.vein_roots = {side: self.hilum[side] + np.array([0.0, -6.0, -28 * s]) for side in ("right", "left")}
        self.pv = [Capsule(self.vein_roots[side], la, 6 * s) for side in ("right", "left")]
        ex, ey, er = self.eso
        self.esophagus = polyline([(ex, ey, z_top), (ex, ey, self.dome_l - 8), (ex - 25 * s, ey + 20 * s, self.dome_l - 35 * s)], er)
        car = np.array([xm, self.y_tr, self.z_carina])
        self.trachea = [Capsule((xm, self.y_tr, z_top), car, self.r_tr)]
        self.bronchus_end = {"right": np.array([self.cx + 0.33 * self.a_c, self.y_tr - 6, self.z_carina - 22 * s]),
                             "left": np.array([self.cx - 0.33 * self.a_c, self.y_tr - 4, self.z_carina - 35 * s])}
        self.main_bronchi = [Capsule(car, self.bronchus_end["right"], 6.5 * s),
                             Capsule(car, self.bronchus_end["left"], 6.0 * s)]
        self.great_vessels = self.aorta_asc + self.aorta_arch + self.aorta_desc + self.arch_branches + self.pa + self.svc + self.pv

    def _abdomen(self, rng) -> None:
        s, u = self.s, (lambda a, b: _u(rng, a, b))
        self.stomach = Ellipsoid((self.cx - 0.5 * self.a_c - u(0, 10), self.cyc + 0.15 * self.b_c, self.dome_l - 42 * s),
                                 (38 * s, 40 * s, 42 * s))
        self.spleen = Ellipsoid((self.cx - 0.72 * self.a_c, self.cyc - 0.45 * self.b_c, self.dome_l - 48 * s),
                                (42 * s, 22 * s, 45 * s), frame_from_axis((0.3, 1.0, 0.0)))

    def _hernia(self, rng, present: bool) -> None:
        """Sliding hiatal hernia: part of the stomach above the diaphragm in the posterior mediastinum."""
        s, u = self.s, (lambda a, b: _u(rng, a, b))
        c = (self.eso[0] - 4, self.eso[1] + 6, self.dome_l + u(10, 24))
        semi = (u(18, 27) * s, u(15, 21) * s, u(18, 27) * s)
        self.hernia = Ellipsoid(c, semi) if present else None

    # ------------------------------------------------------------ predicates
    def body_axes(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t = _smoothstep((np.asarray(z) - self.z_apex - 5) / 45.0)
        return self.a_body * (1 - 0.55 * t), self.b_ant * (1 - 0.4 * t), self.b_post * (1 - 0.45 * t)

    def body_rho(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, shrink: float = 0.0) -> np.ndarray:
        """Superellipse radius of the body outline shrunk by ``shrink`` mm (<= 1 inside)."""
        a, ba, bp = self.body_axes(z)
        b = np.where(y >= self.cy, ba, bp)
        p = self.p_body
        return np.abs((x - self.cx) / (a - shrink)) ** p + np.abs((y - self.cy) / (b - shrink)) ** p

    def cavity_scale(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, np.float32)
        t = np.clip((z - self.z_taper) / (self.z_apex - self.z_taper), 0.0, 1.0)
        g = np.sqrt(np.clip(1 - t * t, 0.0, 1.0))
        return np.where(z > self.z_taper, g, 1.0)

    def cavity_rho(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, grow: float = 0.0) -> np.ndarray:
        """Normalised radius of the thoracic cavity ellipse grown by ``grow`` mm (<= 1 inside; inf above apex)."""
        g = self.cavity_scale(z)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = ((x - self.cx) / (self.a_c * g + grow)) ** 2 + ((y - self.cyc) / (self.b_c * g + grow)) ** 2
        return np.where(g > 0, r, np.inf)

    def diaphragm_z(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Height of the diaphragm surface under (x, y): domes on each side, costophrenic recesses around."""
        out = []
        for sgn, top in ((1.0, self.dome_r), (-1.0, self.dome_l)):
            xd, yd = self.cx + sgn * 0.45 * self.a_c, self.cyc + 0.1 * self.b_c
            q = ((x - xd) / (0.75 * self.a_c)) ** 2 + ((y - yd) / self.b_c) ** 2
            out.append(top - self.recess * np.minimum(q, 1.3))
        return np.where(x >= self.cx, out[0], out[1])

    def med_width(self, z: np.ndarray) -> np.ndarray:
        top = self.heart.c[2] + 0.6 * self.heart_ext[2]
        return 18 * self.s + 12 * self.s * _smoothstep((np.asarray(z) - top) / 30.0)

    def mediastinum_shapes(self) -> list[Shape]:
        if getattr(self, "_med_shapes", None) is not None:
            return self._med_shapes
        shapes: list[Shape] = [self.sac, Ellipsoid((self.cx, self.y_v, 0.0), (self.rv[0] + 5, self.rv[1] + 5, 1e4))]
        shapes += [Capsule(c.p0, c.p1, c.r + 4) for c in self.aorta_desc + self.esophagus]
        if self.hernia is not None:
            shapes.append(Ellipsoid(self.hernia.c, self.hernia.semi + 4, self.hernia.rot))
        self._med_shapes = shapes
        return shapes

    def in_mediastinum(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, margin: float = 0.0) -> np.ndarray:
        w = self.med_width(z) + margin
        band = np.abs((x - self.xm) / w) ** 4 + np.abs((y - self.cyc) / (1.05 * self.b_c + margin)) ** 4 <= 1
        return band | union_mask(self.mediastinum_shapes(), x, y, z, margin)

    def above_diaphragm(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, margin: float = 0.0) -> np.ndarray:
        return z > self.diaphragm_z(x, y) + 4 + margin

    def in_lung(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """Lung parenchyma region (either side); ``margin`` keeps that far from mediastinum and diaphragm.

        The chest wall is never given a margin: pleura-based findings may touch it.
        """
        return ((self.cavity_rho(x, y, z) <= 1) & self.above_diaphragm(x, y, z, margin)
                & ~self.in_mediastinum(x, y, z, margin))

    def side_of(self, x: np.ndarray) -> np.ndarray:
        """"right" where x is right of the midline (RAS: +x is the patient's right)."""
        return np.where(np.asarray(x) >= self.xm, "right", "left")

    def lobe_of(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Lobe code per point (index into LOBES: upper, middle (right only), lower) from the fissures."""
        s = self.s
        y_post, y_ant = self.cyc - self.b_c, self.cyc + 0.7 * self.b_c
        z_post, z_ant = self.z_carina + 25 * s, min(self.dome_r, self.dome_l) - 5
        z_fis = z_post + (np.asarray(y) - y_post) * (z_ant - z_post) / (y_ant - y_post)
        lower = np.asarray(z) < z_fis
        middle = ~lower & (np.asarray(x) >= self.xm) & (np.asarray(z) < self.z_carina - 25 * s)
        return np.where(lower, 2, np.where(middle, 1, 0))

    # --------------------------------------------------------------- trees
    def _trees(self, rng) -> list[Tree]:
        s = self.s
        trees = []
        for side, sg in (("right", 1.0), ("left", -1.0)):
            dirs = np.array([(sg * 0.45, 0.1, 1.0), (sg * 0.5, -0.45, -1.0), (sg * 0.6, 0.7, -0.5), (sg * 0.9, 0.1, 0.1)])
            for kind, start, r0, depth in (("artery", self.hilum[side], 5.5 * s, 5), ("vein", self.vein_roots[side], 5.5 * s, 5),
                                           ("airway", self.bronchus_end[side], 4.5 * s, 4)):
                d = dirs + rng.normal(0, 0.12, dirs.shape)
                tree = Tree(kind, side)
                self._grow(rng, tree.segments, np.repeat(np.asarray(start, float)[None], len(d), 0),
                           d / np.linalg.norm(d, axis=1, keepdims=True), np.full(len(d), r0), np.full(len(d), 32 * s), depth)
                trees.append(tree)
        return trees

    def _grow(self, rng, out: list, p, d, r, length, max_depth: int) -> None:
        """Grow a tree generation by generation: every tip inside the lung splits in two."""
        for depth in range(max_depth + 1):
            p1 = p + d * length[:, None]
            out.extend(Capsule(a, b, rr) for a, b, rr in zip(p, p1, r))
            if depth == max_depth:
                return
            ok = self.in_lung(p1[:, 0], p1[:, 1], p1[:, 2])
            p1, d, r, length = p1[ok], d[ok], r[ok], length[ok]
            n = len(p1)
            if n == 0:
                return
            axis = np.cross(d[:, None, :], rng.normal(size=(n, 2, 3)))
            axis /= np.linalg.norm(axis, axis=2, keepdims=True) + 1e-9
            ang = np.radians(rng.uniform(22, 40, (n, 2))) * np.array([1.0, -1.0])
            dd = d[:, None, :]
            nd = dd * np.cos(ang)[..., None] + np.cross(axis, dd) * np.sin(ang)[..., None]  # Rodrigues, axis _|_ d
            p = np.repeat(p1, 2, 0)
            d = (nd / np.linalg.norm(nd, axis=2, keepdims=True)).reshape(-1, 3)
            r = np.repeat(r * 0.74, 2)
            length = (length[:, None] * rng.uniform(0.7, 0.85, (n, 2))).reshape(-1)

    # ------------------------------------------------------------- rendering
    def render(self, canvas: Canvas, emphysema: Callable | None = None) -> None:
        """Paint the normal chest into ``canvas`` (HU + tissue codes); ``emphysema(grid, x, y, z, lung_mask)``
        optionally returns a mask of lung voxels that become emphysematous."""
        g = canvas.grid
        x, y, z = g.open_coords()
        hu, tis = canvas.hu, canvas.tissue
        s = self.s
        # body layers
        body = self.body_rho(x, y, z) <= 1
        inner_skin = self.body_rho(x, y, z, self.skin) <= 1
        inner_fat = self.body_rho(x, y, z, self.skin + self.fat) <= 1
        _set(hu, tis, body, HU["skin"], SKIN)
        _set(hu, tis, inner_skin, HU["fat"], FAT)
        _set(hu, tis, inner_fat, HU["muscle"], MUSCLE)
        cav_rho = self.cavity_rho(x, y, z)
        cavity = (cav_rho <= 1) & inner_fat
        dz = self.diaphragm_z(x, y)
        below = z <= dz
        abdomen = cavity & below
        _set(hu, tis, cavity & ~below, HU["med_fat"], MED_FAT)
        _set(hu, tis, cavity & below & (z > dz - 4), HU["muscle"], DIAPHRAGM)
        _set(hu, tis, abdomen & (z <= dz - 4), HU["abdomen"], ABDOMEN)
        liver = abdomen & (z <= dz - 4) & (x > self.cx - 15 * s + 0.25 * (y - self.cyc))
        _set(hu, tis, liver, HU["liver"], LIVER)
        in_abd = [ABDOMEN, LIVER]
        canvas.paint(self.spleen, HU["spleen"], SPLEEN, allowed=in_abd)
        canvas.paint(self.stomach, HU["abdomen"], STOMACH, allowed=in_abd)
        inner = Ellipsoid(self.stomach.c, self.stomach.semi - 4)
        gas_y = self.stomach.c[1] + 0.45 * self.stomach.semi[1]
        canvas.paint(inner, lambda x_, y_, z_, m: np.where(np.broadcast_to(y_ > gas_y, m.shape), HU["air"],
                                                           HU["stomach"]).astype(np.float32), STOMACH, allowed=[STOMACH])
        # lungs
        lung = cavity & (z > dz + 4) & ~self.in_mediastinum(x, y, z)
        dep = np.clip((self.cyc - y) / (2 * self.b_c) + 0.5, 0, 1)
        tex = self.texture.sample_grid(g)
        lung_hu = HU["lung"] + 55 * dep - 25 + 18 * tex
        lung_hu = np.broadcast_to(lung_hu, g.shape)
        hu[lung] = lung_hu[lung]
        tis[lung] = np.where(np.broadcast_to(x >= self.xm, g.shape)[lung], LUNG_R, LUNG_L)
        if emphysema is not None:
            emph = emphysema(g, x, y, z, lung)
            hu[emph] = -980.0 + 8 * tex[emph]
        # heart and pericardial sac
        in_cav = lambda x_, y_, z_: self.cavity_rho(x_, y_, z_) <= 1  # noqa: E731
        canvas.paint(self.sac, HU["med_fat"], MED_FAT, clip=in_cav)
        h = self.heart
        if self.eff > 0:
            canvas.paint(Ellipsoid(h.c, h.semi + self.eff + 1.5, h.rot), HU["pericardium"], PERICARDIUM, clip=in_cav)
            canvas.paint(Ellipsoid(h.c, h.semi + self.eff, h.rot), self.eff_hu, PERICARDIUM, clip=in_cav)
        else:
            canvas.paint(Ellipsoid(h.c, h.semi + 2.5, h.rot), HU["pericardium"], PERICARDIUM, clip=in_cav)
            canvas.paint(Ellipsoid(h.c, h.semi + 1.0, h.rot), HU["med_fat"], MED_FAT, clip=in_cav)
        canvas.paint(h, HU["myocardium"], HEART, clip=in_cav)
        canvas.paint(Ellipsoid(h.c, h.semi - 9, h.rot), HU["chamber"], HEART)
        for c in self.great_vessels:
            canvas.paint(c, HU["blood"], VESSEL, soft=True)
        for c in self.esophagus:
            canvas.paint(c, HU["muscle"], ESOPHAGUS)
        for c in self.trachea + self.main_bronchi:
            canvas.paint(Capsule(c.p0, c.p1, c.r + 2), HU["muscle"], AIRWAY, soft=True)
        for c in self.trachea + self.main_bronchi:
            canvas.paint(c, HU["air"], AIRWAY, soft=True)
        # lung trees: vessels first, then airways (wall, lumen), only inside lung parenchyma
        lung_ok = [LUNG_R, LUNG_L, LUNG_VESSEL]
        for t in self.trees:
            if t.kind != "airway":
                for c in t.segments:
                    canvas.paint(c, HU["blood"], LUNG_VESSEL, allowed=lung_ok, soft=True)
        for t in self.trees:
            if t.kind == "airway":
                for c in t.segments:
                    canvas.paint(Capsule(c.p0, c.p1, c.r * 1.3 + 0.4), HU["muscle"], LUNG_AIRWAY,
                                 allowed=lung_ok + [LUNG_AIRWAY], soft=True)
                for c in t.segments:
                    canvas.paint(c, HU["air"], LUNG_AIRWAY, allowed=lung_ok + [LUNG_AIRWAY], soft=True)
        self._render_bones(canvas, x, y, z, cav_rho, inner_skin)

    def _render_bones(self, canvas: Canvas, x, y, z, cav_rho, inner_skin) -> None:
        hu, tis, s = canvas.hu, canvas.tissue, self.s
        g = canvas.grid
        # spine: vertebral bodies with discs, canal, posterior arch, spinous and transverse processes
        ph = np.mod(z - self.vert_phase, self.vert_period) / self.vert_period  # 0..1 along one level
        disc = np.abs(ph - 0.5) > 0.5 - 3 * s / self.vert_period
        rx, ry = self.rv
        vb = ((x - self.cx) / rx) ** 2 + ((y - self.y_v) / ry) ** 2
        vb_in = (vb <= 1) & inner_skin
        cortex = vb > (1 - 2.8 / ry) ** 2
        _set(hu, tis, vb_in, np.where(disc, HU["disc"], np.where(cortex, HU["cortex"], HU["marrow"])), BONE)
        rc = np.sqrt((x - self.cx) ** 2 + (y - self.y_canal) ** 2)
        mid = np.abs(ph - 0.5) < 0.3
        arch = (rc >= 8 * s) & (rc <= 14 * s) & (y <= self.y_canal + 6 * s) & mid
        spinous = (np.abs(x - self.cx) <= 4 * s) & (y <= self.y_canal - 12 * s) & (y >= self.y_canal - 34 * s) & mid
        transverse = ((np.abs(y - self.y_canal - 2 * s) <= 5 * s) & (np.abs(x - self.cx) >= 12 * s)
                      & (np.abs(x - self.cx) <= 36 * s) & (np.abs(ph - 0.5) < 0.2))
        post = (arch | spinous | transverse) & inner_skin
        _set(hu, tis, post, HU["cortex"] * 0.8, BONE)
        _set(hu, tis, (rc < 8 * s) & np.broadcast_to(True, vb.shape), HU["canal"], CANAL)
        # ribs: a band outside the cavity ellipse, one arc every rib_period, sloping down anteriorly
        grow = self.rib_t
        band = (cav_rho > 1) & (self.cavity_rho(x, y, z, grow) <= 1)
        if band.any():
            idx = np.nonzero(band)
            xs, ys, zs = (np.broadcast_to(c, g.shape)[idx] for c in (x, y, z))
            phi = np.arctan2(np.abs(xs - self.cx) / self.a_c, -(ys - self.cyc) / self.b_c)  # 0 posterior, pi anterior
            zu = zs + self.rib_drop * (1 - np.cos(phi)) / 2
            k = np.round((self.rib_top - zu) / self.rib_period)
            kc = np.clip(k, 0, 11).astype(int)
            dzr = np.abs(self.rib_top - k * self.rib_period + self.rib_level_jitter[kc] - zu)
            is_rib = (k >= 0) & (k <= 11) & (dzr <= self.rib_h) & (phi > np.radians(14))
            cart = is_rib & (phi > np.radians(140))
            gsc = self.cavity_scale(zs)
            rr = np.sqrt(((xs - self.cx) / (self.a_c * gsc + grow / 2)) ** 2
                         + ((ys - self.cyc) / (self.b_c * gsc + grow / 2)) ** 2)
            radial = np.abs(rr - 1) * (self.b_c * gsc + grow / 2) / (grow / 2)
            edge = (radial > 0.55) | (dzr > 0.55 * self.rib_h)
            val = np.where(cart, HU["cartilage"], np.where(edge, HU["cortex"], HU["marrow"]))
            sel = tuple(i[is_rib] for i in idx)
            hu[sel] = val[is_rib]
            tis[sel] = np.where(cart[is_rib], CARTILAGE, BONE)
        # sternum
        z_lo, z_hi = self.heart.c[2] - 0.6 * self.heart_ext[2], self.z_apex - 25 * s
        y0 = self.cyc + self.b_c
        st = Ellipsoid((self.xm, y0 + self.rib_t / 2, (z_lo + z_hi) / 2), (15 * s, self.rib_t / 2 + 1, (z_hi - z_lo) / 2))
        canvas.paint(st, HU["cortex"], BONE)
        canvas.paint(Ellipsoid(st.c, st.semi - np.array([2.5, 2.5, 2.5])), HU["marrow"], BONE)
        # clavicles
        for sg in (1.0, -1.0):
            zc = self.z_apex - 10 * s
            pts = [(self.xm + sg * 22 * s, y0 + 8, zc), (self.cx + sg * 0.45 * self.a_body, y0 + 10, zc + 8 * s),
                   (self.cx + sg * 0.75 * self.a_body, self.cyc + 0.3 * self.b_c, zc + 18 * s)]
            for c in polyline(pts, 7 * s):
                canvas.paint(c, HU["cortex"], BONE, allowed=[SKIN, FAT, MUSCLE, MED_FAT, LUNG_R, LUNG_L, BONE])


def _set(hu: np.ndarray, tis: np.ndarray, mask: np.ndarray, value, code: int) -> None:
    mask = np.broadcast_to(mask, hu.shape)
    if isinstance(value, np.ndarray):
        hu[mask] = np.broadcast_to(value, hu.shape)[mask]
    else:
        hu[mask] = value
    tis[mask] = code
