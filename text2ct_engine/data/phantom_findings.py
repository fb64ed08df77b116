"""Findings of the phantom: what a study has (:class:`Findings`), where it goes, and how it is painted.

Each finding is placed in world space with checks that keep it visible (inside the lung, clear of the
mediastinum, the diaphragm, large vessels and the other findings); a finding that cannot be placed is
dropped, so the returned :class:`Findings` (and the labels and report made from it) always describe what
is in the volume.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import numpy as np

from .labels import CTRATE_LABELS
from .phantom_anatomy import (HU, LOBES, LUNG_AIRWAY, LUNG_L, LUNG_R, LUNG_TISSUES, LUNG_VESSEL, MED_FAT, NODE,
                              Anatomy, union_mask)
from .phantom_geometry import Canvas, Capsule, Ellipsoid, Region, Shape, SmoothField, frame_from_axis, sphere_points

SIDES = ("left", "right")
EFFUSION, NODULE, CONSOLIDATION, ATELECTASIS, CALCIFICATION, METAL, HERNIA_GAS, HERNIA = range(30, 38)
MATERIALS = ("pacemaker", "port catheter", "sternotomy wires")
STATIONS = ("right paratracheal", "subcarinal", "paraesophageal", "prevascular")


@dataclass
class Findings:
    """The findings of one phantom study. Empty strings / False / 0 mean absent."""

    pleural_effusion_side: str = ""       # "left" | "right" | "bilateral"
    pleural_effusion_size: str = ""       # "small" | "large"
    lung_nodule_side: str = ""            # "left" | "right"
    lung_nodule_lobe: str = ""            # "upper" | "middle" | "lower"
    lung_nodule_size_mm: float = 0.0      # diameter
    consolidation_side: str = ""
    consolidation_lobe: str = ""
    atelectasis_side: str = ""
    atelectasis_lobe: str = ""
    emphysema: bool = False
    cardiomegaly: bool = False
    pericardial_effusion: bool = False
    arterial_wall_calcification: bool = False
    coronary_artery_wall_calcification: bool = False
    hiatal_hernia: bool = False
    lymphadenopathy_stations: str = ""    # ";"-separated station names
    lymphadenopathy_size_mm: float = 0.0  # largest short axis
    medical_material: str = ""            # one of MATERIALS

    def ctrate_labels(self) -> dict[str, int]:
        """The 18 CT-RATE abnormality labels (0/1); labels the phantom never makes are 0."""
        on = {
            "Medical material": bool(self.medical_material),
            "Arterial wall calcification": self.arterial_wall_calcification,
            "Cardiomegaly": self.cardiomegaly,
            "Pericardial effusion": self.pericardial_effusion,
            "Coronary artery wall calcification": self.coronary_artery_wall_calcification,
            "Hiatal hernia": self.hiatal_hernia,
            "Lymphadenopathy": bool(self.lymphadenopathy_stations),
            "Emphysema": self.emphysema,
            "Atelectasis": bool(self.atelectasis_side),
            "Lung nodule": bool(self.lung_nodule_side),
            "Consolidation": bool(self.consolidation_side),
            "Pleural effusion": bool(self.pleural_effusion_side),
        }
        return {name: int(on.get(name, False)) for name in CTRATE_LABELS}

    def is_normal(self) -> bool:
        return not any(self.ctrate_labels().values())

    def extra_fields(self) -> dict[str, object]:
        """The side/lobe/size fields, for the labels CSV."""
        return {k: v for k, v in asdict(self).items() if not isinstance(v, bool)}

    @classmethod
    def from_row(cls, row: dict[str, str]) -> "Findings":
        """Inverse of the labels CSV row (CT-RATE columns + extra fields)."""
        kw: dict[str, object] = {}
        for f in fields(cls):
            if f.type in ("bool", bool):
                continue
            if f.name in row:
                kw[f.name] = float(row[f.name] or 0) if f.type in ("float", float) else row[f.name]
        lab = {k: int(float(row.get(k, 0) or 0)) for k in CTRATE_LABELS}
        kw.update(emphysema=bool(lab["Emphysema"]), cardiomegaly=bool(lab["Cardiomegaly"]),
                  pericardial_effusion=bool(lab["Pericardial effusion"]),
                  arterial_wall_calcification=bool(lab["Arterial wall calcification"]),
                  coronary_artery_wall_calcification=bool(lab["Coronary artery wall calcification"]),
                  hiatal_hernia=bool(lab["Hiatal hernia"]))
        return cls(**kw)  # type: ignore[arg-type]


def sample_findings(rng: np.random.Generator, p: float = 0.22, normal_fraction: float = 0.2) -> Findings:
    """Draw a study's findings: all absent with ``normal_fraction``, else each present with probability ``p``."""
    draws = rng.random(14)
    choice = rng.random(12)
    f = Findings()
    if draws[0] < normal_fraction:
        return f
    pick = lambda opts, u: opts[min(int(u * len(opts)), len(opts) - 1)]  # noqa: E731
    if draws[1] < p:
        f.pleural_effusion_side = pick(("left", "right", "bilateral"), choice[0])
        f.pleural_effusion_size = pick(("small", "large"), choice[1])
    if draws[2] < p:
        f.lung_nodule_side = pick(SIDES, choice[2])
        lobes = ("upper", "middle", "lower") if f.lung_nodule_side == "right" else ("upper", "lower")
        f.lung_nodule_lobe = pick(lobes, choice[3])
        f.lung_nodule_size_mm = float(np.round(10 + 20 * choice[4] ** 1.5))  # 10-30 mm: resolvable at 3 mm
    if draws[3] < p:
        f.consolidation_side = pick(SIDES, choice[5])
        lobes = ("upper", "middle", "lower") if f.consolidation_side == "right" else ("upper", "lower")
        f.consolidation_lobe = pick(lobes, choice[6])
    if draws[4] < p:
        f.atelectasis_side = pick(SIDES, choice[7])
        f.atelectasis_lobe = "lower" if choice[8] < 0.7 else ("middle" if f.atelectasis_side == "right" else "upper")
    f.emphysema = bool(draws[5] < p)
    f.cardiomegaly = bool(draws[6] < p)
    f.pericardial_effusion = bool(draws[7] < p * 0.8)
    f.arterial_wall_calcification = bool(draws[8] < p * 1.3)
    f.coronary_artery_wall_calcification = bool(draws[9] < p)
    f.hiatal_hernia = bool(draws[10] < p * 0.8)
    if draws[11] < p:
        n = 1 + int(choice[9] * 2.99)
        order = np.argsort(rng.random(len(STATIONS)))
        f.lymphadenopathy_stations = ";".join(STATIONS[i] for i in sorted(order[:n]))
    if draws[12] < p * 0.8:
        f.medical_material = pick(MATERIALS, choice[10])
    return f


