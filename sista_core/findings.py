"""The shared vocabulary of findings: what the report labeler extracts, what the phantom
renderer draws, and what the dataset adapters label.

Observation names are CheXpert's 14 (so label tables from CheXpert and MIMIC-CXR map
one-to-one) plus a few frequent Open-I findings that change how an image looks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

CHEXPERT_OBSERVATIONS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
# Frequent in Open-I and visible on a radiograph; "Nodule" and "Mass" also imply "Lung Lesion".
EXTRA_OBSERVATIONS: tuple[str, ...] = ("Nodule", "Mass", "Granuloma", "Emphysema", "Scoliosis")
OBSERVATIONS: tuple[str, ...] = CHEXPERT_OBSERVATIONS + EXTRA_OBSERVATIONS

# The five findings of the CheXpert competition, used for the downstream AUROC.
CHEXPERT_COMPETITION: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Pleural Effusion",
)

Certainty = Literal["positive", "uncertain", "negative"]
Side = Literal["left", "right", "bilateral"]
Severity = Literal["small", "moderate", "large"]
Zone = Literal["upper", "middle", "lower", "basilar", "perihilar", "apical"]


@dataclass(frozen=True)
class Finding:
    """One observation stated by a report (or sampled from a label table).

    side, severity and zone are None when the text does not say; the renderer then picks
    them from its seed.
    """

    observation: str
    certainty: Certainty = "positive"
    side: Side | None = None
    severity: Severity | None = None
    zone: Zone | None = None

    def __post_init__(self) -> None:
        if self.observation not in OBSERVATIONS:
            raise ValueError(f"unknown observation {self.observation!r}; known: {OBSERVATIONS}")
