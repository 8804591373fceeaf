"""Findings that reshape the whole chest rather than add a lesion: cardiomegaly, hyperinflation
(emphysema), scoliosis and a wide cardiomediastinum. Each edits the `BodyPlan` before the
anatomy is built, then names the region it changed as its ground-truth mask."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..findings import Finding
from .anatomy import Anatomy, BodyPlan
from .attributes import severity_index
from .film import Film
from .frame import ramp

# Cardiothoracic ratio by severity; normal hearts are drawn at 0.39-0.47.
CARDIOMEGALY_RATIOS = (0.55, 0.6, 0.67)
SCOLIOSIS_DEVIATION = (0.025, 0.04, 0.055)
MEDIASTINUM_WIDENING = (1.45, 1.7, 2.0)


def enlarge_heart(plan: BodyPlan, finding: Finding, strength: float) -> BodyPlan:
    target = CARDIOMEGALY_RATIOS[severity_index(finding)]
    ratio = plan.cardiothoracic_ratio + strength * (target - plan.cardiothoracic_ratio)
    # Big hearts are globular: the ventricle bulges above the dome, not along it.
    return replace(
        plan,
        cardiothoracic_ratio=max(ratio, plan.cardiothoracic_ratio),
        heart_height=plan.heart_height * (1.0 + 0.1 * strength),
    )


def paint_cardiomegaly(
    film: Film, anatomy: Anatomy, finding: Finding, rng: np.random.Generator, strength: float
) -> list[np.ndarray]:
    return [anatomy.heart_mask]


def hyperinflate(plan: BodyPlan, finding: Finding, strength: float) -> BodyPlan:
    """Taller, slightly wider lungs with flat low domes and a narrow vertical heart."""
    grade = severity_index(finding)
    u0, v0, u1, v1 = plan.lung_box
    taller = strength * (0.035 + 0.02 * grade)
    wider = strength * 0.012
    return replace(
        plan,
        lung_box=(u0 - wider, v0 - 0.01 * strength, u1 + wider, v1 + taller),
        dome_flattening=strength * (0.45 + 0.2 * grade),
        lung_lucency=plan.lung_lucency * (1.0 + strength * (0.14 + 0.06 * grade)),
        cardiothoracic_ratio=plan.cardiothoracic_ratio * (1.0 - 0.1 * strength),
        heart_height=plan.heart_height * (1.0 + 0.15 * strength),
    )


def paint_emphysema(
    film: Film, anatomy: Anatomy, finding: Finding, rng: np.random.Generator, strength: float
) -> list[np.ndarray]:
    """Pruned peripheral vessels and, when large, thin-walled upper-zone bullae."""
    f = anatomy.frame
    peripheral = np.clip(1.6 - 1.6 * anatomy.interior, 0.0, 1.0) + 0.3
    film.markings *= 1.0 - 0.5 * strength * np.clip(peripheral, 0.0, 1.0)
    if severity_index(finding) == 2:
        for side in ("right", "left"):
            u, v = anatomy.pick_point(rng, side, "upper", depth=0.75)
            r = rng.uniform(0.025, 0.04)
            dist = np.sqrt((f.u - u) ** 2 + (f.v - v) ** 2)
            inside = ramp(r - dist, 0.004) * anatomy.lungs
            wall = ramp(0.003 - np.abs(dist - r), 0.003) * anatomy.lungs
            film.markings *= 1.0 - inside
            film.air += 0.08 * strength * inside
            film.tissue += 0.05 * strength * wall
    return [anatomy.lung_mask]


def curve_spine(plan: BodyPlan, finding: Finding, strength: float) -> BodyPlan:
    """Convex to the stated side (dextroscoliosis bows to the patient's right, image left)."""
    deviation = strength * SCOLIOSIS_DEVIATION[severity_index(finding)]
    towards_image_right = finding.side == "left"
    return replace(plan, scoliosis=deviation if towards_image_right else -deviation)


def paint_scoliosis(
    film: Film, anatomy: Anatomy, finding: Finding, rng: np.random.Generator, strength: float
) -> list[np.ndarray]:
    f = anatomy.frame
    column = np.abs(f.u - anatomy.spine_u) < 0.05
    return [column & (f.v > anatomy.plan.lung_box[1] - 0.04) & (f.v < anatomy.dome_v[None, :])]


def widen_mediastinum(plan: BodyPlan, finding: Finding, strength: float) -> BodyPlan:
    factor = 1.0 + strength * (MEDIASTINUM_WIDENING[severity_index(finding)] - 1.0)
    return replace(
        plan,
        mediastinum_halfwidth=plan.mediastinum_halfwidth * factor,
        aortic_knob=plan.aortic_knob * (0.5 + 0.5 * factor),
    )


def paint_wide_mediastinum(
    film: Film, anatomy: Anatomy, finding: Finding, rng: np.random.Generator, strength: float
) -> list[np.ndarray]:
    return [anatomy.mediastinum > 0.5]