# ------------------------------------------------------------------------------------------ placement
@dataclass
class Lesion:
    """A painted finding: its solid, HU and tissue code (plus bronchograms for consolidation)."""

    shape: Shape
    hu: float
    code: int
    extra: list[Shape] = field(default_factory=list)
    clear: Shape | None = None  # vessels and airways inside this solid are removed (keeps the lesion isolated)


@dataclass
class Placed:
    """Everything the renderer needs to paint the findings of one study."""

    findings: Findings
    effusions: list[Lesion] = field(default_factory=list)
    lung_lesions: list[Lesion] = field(default_factory=list)
    nodule: Lesion | None = None
    nodes: list[Ellipsoid] = field(default_factory=list)
    small_nodes: list[Ellipsoid] = field(default_factory=list)
    calcs: list[tuple[Ellipsoid, float]] = field(default_factory=list)
    metal: list[tuple[Shape, float]] = field(default_factory=list)
    emphysema_field: SmoothField | None = None


def anatomy_kwargs(f: Findings, rng: np.random.Generator) -> dict:
    """Arguments of :class:`Anatomy` that the findings set (heart size, pericardial fluid, hernia)."""
    ctr, eff = rng.uniform(0.55, 0.60), rng.uniform(8, 14)
    return dict(ctr=float(ctr) if f.cardiomegaly else None,
                pericardial_effusion_mm=float(eff) if f.pericardial_effusion else 0.0, hernia=f.hiatal_hernia)


