"""CT-RATE-style radiology reports for phantom studies: Findings + Impression with varied wording.

Every present finding is described with its side (and lobe / size where the phantom knows them); absent
findings are often, not always, negated explicitly ("No pleural effusion was detected."); normal studies
read like CT-RATE's normal reports. ``FINDING_TERMS`` and ``NEGATION_CUES`` let tests and text-side tools
check which findings a sentence talks about and whether it negates them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .phantom_findings import Findings

# Words that identify each finding in a sentence (lower case, regular expressions).
FINDING_TERMS: dict[str, tuple[str, ...]] = {
    "pleural_effusion": (r"pleural effusion", r"pleural fluid", r"fluid in the pleural", r"effusion in the (left|right|bilateral)? ?pleural"),
    "lung_nodule": (r"nodul",),
    "consolidation": (r"consolidat", r"pneumonic infiltrat"),
    "atelectasis": (r"atelecta",),
    "emphysema": (r"emphysem",),
    "cardiomegaly": (r"cardiomegaly", r"heart (size|is) (is )?(increased|enlarged)", r"enlarged heart", r"enlargement of the heart"),
    "pericardial_effusion": (r"pericardial effusion", r"pericardial fluid", r"fluid in the pericardi"),
    "arterial_wall_calcification": (r"aort\w* wall", r"atheroscleros\w* .*aort", r"calcif\w* .*aort", r"aortic .*calcif"),
    "coronary_artery_wall_calcification": (r"coronary",),
    "hiatal_hernia": (r"hiatal hernia", r"hiatus hernia", r"esophageal hiatus"),
    "lymphadenopathy": (r"lymph", r"adenopath"),
    "medical_material": (r"pacemaker", r"port catheter", r"sternotomy", r"cardiac device", r"implantable port", r"wires"),
}
NEGATION_CUES: tuple[str, ...] = (r"\bno\b", r"\bnot\b", r"\bwithout\b", r"\babsent\b", r"\bnegative\b", r"\bnormal\b",
                                  r"\bneither\b", r"\bnor\b")


@dataclass
class Report:
    """One report, with the CT-RATE columns' content."""

    clinical_information: str
    technique: str
    findings: str
    impression: str

    @property
    def text(self) -> str:
        """The conditioning text used by Text2CT: ``"Findings: ... Impression: ..."``."""
        return f"Findings: {self.findings} Impression: {self.impression}"


def sentences(text: str) -> list[str]:
    """Split report text into sentences (on '.', ';' and ':' followed by a space)."""
    return [s.strip() for s in re.split(r"(?<=[.;:])\s+", text) if s.strip()]


def mentions(sentence: str, key: str) -> bool:
    s = sentence.lower()
    return any(re.search(t, s) for t in FINDING_TERMS[key])


def negated(sentence: str) -> bool:
    s = sentence.lower()
    return any(re.search(c, s) for c in NEGATION_CUES)


class _Writer:
    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def pick(self, options):
        return options[int(self.rng.integers(len(options)))]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)


def _side_loc(w: _Writer, side: str) -> str:
    if side == "bilateral":
        return w.pick(["bilaterally", "in both hemithoraces", "on both sides"])
    return w.pick([f"on the {side}", f"in the {side} hemithorax", f"on the {side} side"])


def _side_adj(w: _Writer, side: str) -> str:
    if side == "bilateral":
        return "Bilateral"
    return w.pick([side.capitalize(), f"{side.capitalize()}-sided"])


def _lobe_phrase(w: _Writer, side: str, lobe: str) -> str:
    if lobe == "middle":
        return w.pick(["the right middle lobe", "the middle lobe of the right lung", "the middle lobe of the right lung"])
    return w.pick([f"the {side} {lobe} lobe", f"the {lobe} lobe of the {side} lung"])


