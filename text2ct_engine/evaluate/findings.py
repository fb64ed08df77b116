"""Finding detector for chest CT volumes: reads HU + spacing only, reports each phantom finding and its side.

It knows chest anatomy, not the phantom generator: lungs are the large air spaces inside the body, the heart
is the large soft-tissue blob between them, the rib cage bounds the thoracic cavity, and each finding has a
signature a radiologist would use (fluid density where lung should be, dense pleura-based lung with or
without air bronchograms, round solid blobs in aerated lung, low-attenuation lung, calcium on the aorta or
the heart, gas above the diaphragm behind the heart, soft-tissue nodes in mediastinal fat, metal). Volumes
are analysed on a 3 mm grid. Array convention: (x, y, z) in RAS+ order (x toward the patient's right,
y anterior, z superior), as written by :mod:`text2ct_engine.data.phantom` and returned by the CT-RATE loader.

Self-test (accuracy per label on fresh phantoms)::

    python -m text2ct_engine.evaluate.findings --selftest --n 200 --size 128 128 128 --seed 1000
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..cli import Parser, path as cli_path
from .morphology import Components, components, dilate, erode, label

WORK_MM = 3.0
FINDING_KEYS = ("pleural_effusion", "lung_nodule", "consolidation", "atelectasis", "emphysema", "cardiomegaly",
                "pericardial_effusion", "arterial_wall_calcification", "coronary_artery_wall_calcification",
                "hiatal_hernia", "lymphadenopathy", "medical_material")
SIDED = ("pleural_effusion", "lung_nodule", "consolidation", "atelectasis")


@dataclass
class Detection:
    """Detector output: presence per finding, side where the finding has one, and the measurements used."""

    present: dict[str, bool] = field(default_factory=dict)
    side: dict[str, str] = field(default_factory=dict)  # "left" | "right" | "bilateral" | ""
    measures: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """Plain-Python (JSON-ready) copy."""
        d = asdict(self)
        d["present"] = {k: bool(v) for k, v in d["present"].items()}
        d["measures"] = {k: float(v) for k, v in d["measures"].items()}
        return d


# ------------------------------------------------------------------------------------------- helpers
def to_working_grid(hu: np.ndarray | torch.Tensor, spacing, target: float = WORK_MM) -> tuple[np.ndarray, tuple]:
    """Resample a HU volume to ``target`` mm voxels (area averaging down, trilinear up); returns (vol, spacing)."""
    v = torch.as_tensor(np.asarray(hu), dtype=torch.float32)[None, None]
    size_in = v.shape[2:]
    size = [max(int(round(n * s / target)), 1) for n, s in zip(size_in, spacing)]
    down = [min(a, b) for a, b in zip(size, size_in)]
    if list(down) != list(size_in):
        v = F.interpolate(v, size=down, mode="area")
    if list(size) != list(down):
        v = F.interpolate(v, size=size, mode="trilinear", align_corners=False)
    new_sp = tuple(n * s / m for n, s, m in zip(size_in, spacing, size))
    return v[0, 0].numpy(), new_sp


def smooth(v: np.ndarray) -> np.ndarray:
    """[1, 2, 1] / 4 smoothing along every axis."""
    t = torch.from_numpy(np.ascontiguousarray(v, np.float32))[None, None]
    k = torch.tensor([0.25, 0.5, 0.25])
    for a in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + a] = 3
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - a)] = pad[2 * (2 - a) + 1] = 1
        t = F.conv3d(F.pad(t, pad, mode="replicate"), k.view(shape))
    return t[0, 0].numpy()


def median3_at(v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """3x3x3 median of ``v`` at the voxels of ``mask`` (edge-preserving denoising; others are NaN)."""
    out = np.full(v.shape, np.nan, np.float32)
    idx = np.nonzero(mask)
    if idx[0].size == 0:
        return out
    p = np.pad(v, 1, mode="edge")
    vals = np.empty((idx[0].size, 27), np.float32)
    k = 0
    for dx in (0, 1, 2):
        for dy in (0, 1, 2):
            for dz in (0, 1, 2):
                vals[:, k] = p[idx[0] + dx, idx[1] + dy, idx[2] + dz]
                k += 1
    out[idx] = torch.from_numpy(vals).median(dim=1).values.numpy()
    return out


class _Case:
    """Intermediate masks and landmarks of one volume on the working grid."""

    def __init__(self, hu: np.ndarray, spacing):
        self.native_metal = int(np.count_nonzero(np.asarray(hu) > 1500))
        v, sp = to_working_grid(hu, spacing)
        self.v, self.sp = v, sp
        self.s = smooth(v)
        self.shape = v.shape
        self.coords = tuple((np.arange(n) - (n - 1) / 2) * s for n, s in zip(v.shape, sp))
        self.voxel_cc = float(np.prod(sp)) / 1000.0
        self.X = self.coords[0][:, None, None]
        self.Y = self.coords[1][None, :, None]
        self.Z = self.coords[2][None, None, :]

    def comps(self, mask: np.ndarray) -> Components:
        return components(mask, self.coords, self.voxel_cc)


# ------------------------------------------------------------------------------------------- detector
def detect_findings(hu: np.ndarray | torch.Tensor, spacing) -> Detection:
    """Detect the phantom findings in a HU volume with axes (x, y, z) and voxel ``spacing`` (mm)."""
    c = _Case(np.asarray(hu, dtype=np.float32), tuple(float(s) for s in spacing))
    det = Detection()
    _body_and_lungs(c)
    if c.lung_cc < 200:  # no chest here: report nothing
        for k in FINDING_KEYS:
            det.present[k] = False
            det.side[k] = ""
        det.measures["lung_cc"] = c.lung_cc
        return det
    _midline_and_cavity(c)
    _heart(c, det)
    _effusions(c, det)
    _emphysema(c, det)
    _nodules(c, det)
    _lung_lesions(c, det)
    _calcifications(c, det)
    _hernia(c, det)
    _lymph_nodes(c, det)
    det.present["medical_material"] = c.native_metal >= 2
    det.measures["metal_voxels"] = float(c.native_metal)
    for k in FINDING_KEYS:
        det.present.setdefault(k, False)
        det.side.setdefault(k, "")
    return det


def _box(c: _Case, comp: Components, i: int, pad: int = 3) -> tuple[slice, slice, slice]:
    """Index box around component ``i`` (0-based) with ``pad`` voxels of margin."""
    out = []
    for a in range(3):
        lo = int(np.floor((comp.lo[i, a] - c.coords[a][0]) / c.sp[a] + 1e-6)) - pad
        hi = int(np.ceil((comp.hi[i, a] - c.coords[a][0]) / c.sp[a] - 1e-6)) + pad + 1
        out.append(slice(max(lo, 0), min(hi, c.shape[a])))
    return tuple(out)  # type: ignore[return-value]


def _body_and_lungs(c: _Case) -> None:
    air = c.s < -400
    lab, n = label(air)
    border = np.unique(np.concatenate([lab[[0, -1]].ravel(), lab[:, [0, -1]].ravel()]))
    outside = np.isin(lab, border[border > 0])
    c.body = ~outside
    inner = air & ~outside
    comp = c.comps(inner)
    big = np.nonzero(comp.volume_cc > 150)[0] + 1
    c.lung = np.isin(comp.labels, big)
    c.gas_comp = comp
    c.gas_big = set(big.tolist())
    c.lung_cc = float(c.lung.sum() * c.voxel_cc)


def _midline_and_cavity(c: _Case) -> None:
    """Midline from the spine, thoracic slices from the lungs, cavity from the rib cage (per-slice hull)."""
    bc = c.comps((c.v > 180) & (c.v < 1500) & c.body)
    c.bone = np.isin(bc.labels, np.nonzero(bc.volume_cc >= 2.0)[0] + 1)  # skeleton, not calcium specks
    bone = c.bone
    lung_area = c.lung.sum((0, 1))
    c.thorax_z = lung_area > 0.15 * lung_area.max()
    zs = np.nonzero(c.thorax_z)[0]
    c.z_lo, c.z_hi = c.coords[2][zs[0]], c.coords[2][zs[-1]]
    lx = np.nonzero(c.lung.any((1, 2)))[0]
    ly = np.nonzero(c.lung.any((0, 2)))[0]
    c.xc = 0.5 * (c.coords[0][lx[0]] + c.coords[0][lx[-1]])
    c.yc = 0.5 * (c.coords[1][ly[0]] + c.coords[1][ly[-1]])
    post = bone & (c.Y < c.yc) & (np.abs(c.X - c.xc) < 40)
    xs = np.broadcast_to(c.X, c.shape)[post]
    c.x_mid = float(np.median(xs)) if xs.size > 20 else c.xc
    c.right = c.X > c.x_mid  # RAS: +x is the patient's right
    # rib-cage hull per slice (bone within +-7 mm of the slice, spine excluded), shrunk by a rib's
    # thickness and a margin, so that no chest-wall tissue is left inside
    metal = dilate(c.v > 1500, 2)
    cartilage = (c.s > 90) & (c.v < 180)
    bone = (bone | cartilage) & c.body & ~metal & (np.abs(c.X - c.x_mid) > 25)  # ribs and costal cartilage
    # Each slice takes the hull of the bone in the slab below it and in the slab above it and keeps their
    # intersection: where the cage narrows (apex) the narrower side wins.
    w = max(int(round(7 / c.sp[2])), 1)
    xg, yg = np.meshgrid(c.coords[0], c.coords[1], indexing="ij")
    below = [_slab_hull(c, bone, max(k - w, 0), k + 1, xg, yg) for k in range(c.shape[2])]
    above = [_slab_hull(c, bone, k, min(k + w + 1, c.shape[2]), xg, yg) for k in range(c.shape[2])]
    c.cavity = np.zeros(c.shape, bool)
    for k in range(c.shape[2]):
        if below[k] is not None and above[k] is not None:
            c.cavity[:, :, k] = below[k] & above[k]
    c.cavity &= c.body


def _slab_hull(c: _Case, bone: np.ndarray, lo: int, hi: int, xg: np.ndarray, yg: np.ndarray) -> np.ndarray | None:
    """In-plane mask of the convex hull of ``bone`` in slices [lo, hi), shrunk by 15 mm (a rib and a margin)."""
    sl = bone[:, :, lo:hi].any(2)
    rows = np.nonzero(sl.any(0))[0]
    if len(rows) < 4:
        return None
    # the hull of each row's two extreme points is the hull of all points
    idx = np.arange(sl.shape[0])[:, None]
    xmax = np.where(sl[:, rows], idx, -1).max(0)
    xmin = np.where(sl[:, rows], idx, sl.shape[0]).min(0)
    px = np.concatenate([xmin, xmax])
    py = np.concatenate([rows, rows])
    hull = _convex_hull(np.stack([c.coords[0][px], c.coords[1][py]], 1))
    return None if hull is None else _inside_polygon(hull, xg, yg, -15.0)


def _convex_hull(p: np.ndarray) -> np.ndarray | None:
    """Counter-clockwise convex hull (Andrew's monotone chain) of 2-D points."""
    p = np.unique(p, axis=0)
    if len(p) < 3:
        return None

    def half(points):
        h: list = []
        for q in points:
            while len(h) >= 2 and (h[-1][0] - h[-2][0]) * (q[1] - h[-2][1]) - (h[-1][1] - h[-2][1]) * (q[0] - h[-2][0]) <= 0:
                h.pop()
            h.append(q)
        return h

    lower, upper = half(p), half(p[::-1])
    return np.array(lower[:-1] + upper[:-1])


def _inside_polygon(hull: np.ndarray, xg: np.ndarray, yg: np.ndarray, offset: float) -> np.ndarray:
    """Points inside a convex CCW polygon moved inward by -``offset`` mm (offset < 0 shrinks)."""
    inside = np.ones(xg.shape, bool)
    for a, b in zip(hull, np.roll(hull, -1, axis=0)):
        e = b - a
        nrm = np.hypot(*e)
        if nrm == 0:
            continue
        cross = (e[0] * (yg - a[1]) - e[1] * (xg - a[0])) / nrm  # distance to the left of the edge
        inside &= cross >= -offset
    return inside


def _between_lungs(c: _Case) -> np.ndarray:
    """Voxels lying, along x, between the medial surfaces of the right and left lungs (per y, z row)."""
    X = np.broadcast_to(c.X, c.shape)
    r_med = np.where(c.lung & c.right, X, np.inf).min(0)
    l_med = np.where(c.lung & ~c.right, X, -np.inf).max(0)
    ok = np.isfinite(r_med) & np.isfinite(l_med)
    return (X > l_med[None]) & (X < r_med[None]) & ok[None]


def _heart(c: _Case, det: Detection) -> None:
    soft = (c.s > 20) & (c.s < 150) & c.body
    thor = np.broadcast_to(c.thorax_z[None, None, :], c.shape)
    r = max(int(round(15 / c.sp[0])), 1)
    opened = dilate(erode(soft & thor, r), r) & soft
    comp = c.comps(opened)
    c.between = _between_lungs(c)
    if comp.n == 0:
        c.heart = c.heart_core = np.zeros(c.shape, bool)
        det.present["cardiomegaly"] = False
        return
    score = np.bincount(comp.labels[c.between & (comp.labels > 0)], minlength=comp.n + 1)[1:]
    best = int(np.argmax(score)) + 1
    c.heart_core = comp.labels == best
    heart = dilate(c.heart_core, 2) & soft & thor  # restore the rim the opening removed
    c.heart = heart
    # transverse diameter from the second moment along x (a filled ellipsoid's half-extent is sqrt(5 var)):
    # robust to the tips the opening shaved off and to the small vessels still attached
    xs = np.broadcast_to(c.X, c.shape)[heart]
    width = 2 * float(np.sqrt(5 * xs.var())) if xs.size else 0.0
    counts = heart.sum((0, 1))
    k = int(np.argmax(counts))
    c.heart_k = k
    thorax = _thoracic_width(c, k)
    ctr = width / thorax if thorax > 0 else 0.0
    det.measures.update(heart_width_mm=width, thoracic_width_mm=float(thorax), ctr=float(ctr))
    det.present["cardiomegaly"] = ctr > 0.505


def _thoracic_width(c: _Case, k: int) -> float:
    """Inner rib-to-rib width near slice ``k``: innermost lateral bone on each side (+-15 mm slab)."""
    w = max(int(round(15 / c.sp[2])), 1)
    sl = slice(max(k - w, 0), k + w + 1)
    bone = c.bone[:, :, sl].any(2)
    band = np.abs(c.coords[1] - c.yc) < 25
    X = c.coords[0][:, None]
    cand = bone & band[None, :]
    right = np.where(cand & (X > c.x_mid + 50), X, np.inf).min()
    left = np.where(cand & (X < c.x_mid - 50), X, -np.inf).max()
    if np.isfinite(right) and np.isfinite(left):
        return float(right - left - c.sp[0])
    lx = np.nonzero(c.lung[:, :, sl].any((1, 2)))[0]
    return float(c.coords[0][lx[-1]] - c.coords[0][lx[0]]) if lx.size else 0.0


def _effusions(c: _Case, det: Detection) -> None:
    """Fluid-density (0-20 HU) collections: dependent and lateral -> pleural; around the heart -> pericardial."""
    cand = (c.s > -80) & (c.s < 70) & c.body
    med = median3_at(c.v, cand)
    fluid = cand & (med > -10) & (med < 23)
    comp = c.comps(fluid)
    near_heart = dilate(c.heart, max(int(round(12 / c.sp[0])), 1))
    air = c.v < -500
    vol = {"left": 0.0, "right": 0.0}
    peri = 0.0
    for i in np.nonzero(comp.volume_cc >= 2.0)[0]:
        b = _box(c, comp, i, 2)
        m = comp.labels[b] == i + 1
        cx, cy, cz = comp.centroid[i]
        frac_heart = float((m & near_heart[b]).sum()) / comp.count[i]
        if frac_heart > 0.5:
            peri += comp.volume_cc[i]
            continue
        sh = dilate(m, 2) & ~m
        lung_frac = float((sh & air[b]).sum()) / max(int(sh.sum()), 1)
        if cy < c.yc + 10 and abs(cx - c.x_mid) > 30 and lung_frac > 0.05:
            vol["right" if cx > c.x_mid else "left"] += comp.volume_cc[i]
    sides = [s for s in ("left", "right") if vol[s] >= 10.0]
    det.present["pleural_effusion"] = bool(sides)
    det.side["pleural_effusion"] = "bilateral" if len(sides) == 2 else (sides[0] if sides else "")
    det.measures.update(effusion_left_cc=vol["left"], effusion_right_cc=vol["right"], pericardial_fluid_cc=peri)
    det.present["pericardial_effusion"] = peri >= 25.0


def _emphysema(c: _Case, det: Detection) -> None:
    n = max(int(c.lung.sum()), 1)
    laa = float(((c.s < -950) & c.lung).sum()) / n
    det.measures["laa950"] = laa
    det.present["emphysema"] = laa > 0.01


def _nodules(c: _Case, det: Detection) -> None:
    dense = (c.v > -450) & c.body  # unsmoothed: small nodules in emphysematous lung stay above threshold
    comp = c.comps(dense)
    best, side = 0.0, ""
    air = c.s < -600
    for i in np.nonzero((comp.volume_cc > 0.12) & (comp.volume_cc < 25))[0]:
        sa = comp.std_axes[i]
        if sa[0] < 1.3 or sa[2] / max(sa[0], 1e-6) > 1.75:
            continue
        b = _box(c, comp, i)
        m = comp.labels[b] == i + 1
        vals = c.v[b][m]
        if vals.max() < 0 or np.percentile(vals, 75) < -40:  # airway walls, vessel knots: not solid
            continue
        sh = dilate(m, 2) & ~m
        if float((sh & air[b]).sum()) / max(int(sh.sum()), 1) < 0.7:
            continue
        d = 2 * np.sqrt(5.0) * float(np.cbrt(np.prod(sa)))  # diameter of the sphere with these moments
        if comp.volume_cc[i] > best:
            best, side = float(comp.volume_cc[i]), "right" if comp.centroid[i][0] > c.x_mid else "left"
            det.measures["nodule_diameter_mm"] = d
    det.present["lung_nodule"] = bool(side)
    det.side["lung_nodule"] = side
    c.nodule_cc = best


def _lung_lesions(c: _Case, det: Detection) -> None:
    """Dense pleura-based lung: consolidation (thick, air bronchograms) vs atelectasis (thin plate)."""
    dense = (c.s > -200) & c.cavity
    comp = c.comps(dense)
    mid = np.abs(c.X - c.x_mid) < 12
    touches_mid = np.unique(comp.labels[np.broadcast_to(mid, c.shape) & (comp.labels > 0)])
    air = c.s < -600
    found = {"consolidation": ("", 0.0), "atelectasis": ("", 0.0)}
    for i in range(comp.n):
        if comp.volume_cc[i] < 2.0 or (i + 1) in touches_mid:
            continue
        b = _box(c, comp, i)
        m = comp.labels[b] == i + 1
        sh = dilate(m, 2) & ~m & c.cavity[b]
        air_frac = float((sh & air[b]).sum()) / max(int(sh.sum()), 1)
        if air_frac < 0.3:
            continue
        solid = m & (c.s[b] > 0)  # voxels well inside the lesion (not partial-volume rim)
        if solid.sum() < 5:
            solid = m & (c.v[b] > 0)
        med = float(np.median(c.v[b][solid])) if solid.any() else -1000.0
        if med < 22:  # fluid (an effusion, handled elsewhere) or a partial-volume rim
            continue
        sa = comp.std_axes[i]
        if sa[2] / max(sa[0], 1e-6) < 1.75 and comp.volume_cc[i] < 15 and sa[0] > 1.3:
            continue  # a round solid blob of nodule size (<= 30 mm): left to the nodule detector
        fill = comp.volume_cc[i] * 1000 / (46.8 * float(np.prod(np.maximum(sa, 0.5))))  # 1 for a solid ellipsoid
        if fill < 0.4 or sa[1] < 4.5:
            continue  # sparse and branching, or a tube: a piece of the vessel tree
        kind = "atelectasis" if med > 44 else "consolidation"  # collapsed lung is denser than filled lung
        side = "right" if comp.centroid[i][0] > c.x_mid else "left"
        if comp.volume_cc[i] > found[kind][1]:
            found[kind] = (side, float(comp.volume_cc[i]))
        det.measures[f"{kind}_min_std_mm"] = float(sa[0])
        det.measures[f"{kind}_median_hu"] = med
    for kind, (side, _) in found.items():
        det.present[kind] = bool(side)
        det.side[kind] = side


def _calcifications(c: _Case, det: Detection) -> None:
    """Small isolated calcium inside the cavity: coronary on the heart, arterial (aortic) away from bone."""
    hi = (c.v > 150) & c.body
    comp = c.comps(hi)
    small = (comp.volume_cc <= 1.5) & (comp.extent.max(1) <= 16)
    bone = np.isin(comp.labels, np.nonzero(~small)[0] + 1)
    near_bone = dilate(bone, max(int(round(9 / c.sp[0])), 1))
    near_heart = dilate(c.heart_core, max(int(round(9 / c.sp[0])), 1))
    n_art = n_cor = 0
    zmax = c.shape[2] - 1
    for i in np.nonzero(small)[0]:
        b = _box(c, comp, i, 0)
        m = comp.labels[b] == i + 1
        peak = float(c.v[b][m].max())
        if peak < 350 or peak > 1500:
            continue
        z0 = (comp.lo[i, 2] - c.coords[2][0]) / c.sp[2]
        z1 = (comp.hi[i, 2] - c.coords[2][0]) / c.sp[2]
        if z0 < 1.5 or z1 > zmax - 1.5 or not (m & c.cavity[b]).any():
            continue
        bb = _box(c, comp, i, 1)
        mm = comp.labels[bb] == i + 1
        if float(c.v[bb][dilate(mm, 1) & ~mm].mean()) < -300:  # in aerated lung: not a vessel-wall plaque
            continue
        if (m & near_heart[b]).any():
            n_cor += 1
        elif not (m & near_bone[b]).any():
            n_art += 1
    det.measures.update(arterial_calcs=float(n_art), coronary_calcs=float(n_cor))
    det.present["arterial_wall_calcification"] = n_art > 0
    det.present["coronary_artery_wall_calcification"] = n_cor > 0


def _hernia(c: _Case, det: Detection) -> None:
    comp = c.gas_comp
    found = 0.0
    for i in range(comp.n):
        if (i + 1) in c.gas_big or comp.volume_cc[i] < 1.5:
            continue
        x, y, z = comp.centroid[i]
        if abs(x - c.x_mid) < 45 and y < c.yc + 5 and z > c.z_lo + 5 and z < c.z_hi:
            found = max(found, float(comp.volume_cc[i]))
    det.measures["hernia_gas_cc"] = found
    det.present["hiatal_hernia"] = found > 0


def _lymph_nodes(c: _Case, det: Detection) -> None:
    soft = (c.v > 5) & (c.v < 200) & c.body  # unsmoothed: the whole node, not just its core
    comp = c.comps(soft)
    fat = (c.s > -150) & (c.s < -30)
    gas = (c.s < -500) & ~c.lung
    bone = c.v > 200
    n = 0
    best = 0.0
    for i in np.nonzero((comp.volume_cc > 0.5) & (comp.volume_cc < 30))[0]:
        sa = comp.std_axes[i]
        if sa[0] < 2.0 or sa[2] / sa[0] > 2.5 or comp.extent[i][2] > 55:  # nodes are ovoid, not tubes/plates
            continue
        x = comp.centroid[i][0]
        if abs(x - c.x_mid) > 50:
            continue
        b = _box(c, comp, i)
        m = comp.labels[b] == i + 1
        if float((m & c.cavity[b]).sum()) < 0.8 * comp.count[i]:  # inside the rib cage (not chest wall, neck)
            continue
        sh = dilate(m, 2) & ~m
        ns = max(int(sh.sum()), 1)
        if float((sh & fat[b]).sum()) / ns < 0.3 or (sh & gas[b]).any() or float((sh & bone[b]).sum()) / ns > 0.1:
            continue
        n += 1
        best = max(best, 2 * np.sqrt(5.0) * float(sa[0]))
    det.measures["nodes"] = float(n)
    det.present["lymphadenopathy"] = n > 0


# ------------------------------------------------------------------------------------------- self-test
def truth_from_findings(f) -> tuple[dict[str, bool], dict[str, str]]:
    """Ground truth (presence, side) from a phantom :class:`~text2ct_engine.data.phantom_findings.Findings`."""
    present = {
        "pleural_effusion": bool(f.pleural_effusion_side), "lung_nodule": bool(f.lung_nodule_side),
        "consolidation": bool(f.consolidation_side), "atelectasis": bool(f.atelectasis_side),
        "emphysema": f.emphysema, "cardiomegaly": f.cardiomegaly, "pericardial_effusion": f.pericardial_effusion,
        "arterial_wall_calcification": f.arterial_wall_calcification,
        "coronary_artery_wall_calcification": f.coronary_artery_wall_calcification,
        "hiatal_hernia": f.hiatal_hernia, "lymphadenopathy": bool(f.lymphadenopathy_stations),
        "medical_material": bool(f.medical_material),
    }
    side = {"pleural_effusion": f.pleural_effusion_side, "lung_nodule": f.lung_nodule_side,
            "consolidation": f.consolidation_side, "atelectasis": f.atelectasis_side}
    return present, side


def selftest(n: int = 200, size: tuple[int, int, int] = (128, 128, 128), spacing: tuple[float, float, float] | None = None,
             seed: int = 1000, progress: bool = True, verbose: bool = False) -> dict:
    """Generate ``n`` phantoms and score the detector: accuracy per label, side accuracy on true positives."""
    from tqdm import tqdm

    from ..data.phantom import generate_phantom

    stats = {k: dict(tp=0, tn=0, fp=0, fn=0, side_ok=0, side_n=0) for k in FINDING_KEYS}
    errors = []
    t0 = time.time()
    for i in tqdm(range(n), desc="selftest", disable=not progress):
        ph = generate_phantom(seed, i, size, spacing)
        det = detect_findings(ph.hu, ph.spacing)
        present, side = truth_from_findings(ph.findings)
        for k in FINDING_KEYS:
            p, t = det.present[k], present[k]
            st = stats[k]
            st["tp" if p and t else "tn" if not p and not t else "fp" if p else "fn"] += 1
            if p != t:
                errors.append((i, k, "fp" if p else "fn"))
            if k in SIDED and p and t:
                st["side_n"] += 1
                st["side_ok"] += int(det.side[k] == side[k])
                if det.side[k] != side[k]:
                    errors.append((i, k, f"side {det.side[k]} != {side[k]}"))
        if verbose and any(e[0] == i for e in errors):
            print(i, [e[1:] for e in errors if e[0] == i], {k: round(v, 3) for k, v in det.measures.items()})
    rows = []
    for k, st in stats.items():
        acc = (st["tp"] + st["tn"]) / n
        rows.append(dict(label=k, accuracy=acc, positives=st["tp"] + st["fn"], fp=st["fp"], fn=st["fn"],
                         side_accuracy=(st["side_ok"] / st["side_n"]) if st["side_n"] else None))
    return dict(n=n, size=list(size), spacing=list(spacing) if spacing else None, seed=seed, rows=rows,
                errors=errors, seconds=time.time() - t0)


def format_table(result: dict) -> str:
    lines = [f"{'label':38s} {'accuracy':>8s} {'pos':>4s} {'fp':>3s} {'fn':>3s} {'side acc':>8s}"]
    for r in result["rows"]:
        side = "-" if r["side_accuracy"] is None else f"{100 * r['side_accuracy']:.1f}%"
        lines.append(f"{r['label']:38s} {100 * r['accuracy']:7.1f}% {r['positives']:4d} {r['fp']:3d} {r['fn']:3d} {side:>8s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m text2ct_engine.evaluate.findings",
                                description="Detect phantom findings in a NIfTI volume, or score the detector.")
    p.add_argument("volume", nargs="?", help="NIfTI file (HU); prints the detection as JSON")
    p.add_argument("--selftest", action="store_true", help="score the detector on fresh phantoms")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--size", type=int, nargs=3, default=(128, 128, 128))
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--json", type=cli_path, help="write the self-test result to this JSON file")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    if a.selftest:
        res = selftest(a.n, tuple(a.size), seed=a.seed, verbose=a.verbose)
        print(format_table(res))
        print(f"{a.n} phantoms {tuple(a.size)}, seed {a.seed}, {res['seconds']:.0f} s")
        if a.json:
            with open(a.json, "w") as fh:
                json.dump(res, fh, indent=1)
        return 0
    if not a.volume:
        p.error("give a volume or --selftest")
    from ..data.errors import BadDataError
    from ..data.nifti import read_volume
    from ..data.transforms import reorient_to_ras

    try:
        data, affine = read_volume(a.volume)
    except BadDataError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 1
    vol, spacing = reorient_to_ras(torch.from_numpy(data), affine)
    det = detect_findings(vol.numpy(), spacing)
    print(json.dumps(det.as_dict(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