class _Placer:
    def __init__(self, an: Anatomy, rng: np.random.Generator):
        self.an, self.rng = an, rng
        # lung-tree vessels near a nodule or lesion are cleared when it is painted; these are not
        self.vessels = an.great_vessels + an.main_bronchi
        self.p0 = np.array([c.p0 for c in self.vessels])
        self.v = np.array([c.v for c in self.vessels])
        self.r = np.array([c.r for c in self.vessels])
        self.taken: list[Shape] = []
        self.hilar: list[Shape] = an.pa + an.pv + an.main_bronchi
        self.effusion_pred: dict[str, Callable] = {}

    def u(self, a: float, b: float) -> float:
        return float(self.rng.uniform(a, b))

    def vessel_clearance(self, c: np.ndarray) -> float:
        """Distance (mm) from point ``c`` to the surface of the nearest large vessel or airway."""
        d = c[None, :] - self.p0
        t = np.clip((d * self.v).sum(1) / np.maximum((self.v ** 2).sum(1), 1e-9), 0, 1)
        return float((np.linalg.norm(d - t[:, None] * self.v, axis=1) - self.r).min())

    def free(self, x, y, z, side: str, margin: float, taken: list[Shape] | None = None) -> np.ndarray:
        """Lung of ``side``, ``margin`` mm clear of mediastinum/diaphragm, effusions and earlier lesions."""
        an = self.an
        ok = an.in_lung(x, y, z, margin) & (an.side_of(x) == side)
        ok &= ~union_mask(self.hilar, x, y, z, margin)  # pulmonary arteries/veins and main bronchi
        if side in self.effusion_pred:
            ok &= ~self.effusion_pred[side](x, y, z, margin)
        for s in self.taken if taken is None else taken:
            ok &= ~s.contains(x, y, z, margin)
        return ok

    def wall_point(self, side: str, phi: float, z: float) -> tuple[np.ndarray, np.ndarray]:
        """Point of the cavity wall on ``side`` at angle ``phi`` (0 lateral, >0 anterior) and its inward normal."""
        an = self.an
        g = float(an.cavity_scale(z))
        sg = 1.0 if side == "right" else -1.0
        a, b = an.a_c * g, an.b_c * g
        t = np.arctan2(np.sin(phi) * a, np.cos(phi) * b)
        p = np.array([an.cx + sg * a * np.cos(t), an.cyc + b * np.sin(t), z])
        n = -np.array([sg * np.cos(t) / a, np.sin(t) / b, 0.0])
        return p, n / np.linalg.norm(n)

    def lobe_z(self, lobe: str) -> tuple[float, float]:
        an, s = self.an, self.an.s
        dome = min(an.dome_r, an.dome_l)
        return {"upper": (an.z_carina - 5 * s, an.z_apex - 35 * s), "middle": (dome + 15, an.z_carina - 35 * s),
                "lower": (dome + 5, an.z_carina - 10 * s)}[lobe]

    def mc_volume(self, shape: Shape, pred, n: int = 3000) -> float:
        lo, hi = shape.bounds()
        pts = lo + (hi - lo) * self.rng.random((n, 3))
        x, y, z = pts.T
        inside = shape.contains(x, y, z) & pred(x, y, z)
        return float(inside.mean() * np.prod(hi - lo)) / 1000.0  # cc

    # ---------------------------------------------------------------- findings
    def effusion(self, side: str, size: str) -> Lesion:
        """Dependent pleural fluid: a crescent along the posterior-lateral chest wall plus a horizontal layer,
        thickest at the lung base and thinning upward (supine patient)."""
        an = self.an
        if size == "large":
            d0, level0, height = self.u(35, 50), self.u(45, 70), self.u(130, 170)
        else:
            d0, level0, height = self.u(16, 24), self.u(8, 14), self.u(65, 95)
        top = an.dome_r if side == "right" else an.dome_l
        z_base = top - an.recess
        y_floor = an.cyc - an.b_c

        def pred(x, y, z, margin=0.0, d0=d0, level0=level0, height=height, z_base=z_base):
            t = np.clip(1 - (z - margin - z_base) / height, 0, 1) ** 0.5  # margin also extends it upward
            d = d0 * t + margin
            g = an.cavity_scale(z)
            a_in = np.maximum(an.a_c * g - 0.35 * d, 1.0)
            b_in = np.maximum(an.b_c * g - 0.5 * d, 1.0)
            outside_inner = ((x - an.cx) / a_in) ** 2 + ((y - an.cyc - 0.5 * d) / b_in) ** 2 > 1
            crescent = outside_inner & (y < an.cyc + 0.15 * an.b_c) & (t > 0)
            layer = y < y_floor + level0 * t + margin
            return (crescent | layer) & (an.side_of(x) == side)

        self.effusion_pred[side] = pred
        sg = 1.0 if side == "right" else -1.0
        xs = sorted((an.xm, an.cx + sg * (an.a_c + 5)))
        region = Region((xs[0], y_floor - 5, z_base - 5), (xs[1], an.cyc + 0.2 * an.b_c, z_base + height + 5), pred)
        return Lesion(region, self.u(4, 16), EFFUSION)

    def lung_lesion(self, side: str, lobe: str, kind: str) -> Lesion | None:
        an, s = self.an, self.an.s
        code, want = (CONSOLIDATION, 18.0) if kind == "consolidation" else (ATELECTASIS, 8.0)
        z_lo, z_hi = self.lobe_z(lobe)
        for _ in range(60):
            z = self.u(z_lo, z_hi)
            if lobe == "lower":
                phi = self.u(-60, 0)
            elif lobe == "middle":
                phi = self.u(20, 70)
            else:
                phi = self.u(-40, 60)
            p, n = self.wall_point(side, np.radians(phi), z)
            if kind == "consolidation":
                semi = np.array([self.u(24, 34), self.u(24, 38), self.u(24, 36)]) * s
                c = p + n * semi[0] * 0.45
                hu = self.u(30, 40)
            else:
                semi = np.array([self.u(32, 45) * s, self.u(25, 38) * s, self.u(5.5, 7.5)])
                c = p + n * semi[0] * 0.55
                hu = self.u(48, 60)
            t = np.cross([0.0, 0.0, 1.0], n)
            rot = np.stack([n, t / np.linalg.norm(t), [0.0, 0.0, 1.0]], axis=1)
            ell = Ellipsoid(c, semi, rot)
            if an.lobe_of(*c) != LOBES.index(lobe) or not self.free(*c[:, None], side, 10.0).all():
                continue

            def pred(x, y, z, lobe_i=LOBES.index(lobe), taken=list(self.taken)):
                return self.free(x, y, z, side, 10.0, taken) & (an.lobe_of(x, y, z) == lobe_i)

            vol = self.mc_volume(ell, pred)
            if vol < want:
                continue
            lo, hi = ell.bounds()
            region = Region(lo, hi, lambda x, y, z, ell=ell, pred=pred: ell.contains(x, y, z) & pred(x, y, z))
            extra: list[Shape] = []
            if kind == "consolidation":  # air bronchograms running from the hilum side into the lesion
                h = an.hilum[side]
                for _k in range(3):
                    d = (c - h) / np.linalg.norm(c - h) + self.rng.normal(0, 0.25, 3)
                    d /= np.linalg.norm(d)
                    start = c - d * semi.min() * 0.8
                    extra.append(Capsule(start, c + d * semi.max() * 0.8, self.u(1.4, 2.2)))
            self.taken.append(Ellipsoid(c, semi, rot))
            return Lesion(region, hu, code, extra, clear=Ellipsoid(c, semi + 6.0, rot))
        return None

    def nodule(self, side: str, lobe: str, size: float) -> Lesion | None:
        an = self.an
        r = size / 2
        z_lo, z_hi = self.lobe_z(lobe)
        sg = 1.0 if side == "right" else -1.0
        sph = sphere_points(48)
        for _ in range(300):
            c = np.array([an.cx + sg * self.u(0.25, 0.95) * an.a_c, an.cyc + self.u(-0.9, 0.8) * an.b_c,
                          self.u(z_lo - 20, z_hi + 10)])
            if an.lobe_of(*c) != LOBES.index(lobe):
                continue
            pts = c + sph * (r + 8)
            if not self.free(*c[:, None], side, 8.0).all() or not self.free(*pts.T, side, 6.0).all():
                continue
            if self.vessel_clearance(c) < r + 8:
                continue
            semi = r * np.array([self.u(0.92, 1.08), self.u(0.92, 1.08), self.u(0.92, 1.08)])
            rot = frame_from_axis(self.rng.normal(size=3))
            ell = Ellipsoid(c, semi, rot)
            self.taken.append(ell)
            return Lesion(ell, self.u(25, 50), NODULE)
        return None

    def lymph_nodes(self, stations: list[str]) -> tuple[list[Ellipsoid], float]:
        an, s = self.an, self.an.s
        anchors = {
            "right paratracheal": (an.xm + an.r_tr + 13 * s, an.y_tr + 3, an.z_carina + 20 * s),
            "subcarinal": (an.xm - 2, an.y_tr - 4, an.z_carina - 22 * s),
            "paraesophageal": (an.eso[0] + 16 * s, an.eso[1], an.z_carina - 45 * s),
            "prevascular": (an.xm - 4, an.cyc + 0.55 * an.b_c, an.z_arch - 4 * s),
        }
        obstacles = (an.great_vessels + an.trachea + an.main_bronchi + an.esophagus
                     + [an.sac, Ellipsoid((an.cx, an.y_v, 0.0), (an.rv[0], an.rv[1], 1e4))])
        nodes, short, placed = [], 0.0, []
        # requested stations first, then the others as fall-backs when a station has no room
        for st in list(stations) + [x for x in STATIONS if x not in stations]:
            if len(placed) >= len(stations):
                break
            for _ in range(80):
                sa = self.u(7.0, 11.0)
                semi = np.array([sa, sa * self.u(1.0, 1.2), sa * self.u(1.15, 1.5)])
                c = np.asarray(anchors[st]) + self.rng.normal(0, 6, 3)
                ell = Ellipsoid(c, semi)
                if self._clear(ell, obstacles + nodes, 3.0) and an.in_mediastinum(*c[:, None]).all():
                    nodes.append(ell)
                    placed.append(st)
                    short = max(short, 2 * sa)
                    break
        return nodes, short, [x for x in STATIONS if x in placed]

    def small_nodes(self, taken: list[Ellipsoid]) -> list[Ellipsoid]:
        an, s = self.an, self.an.s
        obstacles = (an.great_vessels + an.trachea + an.main_bronchi + an.esophagus
                     + [an.sac, Ellipsoid((an.cx, an.y_v, 0.0), (an.rv[0], an.rv[1], 1e4))] + taken)
        out = []
        for _ in range(4):
            c = np.array([an.xm + self.u(-25, 25) * s, an.y_tr + self.u(-10, 25), an.z_carina + self.u(-25, 30) * s])
            ell = Ellipsoid(c, np.array([self.u(2.5, 3.5)] * 3))
            if self._clear(ell, obstacles, 2.0) and an.in_mediastinum(*c[:, None]).all():
                out.append(ell)
        return out

    def _clear(self, ell: Ellipsoid, obstacles: list[Shape], gap: float) -> bool:
        pts = ell.c + (sphere_points(64) * (ell.semi + gap)) @ ell.rot.T
        pts = np.concatenate([pts, ell.c[None]], 0)
        return not union_mask(obstacles, *pts.T).any()

    def arterial_calcs(self) -> list[tuple[Ellipsoid, float]]:
        an = self.an
        heart_top = an.heart.c[2] + an.heart_ext[2]
        cands = [(c, "asc") for c in an.aorta_asc if max(c.p0[2], c.p1[2]) > heart_top + 25]
        cands += [(c, "arch") for c in an.aorta_arch] + [(c, "desc") for c in an.aorta_desc[:2]]
        out: list[tuple[Ellipsoid, float]] = []
        spine = Ellipsoid((an.cx, an.y_v, 0.0), (an.rv[0] + 13, an.rv[1] + 13, 1e4))
        for _ in range(400):
            if len(out) >= self.n_arterial:
                break
            seg, _kind = cands[int(self.rng.integers(len(cands)))]
            t = self.u(0.05, 0.95)
            p = seg.p0 + t * seg.v
            if p[2] < an.heart.c[2] - 0.8 * an.heart_ext[2] or p[2] > an.z_arch + 40:
                continue
            if _kind == "asc" and p[2] < heart_top + 18:
                continue
            d = np.cross(seg.v, self.rng.normal(size=3))
            d /= np.linalg.norm(d)
            c = p + d * (seg.r - 0.5)
            if spine.contains(*c[:, None]).all() or an.heart.contains(*c[:, None], margin=18.0 + an.eff).all():
                continue
            semi = (self.u(2.4, 3.6), self.u(2.4, 3.6), self.u(3.0, 4.5))
            out.append((Ellipsoid(c, semi, frame_from_axis(seg.v)), self.u(750, 1100)))
        return out

    def coronary_calcs(self) -> list[tuple[Ellipsoid, float]]:
        an = self.an
        h = an.heart
        out: list[tuple[Ellipsoid, float]] = []
        for _ in range(400):
            if len(out) >= self.n_coronary:
                break
            v = self.rng.normal(size=3)
            v /= np.linalg.norm(v)
            local = v * h.semi
            p = h.c + h.rot @ local
            normal = h.rot @ (v / h.semi)
            normal /= np.linalg.norm(normal)
            if normal[1] < 0.25 or p[2] < h.c[2] - 0.4 * an.heart_ext[2]:
                continue
            c = p + normal * 1.5
            semi = (self.u(2.4, 3.4), self.u(2.4, 3.4), self.u(2.8, 4.2))
            out.append((Ellipsoid(c, semi, frame_from_axis(np.cross(normal, [0, 0, 1.0]) + 1e-3)), self.u(750, 1100)))
        return out

    def material(self, kind: str) -> list[tuple[Shape, float]]:
        an, s = self.an, self.an.s
        out: list[tuple[Shape, float]] = []
        if kind == "sternotomy wires":
            z_lo, z_hi = an.heart.c[2] - 0.4 * an.heart_ext[2], an.z_apex - 35 * s
            yc = an.cyc + an.b_c + an.rib_t / 2
            for z in np.linspace(z_lo, z_hi, int(self.rng.integers(5, 8))):
                ang = np.linspace(0, 2 * np.pi, 13)
                pts = [(an.xm + 18 * s * np.cos(a), yc + (an.rib_t / 2 + 3) * np.sin(a), z + self.u(-2, 2)) for a in ang]
                out += [(c, 3000.0) for c in _chain(pts, 1.4)]
            return out
        sg = -1.0 if (kind == "pacemaker" and self.rng.random() < 0.8) or (kind != "pacemaker" and self.rng.random() < 0.3) else 1.0
        z = an.z_apex - self.u(38, 55) * s
        x = an.cx + sg * 0.55 * an.a_body
        a, ba, _ = an.body_axes(z)
        y_surf = an.cy + ba * max(1 - abs((x - an.cx) / a) ** an.p_body, 0.0) ** (1 / an.p_body)
        y = y_surf - an.skin - min(an.fat, 16) / 2 - 4
        # leads and catheters run under the clavicle into the subclavian vein, then down the SVC
        svc_top = an.svc[0].p0 + (an.svc[0].p1 - an.svc[0].p0) * 0.35
        sub = (an.cx + sg * 0.35 * an.a_body, an.cyc + 0.25 * an.b_c, an.z_apex + 12 * s)
        if kind == "pacemaker":
            out.append((Ellipsoid((x, y, z), (24 * s, 5.0, 21 * s)), 2800.0))
            path = [(x, y - 3, z), sub, svc_top, an.svc[0].p1, an.heart_point(0.6, 0.1, 0.1), an.heart_point(-0.2, 0.5, -0.5)]
            out += [(c, 3000.0) for c in _chain(path, 1.5)]
        else:
            out.append((Ellipsoid((x, y, z), (13.0, 6.0, 13.0)), 2200.0))
            path = [(x, y - 3, z), sub, svc_top, an.svc[0].p1]
            out += [(c, 300.0) for c in _chain(path, 1.5)]
        return out


