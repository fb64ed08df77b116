"""CT-RATE's 18 multi-abnormality label names and the file/column names of its layout."""
from __future__ import annotations

# Column order of CT-RATE's multi_abnormality_labels/*_predicted_labels.csv (after VolumeName).
CTRATE_LABELS: tuple[str, ...] = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion", "Mosaic attenuation pattern",
    "Peribronchial thickening", "Consolidation", "Bronchiectasis", "Interlobular septal thickening",
)

# Labels the phantom draws (the geometric ones); the other six are always 0 in phantom data.
PHANTOM_LABELS: tuple[str, ...] = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Pleural effusion", "Consolidation",
)

REPORT_COLUMNS: tuple[str, ...] = ("VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN",
                                   "Impressions_EN")