def make_report(f: Findings, rng: np.random.Generator) -> Report:
    """Write a CT-RATE-style report for ``f`` with wording drawn from ``rng``."""
    w = _Writer(rng)
    out: list[str] = []
    imp: list[str] = []
    neg = 0.75  # probability of stating a negative explicitly

    out.append(w.pick(["Trachea and both main bronchi are open.", "Trachea, both main bronchi are open.",
                       "The trachea and main bronchi are patent.", "Trachea and main bronchi are in normal calibre and open."]))
    # heart, great vessels, pericardium
    if f.cardiomegaly:
        out.append(w.pick(["Cardiomegaly is present.", "The heart is enlarged.", "Heart size is increased (cardiomegaly).",
                           "Cardiomegaly was observed."]))
        imp.append(w.pick(["Cardiomegaly.", "Enlarged heart."]))
    else:
        out.append(w.pick(["Heart contour and size are normal.", "Mediastinal main vascular structures, heart contour and size are normal.",
                           "The heart size is within normal limits."]))
    if f.arterial_wall_calcification:
        out.append(w.pick(["Calcific atherosclerotic plaques are observed in the wall of the thoracic aorta.",
                           "Atherosclerotic calcifications are present in the aortic wall.",
                           "Calcified atheroma plaques were observed in the aortic arch and descending aorta."]))
        imp.append(w.pick(["Atherosclerotic changes in the thoracic aorta.", "Aortic wall calcifications."]))
    elif w.chance(neg * 0.8):
        out.append(w.pick(["Thoracic aorta diameter is normal and no calcific plaque is seen in the aortic wall.",
                           "No calcification was observed in the aortic wall."]))
    if f.coronary_artery_wall_calcification:
        out.append(w.pick(["Calcific atherosclerotic changes are observed in the coronary arteries.",
                           "Coronary artery calcifications are present.", "There are calcified plaques in the coronary arteries."]))
        imp.append(w.pick(["Coronary artery calcification.", "Coronary atherosclerosis."]))
    elif w.chance(neg * 0.7):
        out.append(w.pick(["No calcification was seen in the coronary arteries.", "Coronary arteries show no calcific plaque."]))
    if f.pericardial_effusion:
        mm = int(w.rng.integers(9, 17))
        out.append(w.pick([f"Pericardial effusion reaching {mm} mm in thickness was observed.",
                           "Fluid is present in the pericardial space (pericardial effusion).",
                           "There is a pericardial effusion surrounding the heart."]))
        imp.append(w.pick(["Pericardial effusion.", "Pericardial fluid."]))
    elif w.chance(neg):
        out.append(w.pick(["Pericardial effusion-thickening was not observed.", "No pericardial effusion was detected.",
                           "There is no pericardial effusion."]))
    # oesophagus, hernia
    if f.hiatal_hernia:
        out.append(w.pick(["A hiatal hernia is observed.", "Sliding type hiatal hernia was observed.",
                           "Part of the stomach herniates through the esophageal hiatus into the posterior mediastinum (hiatal hernia)."]))
        imp.append(w.pick(["Hiatal hernia.", "Sliding hiatal hernia."]))
    else:
        out.append("Thoracic esophagus calibration was normal and no significant tumoral wall thickening was detected.")
        if w.chance(neg * 0.6):
            out.append(w.pick(["No hiatal hernia was detected.", "There is no hiatal hernia."]))
    # lymph nodes
    if f.lymphadenopathy_stations:
        st = f.lymphadenopathy_stations.split(";")
        where = st[0] if len(st) == 1 else ", ".join(st[:-1]) + " and " + st[-1]
        mm = int(round(f.lymphadenopathy_size_mm))
        out.append(w.pick([f"Lymph nodes of pathological size are observed in the {where} station{'s' if len(st) > 1 else ''}, "
                           f"the largest measuring {mm} mm in short axis.",
                           f"Mediastinal lymphadenopathy is present ({where}), up to {mm} mm in short axis.",
                           f"Enlarged lymph nodes were observed in the {where} region{'s' if len(st) > 1 else ''}."]))
        imp.append(w.pick(["Mediastinal lymphadenopathy.", "Enlarged mediastinal lymph nodes."]))
    elif w.chance(neg):
        out.append(w.pick(["No enlarged lymph nodes in prevascular, pre-paratracheal, subcarinal or bilateral hilar-axillary "
                           "pathological dimensions were detected.", "No mediastinal or hilar lymphadenopathy was detected.",
                           "There are no lymph nodes of pathological size in the mediastinum."]))
    # devices
    if f.medical_material == "pacemaker":
        out.append(w.pick(["A cardiac pacemaker is present in the anterior chest wall with its lead extending into the right heart.",
                           "Pacemaker generator and lead are observed."]))
        imp.append("Pacemaker.")
    elif f.medical_material == "port catheter":
        out.append(w.pick(["A port catheter is seen in the anterior chest wall with its tip in the superior vena cava.",
                           "An implantable port catheter is present."]))
        imp.append("Port catheter.")
    elif f.medical_material == "sternotomy wires":
        out.append(w.pick(["Sternotomy wires are observed.", "Median sternotomy wires are present (post-operative)."]))
        imp.append("Sternotomy wires.")
    # lungs
    out.append(w.pick(["When examined in the lung parenchyma window;", "In the lung parenchyma window:",
                       "Lung parenchyma window examination:"]))
    if f.emphysema:
        out.append(w.pick(["Centrilobular emphysematous changes are observed in both lungs, more prominent in the upper lobes.",
                           "Emphysema is present in both lungs, predominantly in the upper zones.",
                           "Bilateral emphysematous changes were observed."]))
        imp.append(w.pick(["Emphysema.", "Centrilobular emphysema."]))
    elif w.chance(neg * 0.6):
        out.append(w.pick(["No emphysema was observed.", "There is no emphysematous change."]))
    if f.lung_nodule_side:
        mm = int(round(f.lung_nodule_size_mm))
        size = w.pick([f"{mm} mm", f"{mm}-mm", f"{mm / 10:.1f} cm"])
        lobe = _lobe_phrase(w, f.lung_nodule_side, f.lung_nodule_lobe)
        out.append(w.pick([f"A {size} solid nodule was observed in {lobe}.", f"There is a {size} nodule in {lobe}.",
                           f"In {lobe}, a nodular lesion measuring {size} was detected."]))
        imp.append(w.pick([f"Nodule in {lobe}.", f"{f.lung_nodule_side.capitalize()} lung nodule ({size})."]))
    if f.consolidation_side:
        lobe = _lobe_phrase(w, f.consolidation_side, f.consolidation_lobe)
        out.append(w.pick([f"Consolidation with air bronchograms was observed in {lobe}.",
                           f"There is an area of consolidation in {lobe}.",
                           f"A consolidative area containing air bronchograms is seen in {lobe}."]))
        imp.append(w.pick([f"Consolidation in {lobe}.", f"{f.consolidation_side.capitalize()} {f.consolidation_lobe} lobe consolidation."
                           if f.consolidation_lobe != "middle" else "Right middle lobe consolidation."]))
    if f.atelectasis_side:
        lobe = _lobe_phrase(w, f.atelectasis_side, f.atelectasis_lobe)
        out.append(w.pick([f"Subsegmental atelectasis was observed in {lobe}.", f"Plate-like atelectasis is seen in {lobe}.",
                           f"Atelectatic changes were observed in {lobe}."]))
        imp.append(w.pick([f"Atelectasis in {lobe}.", f"{f.atelectasis_side.capitalize()}-sided atelectasis."]))
    no_nod, no_cons, no_atel = not f.lung_nodule_side, not f.consolidation_side, not f.atelectasis_side
    if no_nod and no_cons and w.chance(neg):
        out.append(w.pick(["No mass or infiltrative lesion was detected in both lungs.",
                           "No nodule or consolidation was detected in either lung."]))
    else:
        if no_nod and w.chance(neg):
            out.append(w.pick(["No pulmonary nodule was detected.", "There is no nodule in either lung."]))
        if no_cons and w.chance(neg):
            out.append(w.pick(["No consolidation was observed.", "No pneumonic infiltration or consolidation was detected."]))
    if no_atel and w.chance(neg * 0.6):
        out.append(w.pick(["No atelectasis was observed.", "There is no atelectasis."]))
    # pleura
    if f.pleural_effusion_side:
        side, size = f.pleural_effusion_side, f.pleural_effusion_size
        word = w.pick(["minimal", "small", "mild"]) if size == "small" else w.pick(["large", "massive", "significant"])
        out.append(w.pick([f"{_side_adj(w, side)} pleural effusion ({word}) was observed.",
                           f"There is a {word} pleural effusion {_side_loc(w, side)}.",
                           f"Pleural effusion is present {_side_loc(w, side)}, {word} in amount."]))
        imp.append(w.pick([f"{'Bilateral' if side == 'bilateral' else side.capitalize()} pleural effusion.",
                           f"{size.capitalize()} {'bilateral' if side == 'bilateral' else side} pleural effusion."]))
    elif w.chance(neg):
        out.append(w.pick(["No pleural effusion was detected.", "Pleural effusion-thickening was not observed.",
                           "There is no pleural effusion."]))
    out.append(w.pick(["Upper abdominal organs included in the sections are normal.",
                       "No pathology was detected in the upper abdominal sections that entered the examination area."]))
    out.append(w.pick(["No lytic-destructive lesion was detected in the bone structures within the sections.",
                       "Bone structures in the study area are natural."]))
    if not imp:
        imp.append(w.pick(["No significant pathology was found in the thoracic CT examination.",
                           "Normal thoracic CT examination.", "No acute or significant thoracic pathology."]))
    else:
        order = list(range(len(imp)))
        if w.chance(0.3):
            w.rng.shuffle(order)
        imp = [imp[i] for i in order]
    clinical = w.pick(["Cough.", "Shortness of breath.", "Chest pain.", "Follow-up.", "Fever and cough.", "Screening."])
    technique = w.pick(["Non-contrast axial images of the thorax were obtained with 1.5 mm slice thickness.",
                        "Thorax CT without contrast, axial sections.",
                        "Non-contrast thoracic CT; axial, coronal and sagittal reformats were evaluated."])
    return Report(clinical, technique, " ".join(out), " ".join(imp))