def _chain(points, r: float) -> list[Capsule]:
    pts = [np.asarray(p, float) for p in points]
    return [Capsule(a, b, r) for a, b in zip(pts[:-1], pts[1:])]


def place_findings(an: Anatomy, f: Findings, rng: np.random.Generator) -> Placed:
    """Place every finding of ``f`` in ``an``; returns what to paint, with ``findings`` as actually placed."""
    pl = _Placer(an, rng)
    pl.n_arterial, pl.n_coronary = int(rng.integers(2, 6)), int(rng.integers(1, 4))
    out = Placed(findings=Findings(**asdict(f)))
    g = out.findings
    if f.pleural_effusion_side:
        sides = SIDES if f.pleural_effusion_side == "bilateral" else (f.pleural_effusion_side,)
        out.effusions = [pl.effusion(sd, f.pleural_effusion_size or "small") for sd in sides]
    for kind in ("consolidation", "atelectasis"):  # a lesion that finds no room is dropped from the findings
        side, lobe = getattr(f, f"{kind}_side"), getattr(f, f"{kind}_lobe")
        if side:
            les = pl.lung_lesion(side, lobe or "lower", kind)
            if les is None:
                setattr(g, f"{kind}_side", "")
                setattr(g, f"{kind}_lobe", "")
            else:
                out.lung_lesions.append(les)
    if f.lung_nodule_side:
        out.nodule = pl.nodule(f.lung_nodule_side, f.lung_nodule_lobe or "upper", f.lung_nodule_size_mm or 12.0)
        if out.nodule is None:
            g.lung_nodule_side, g.lung_nodule_lobe, g.lung_nodule_size_mm = "", "", 0.0
    if f.lymphadenopathy_stations:
        out.nodes, short, placed_st = pl.lymph_nodes(f.lymphadenopathy_stations.split(";"))
        g.lymphadenopathy_stations = ";".join(placed_st)
        g.lymphadenopathy_size_mm = float(np.round(short)) if out.nodes else 0.0
    out.small_nodes = pl.small_nodes(out.nodes)
    if f.arterial_wall_calcification:
        out.calcs += pl.arterial_calcs()
    if f.coronary_artery_wall_calcification:
        out.calcs += pl.coronary_calcs()
    if f.medical_material:
        out.metal = pl.material(f.medical_material)
    if f.emphysema:
        out.emphysema_field = SmoothField(rng, 7.0)
    return out


