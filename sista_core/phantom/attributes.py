"""Filling in what a report leaves unsaid: side, severity and zone of a finding, picked from
the finding's own random stream with frequencies that roughly follow clinical practice, and
the policy for uncertain findings.

Uncertain findings ("possible", "cannot exclude") are drawn with probability 0.5 and, when
drawn, at reduced conspicuity (``UNCERTAIN_STRENGTH``): the image then agrees with the hedge
in the text about half of the time, which is what a hedged report means.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..findings import Finding

UNCERTAIN_DRAW_CHANCE = 0.5
UNCERTAIN_STRENGTH = 0.6

# Observations with no side on a frontal film (or one we do not vary).
SIDELESS = frozenset(
    {"No Finding", "Cardiomegaly", "Enlarged Cardiomediastinum", "Support Devices"}
)
ALWAYS_BILATERAL = frozenset({"Edema", "Emphysema"})
BILATERAL_CHANCE = {
    "Pleural Effusion": 0.35,
    "Atelectasis": 0.25,
    "Lung Opacity": 0.25,
    "Pneumonia": 0.15,
    "Consolidation": 0.1,
    "Granuloma": 0.2,
    "Pleural Other": 0.2,
}
# Where a finding sits when the report does not say: (zones, probabilities).
ZONE_CHOICES: dict[str, tuple[tuple[str, ...], tuple[float, ...]]] = {
    "Lung Opacity": (("lower", "middle", "upper"), (0.5, 0.3, 0.2)),
    "Consolidation": (("lower", "middle", "upper"), (0.55, 0.25, 0.2)),
    "Pneumonia": (("lower", "middle", "upper"), (0.55, 0.3, 0.15)),
    "Atelectasis": (("basilar", "lower", "upper"), (0.6, 0.3, 0.1)),
    "Nodule": (("upper", "middle", "lower"), (0.4, 0.35, 0.25)),
    "Mass": (("upper", "middle", "perihilar", "lower"), (0.3, 0.25, 0.25, 0.2)),
    "Lung Lesion": (("upper", "middle", "lower"), (0.4, 0.35, 0.25)),
    "Granuloma": (("upper", "middle", "lower"), (0.4, 0.35, 0.25)),
    "Pneumothorax": (("apical", "upper"), (0.5, 0.5)),
    "Pleural Effusion": (("basilar",), (1.0,)),
    "Edema": (("perihilar",), (1.0,)),
    "Pleural Other": (("lower", "middle", "apical"), (0.45, 0.25, 0.3)),
    "Fracture": (("middle", "lower", "upper"), (0.45, 0.35, 0.2)),
}
SEVERITY_WEIGHTS: dict[str, tuple[float, float, float]] = {
    "Pleural Effusion": (0.5, 0.35, 0.15),
    "Pneumothorax": (0.5, 0.35, 0.15),
    "Cardiomegaly": (0.45, 0.4, 0.15),
    "Granuloma": (0.6, 0.3, 0.1),
}
_DEFAULT_SEVERITY = (0.45, 0.4, 0.15)
SEVERITIES = ("small", "moderate", "large")


def resolve(finding: Finding, rng: np.random.Generator) -> Finding:
    """The finding with every attribute the renderer uses filled in. Always draws the same
    number of random values, so stating one attribute does not reshuffle the others."""
    obs = finding.observation
    side_roll, side_coin, severity_roll, zone_roll = rng.random(4)
    side = finding.side
    if obs in SIDELESS:
        side = None
    elif obs in ALWAYS_BILATERAL:
        side = "bilateral"
    elif side is None:
        if side_roll < BILATERAL_CHANCE.get(obs, 0.0):
            side = "bilateral"
        else:
            side = "right" if side_coin < 0.5 else "left"
    severity = finding.severity
    if severity is None and obs != "No Finding":
        weights = np.cumsum(SEVERITY_WEIGHTS.get(obs, _DEFAULT_SEVERITY))
        severity = SEVERITIES[int(np.searchsorted(weights, severity_roll * weights[-1]))]
    zone = finding.zone
    if obs in ZONE_CHOICES:
        zones, probs = ZONE_CHOICES[obs]
        if zone is None or obs in ("Pleural Effusion", "Edema"):
            cumulative = np.cumsum(probs)
            zone = zones[min(len(zones) - 1, int(np.searchsorted(cumulative, zone_roll)))]
    else:
        zone = None
    return replace(finding, side=side, severity=severity, zone=zone)


def strength(finding: Finding, rng: np.random.Generator) -> float:
    """How conspicuously to draw a finding: 1 if positive, 0 (not drawn) if negative, and for
    uncertain ones ``UNCERTAIN_STRENGTH`` or 0 with equal chance."""
    coin = rng.random()
    if finding.certainty == "positive":
        return 1.0
    if finding.certainty == "uncertain" and coin < UNCERTAIN_DRAW_CHANCE:
        return UNCERTAIN_STRENGTH
    return 0.0


def sides(finding: Finding) -> tuple[str, ...]:
    """The patient sides a finding is drawn on."""
    if finding.side == "bilateral":
        return ("right", "left")
    return (finding.side,) if finding.side else ()


def severity_index(finding: Finding) -> int:
    """0, 1, 2 for small, moderate, large (moderate when unknown)."""
    return SEVERITIES.index(finding.severity) if finding.severity in SEVERITIES else 1
