"""Bones of a frontal chest film: posterior and anterior rib arcs, clavicles, thoracic spine.

Ribs are drawn as two families of curves evaluated on the whole film at once: each pixel gets
a continuous rib coordinate (which rib, and where across it), so a rib's shape is one formula
and a fracture is an edit of that coordinate, not a drawing loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..findings import Finding
from .anatomy import Anatomy, PatientSide
from .attributes import sides
from .film import Film
from .frame import ramp

POSTERIOR_RIBS = 10


@dataclass(frozen=True)
class RibFracture:
    """A displaced break of one posterior rib: ``rib`` counts from the first (0-based),
    ``reach`` is the lateral position as a fraction of the hemithorax width."""

    side: PatientSide
    rib: int
    reach: float
    step: float  # how far the lateral fragment drops, in rib widths


def tube(across: np.ndarray) -> np.ndarray:
    """Projected density of a hollow bone across its width (``across`` in -1..1): the
    cortex makes both margins brighter than the middle."""
    r2 = across * across
    outer = np.sqrt(np.clip(1.0 - r2, 0.0, None))
    inner = np.sqrt(np.clip(0.36 - r2, 0.0, None))
    return outer - 0.75 * inner


def hemithorax_reach(anatomy: Anatomy) -> np.ndarray:
    """(size, size) lateral distance from the midline as a fraction of each hemithorax's
    width: 0 at the midline, 1 at the inner chest wall."""
    f = anatomy.frame
    u0, _, u1, _ = anatomy.plan.rib_cage
    offset = f.u - anatomy.midline
    right_width = anatomy.midline - u0 + 0.01
    left_width = u1 - anatomy.midline + 0.01
    return np.where(offset < 0, -offset / right_width, offset / left_width)


def posterior_rib_coordinate(anatomy: Anatomy, reach: np.ndarray) -> np.ndarray:
    """Continuous posterior-rib index per pixel: rib k covers [k, k + 0.36) across its width.
    Ribs arch up from the spine and sweep down at the chest wall; lower ones are further
    apart."""
    plan = anatomy.plan
    v0, v1 = plan.rib_cage[1], plan.rib_cage[3]
    height = (v1 - v0) * plan.rib_spacing
    d = np.minimum(reach, 1.3)
    arch = plan.rib_arch * 0.06 * (-0.9 * d + 2.4 * d**2.5)
    t = anatomy.frame.v - arch - (v0 - 0.035)
    # Rib centres at a*k + b*k^2 (spacing grows downward); invert for k.
    a, b = 0.07 * height, 0.0028 * height
    return (-a + np.sqrt(np.clip(a * a + 4 * b * t, 0.0, None))) / (2 * b)


def paint_skeleton(film: Film, anatomy: Anatomy, fracture: RibFracture | None = None) -> None:
    """Add ribs, clavicles and spine to the bone layer."""
    reach = hemithorax_reach(anatomy)
    body = _body(anatomy)
    film.bone += body * (
        _posterior_ribs(anatomy, reach, fracture) + 0.55 * _anterior_ribs(anatomy, reach)
    )
    film.bone += _clavicles(anatomy)
    film.bone += _spine(anatomy)


def _body(anatomy: Anatomy) -> np.ndarray:
    return ramp(anatomy.body_halfwidth - np.abs(anatomy.frame.u - anatomy.midline), 0.03)


# Which posterior ribs a report zone points at.
_ZONE_RIBS = {
    "apical": (1, 2),
    "upper": (2, 4),
    "middle": (4, 6),
    "lower": (6, 8),
    "basilar": (7, 8),
}


def paint_fracture(
    film: Film, anatomy: Anatomy, finding: Finding, rng: np.random.Generator, strength: float
) -> list[np.ndarray]:
    """Break one posterior rib per side: redraw the ribs with the break and add the
    difference, so the rest of the skeleton is untouched."""
    reach = hemithorax_reach(anatomy)
    body = _body(anatomy)
    intact = _posterior_ribs(anatomy, reach, None)
    masks = []
    for side in sides(finding):
        low, high = _ZONE_RIBS.get(finding.zone or "middle", (4, 6))
        fracture = RibFracture(
            side=side,
            rib=int(rng.integers(low, high + 1)),
            reach=float(rng.uniform(0.6, 0.88)),
            step=float(rng.uniform(0.35, 0.6) * strength),
        )
        film.bone += body * (_posterior_ribs(anatomy, reach, fracture) - intact)
        masks.append(fracture_region(anatomy, fracture))
    return masks


def _posterior_ribs(
    anatomy: Anatomy, reach: np.ndarray, fracture: RibFracture | None
) -> np.ndarray:
    k = posterior_rib_coordinate(anatomy, reach)
    visible = ramp(reach - 0.12, 0.1) * ramp(1.06 - reach, 0.1) * ramp(POSTERIOR_RIBS - k, 0.2)
    visible *= k >= 0
    if fracture is not None:
        k, gap = _break(anatomy, k, reach, fracture)
        visible = visible * (1.0 - gap)
    phase = k - np.floor(k)
    across = phase / 0.18 - 1.0
    # Ribs lose height medially where they meet the transverse processes.
    return 0.2 * tube(across) * visible


def _break(
    anatomy: Anatomy, k: np.ndarray, reach: np.ndarray, fracture: RibFracture
) -> tuple[np.ndarray, np.ndarray]:
    """Shift the lateral fragment of the broken rib and open a thin gap at the break."""
    side = (anatomy.frame.u < anatomy.midline) == (fracture.side == "right")
    on_rib = side & (np.floor(k + 0.29) == fracture.rib)
    # The fragment lateral to the break is angulated: displaced at the break, rejoining the
    # rib's course a few centimetres on.
    beyond = reach - fracture.reach
    lateral = on_rib * (beyond > 0) * np.clip(1.0 - beyond / 0.06, 0.0, 1.0)
    k = k - 0.36 * fracture.step * lateral
    gap = on_rib * ramp(0.012 - np.abs(reach - fracture.reach), 0.01)
    return k, gap


def fracture_region(anatomy: Anatomy, fracture: RibFracture) -> np.ndarray:
    """The ground-truth box-like region around a rib break, (size, size) bool."""
    reach = hemithorax_reach(anatomy)
    k = posterior_rib_coordinate(anatomy, reach)
    side = (anatomy.frame.u < anatomy.midline) == (fracture.side == "right")
    near_rib = (k > fracture.rib - 0.35) & (k < fracture.rib + 0.8)
    return side & near_rib & (np.abs(reach - fracture.reach) < 0.07)


def _anterior_ribs(anatomy: Anatomy, reach: np.ndarray) -> np.ndarray:
    """Anterior arcs: from the lateral wall down towards the sternum, fading where the
    costal cartilage (invisible) takes over."""
    plan = anatomy.plan
    v0, v1 = plan.rib_cage[1], plan.rib_cage[3]
    height = (v1 - v0) * plan.rib_spacing
    slope = 0.28 * np.clip(1.0 - reach, 0.0, None) - 0.05 * np.clip(reach - 0.8, 0.0, None) / 0.2
    t = anatomy.frame.v - slope - (v0 + 0.01)
    k = t / (0.16 * height)
    visible = ramp(reach - 0.42, 0.2) * ramp(1.05 - reach, 0.1) * (k >= 0) * ramp(5.5 - k, 0.3)
    phase = k - np.floor(k)
    return 0.15 * tube(phase / 0.2 - 1.0) * visible


def _clavicles(anatomy: Anatomy) -> np.ndarray:
    """Two S-shaped bars from the sternal notch up and out to the shoulders."""
    f, plan = anatomy.frame, anatomy.plan
    offset = np.abs(f.u - anatomy.midline)
    t = (offset - 0.03) / 0.3
    medial_v = plan.rib_cage[1] + 0.09 + plan.clavicle_level
    centre = medial_v - 0.06 * t + 0.01 * np.sin(2.0 * np.pi * np.clip(t, 0.0, 1.0))
    half = 0.02 - 0.006 * np.clip(t, 0.0, 1.0)
    across = (f.v - centre) / half
    extent = ramp(t, 0.04) * ramp(0.95 - t, 0.05)
    return 0.4 * tube(np.clip(across, -1.0, 1.0)) * (np.abs(across) < 1.0) * extent


def _spine(anatomy: Anatomy) -> np.ndarray:
    """Vertebral bodies with darker disc spaces and ring-like pedicles, along the (possibly
    curved) spine."""
    f, plan = anatomy.frame, anatomy.plan
    v0, v1 = plan.rib_cage[1], plan.rib_cage[3]
    period = (v1 - v0) / 9.5
    offset = f.u - anatomy.spine_u
    phase = (f.v - v0) / period
    phase = phase - np.floor(phase)
    half = 0.028 + 0.012 * np.clip((f.v - v0) / (v1 - v0), 0.0, 1.2)
    column = ramp(half - np.abs(offset), 0.02)
    disc = ramp(np.abs(phase - 0.92) - 0.06, 0.05)
    density = 0.14 * column * (0.55 + 0.45 * disc)
    dv = (phase - 0.35) * period
    for sign in (-1.0, 1.0):
        r = np.sqrt(((offset - sign * 0.72 * half) / 0.008) ** 2 + (dv / 0.012) ** 2)
        density += 0.08 * ramp(0.35 - np.abs(r - 1.0), 0.3)
    spinous = ((offset / 0.006) ** 2 + ((phase - 0.65) * period / 0.013) ** 2) < 1.0
    density += 0.06 * spinous
    return density