def emphysema_mask(an: Anatomy, fld: SmoothField) -> Callable:
    """Callable for :meth:`Anatomy.render`: patchy low attenuation, denser in the upper zones."""
    def fn(grid, x, y, z, lung):
        grid_vals = fld.sample_grid(grid)
        top, bottom = an.z_apex, min(an.dome_r, an.dome_l)
        w = np.clip((z - bottom) / (top - bottom), 0, 1)
        return lung & (grid_vals / 0.54 + 1.1 * w > 1.25)
    return fn


def render_findings(canvas: Canvas, an: Anatomy, placed: Placed, rng: np.random.Generator) -> None:
    """Paint the placed findings over the rendered normal anatomy."""
    lung_like = list(LUNG_TISSUES)
    for les in placed.effusions:
        canvas.paint(les.shape, les.hu, les.code, allowed=lung_like)
    for les in placed.lung_lesions:
        if les.clear is not None:  # vessels (and their partial-volume rims) stop short of the lesion
            canvas.paint(les.clear, HU["lung"], None, allowed=lung_like)
        canvas.paint(les.shape, les.hu, les.code, allowed=lung_like)
        for b in les.extra:
            canvas.paint(b, HU["air"] + 60, LUNG_AIRWAY, allowed=[les.code], soft=True)
    if placed.nodule is not None:
        ell = placed.nodule.shape
        assert isinstance(ell, Ellipsoid)
        canvas.paint(Ellipsoid(ell.c, ell.semi + 6.0, ell.rot), HU["lung"], None, allowed=lung_like)
        canvas.paint(ell, placed.nodule.hu, NODULE, soft=True)
    for ell in placed.nodes + placed.small_nodes:
        canvas.paint(ell, 38.0, NODE, allowed=[MED_FAT, LUNG_R, LUNG_L, LUNG_VESSEL, NODE], soft=True)
    if an.hernia is not None:
        h = an.hernia
        canvas.paint(Capsule(h.c - np.array([0, 0, h.semi[2] * 0.6]), an.stomach.c, 9.0), HU["stomach"], HERNIA)
        canvas.paint(h, HU["muscle"], HERNIA)
        inner = Ellipsoid(h.c, h.semi - 3.5)
        gas_y = h.c[1] + 0.1 * inner.semi[1]
        canvas.paint(inner, lambda x, y, z, m: np.where(np.broadcast_to(y > gas_y, m.shape), HU["air"],
                                                        HU["stomach"]).astype(np.float32), HERNIA)
    for ell, hu in placed.calcs:
        canvas.paint(ell, hu, CALCIFICATION, soft=True)
    for shp, hu in placed.metal:
        canvas.paint(shp, hu, METAL, soft=True)
