"""Finding detector: agrees with the phantom's labels, and its building blocks behave."""
from collections import deque

import numpy as np
import pytest

from text2ct_engine.data.phantom import generate_phantom
from text2ct_engine.data.phantom_findings import Findings
from text2ct_engine.evaluate.findings import FINDING_KEYS, detect_findings, to_working_grid, truth_from_findings
from text2ct_engine.evaluate.morphology import components, dilate, erode, label

CASES = [
    Findings(pleural_effusion_side="left", pleural_effusion_size="large", lung_nodule_side="right",
             lung_nodule_lobe="upper", lung_nodule_size_mm=18, cardiomegaly=True, arterial_wall_calcification=True,
             hiatal_hernia=True, medical_material="pacemaker"),
    Findings(consolidation_side="right", consolidation_lobe="lower", atelectasis_side="left", atelectasis_lobe="lower",
             emphysema=True, pericardial_effusion=True, coronary_artery_wall_calcification=True,
             lymphadenopathy_stations="right paratracheal;subcarinal"),
    Findings(pleural_effusion_side="bilateral", pleural_effusion_size="small", medical_material="sternotomy wires"),
    Findings(),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_detector_agrees_with_labels(case):
    ph = generate_phantom(seed=77, index=case, size=(128, 128, 128), findings=CASES[case])
    present, side = truth_from_findings(ph.findings)
    det = detect_findings(ph.hu, ph.spacing)
    wrong = {k: (det.present[k], present[k]) for k in FINDING_KEYS if det.present[k] != present[k]}
    assert not wrong, (wrong, det.measures)
    for k, s in side.items():
        if s:
            assert det.side[k] == s, (k, det.side[k], s)


def test_detector_on_a_volume_without_a_chest():
    hu = np.full((40, 40, 40), -1000, np.int16)
    hu[10:30, 10:30, 10:30] = 40
    det = detect_findings(hu, (3.0, 3.0, 3.0))
    assert not any(det.present.values())


def test_working_grid_resampling_keeps_the_field_of_view():
    v = np.random.default_rng(0).normal(size=(64, 64, 20)).astype(np.float32)
    w, sp = to_working_grid(v, (0.75, 0.75, 3.0))
    assert w.shape == (16, 16, 20) and np.allclose(sp, 3.0)
    assert abs(w.mean() - v.mean()) < 1e-4  # area averaging
    w2, sp2 = to_working_grid(v, (6.0, 6.0, 6.0))
    assert w2.shape == (128, 128, 40) and np.allclose(sp2, 3.0)


def _bfs_count(m):
    seen = np.zeros(m.shape, bool)
    n = 0
    for p in zip(*np.nonzero(m)):
        if seen[p]:
            continue
        n += 1
        q = deque([p])
        seen[p] = True
        while q:
            c = q.popleft()
            for a in range(3):
                for d in (-1, 1):
                    nb = list(c)
                    nb[a] += d
                    nb = tuple(nb)
                    if 0 <= nb[a] < m.shape[a] and m[nb] and not seen[nb]:
                        seen[nb] = True
                        q.append(nb)
    return n


@pytest.mark.parametrize("shape,p", [((17, 13, 11), 0.5), ((9, 1, 23), 0.4), ((20, 20, 20), 0.65)])
def test_label_matches_breadth_first_search(shape, p):
    m = np.random.default_rng(1).random(shape) > p
    lab, n = label(m)
    assert n == _bfs_count(m) and (lab[~m] == 0).all() and (lab[m] > 0).all()
    # 6-neighbours always share a label
    for a in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[a], hi[a] = slice(None, -1), slice(1, None)
        both = m[tuple(lo)] & m[tuple(hi)]
        assert (lab[tuple(lo)][both] == lab[tuple(hi)][both]).all()


def test_components_statistics_and_morphology():
    m = np.zeros((30, 30, 30), bool)
    m[5:10, 5:10, 5:10] = True       # a 5^3 cube
    m[20:22, 10:20, 15] = True       # a plate
    comp = components(m, tuple(np.arange(30.0) for _ in range(3)), voxel_cc=0.001)
    assert comp.n == 2 and sorted(comp.count.tolist()) == [20, 125]
    cube = int(np.argmax(comp.count))
    assert np.allclose(comp.centroid[cube], 7.0) and np.allclose(comp.extent[cube], 4.0)
    assert erode(m, 1).sum() == 27 and dilate(m[5:10, 5:10, 5:10], 0).all()
