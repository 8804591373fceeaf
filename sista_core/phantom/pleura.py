"""Pleural findings: effusion (dependent fluid with a meniscus), pneumothorax (air between a
retracted lung and the chest wall) and pleural thickening ("pleural other")."""

from __future__ import annotations

import numpy as np

from ..findings import Finding
from .anatomy import Anatomy, PatientSide
from .attributes import severity_index, sides
from .film import Film
from .frame import ramp

# Fluid height at the lateral chest wall, as a fraction of the lung's height, by severity:
# small blunts the costophrenic angle, large reaches the hilum.
EFFUSION_HEIGHTS = (0.18, 0.33, 0.55)
# Width of the pleural air at the apex, as a fraction of the film, by severity.
PNEUMOTHORAX_DEPTH = (0.025, 0.05, 0.09)
# Half the widest gap (canonical units) between a placed pneumothorax and the lung's edge that
# is filled with air: the mapping from another film's thorax is not exact.
PLEURAL_GAP = 0.03


def paint_effusion(
    film: Film, anatomy: Anatomy, finding: Finding, rng: np.random.Generator, strength: float
) -> list[np.ndarray]:
    """Fluid filling the lung base up to a meniscus that climbs the lateral chest wall; denser
    downward, hiding the dome and the costophrenic angle."""
    f = anatomy.frame
    masks = []
    for side in sides(finding):
        lung = anatomy.lung(side)
        top, bottom = anatomy.lung_rows[side]
        height = bottom - top
        cols = np.flatnonzero(lung.any(0))
        lateral_u = (cols[0] if side == "right" else cols[-1]) / f.size
        medial_u = (cols[-1] if side == "right" else cols[0]) / f.size
        level = bottom - EFFUSION_HEIGHTS[severity_index(finding)] * height * rng.uniform(
            0.85, 1.15
        )
        # The meniscus: the fluid line falls away from the chest wall towards the midline.
        inward = np.clip((f.u - lateral_u) / (medial_u - lateral_u), 0.0, 1.0)
        meniscus = level + 0.16 * height * inward**0.6
        fluid = ramp(f.v - meniscus, 0.025) * anatomy.lungs * lung
        depth = np.clip((f.v - meniscus) / (0.2 * height), 0.0, 1.0)
        film.fill(fluid, strength)
        film.tissue += strength * 0.12 * fluid * depth
        mask = fluid > 0.5
        if mask.any():
            masks.append(mask)
    return masks


def paint_pneumothorax(
    film: Film, anatomy: Anatomy, finding: Finding, rng: np.random.Generator, strength: float
) -> list[np.ndarray]:
    """A crescent of air along the apex and lateral chest wall, widest at the apex (air rises
    in an upright patient): black, with no vessels, bounded by the thin white visceral pleural
    line of the retracted lung."""
    masks = []
    depth = PNEUMOTHORAX_DEPTH[severity_index(finding)] * rng.uniform(0.85, 1.15)
    depth *= 0.7 + 0.3 * strength
    for side in sides(finding):
        air = _pleural_air(anatomy, side, depth, apical_only=finding.zone == "apical")
        if air.any():
            _paint_air(film, anatomy.lung(side), air, strength)
            masks.append(air)
    return masks


def paint_placed_pneumothorax(
    film: Film,
    anatomy: Anatomy,
    finding: Finding,
    rng: np.random.Generator,
    strength: float,
    regions: list[np.ndarray],
) -> list[np.ndarray]:
    """Pleural air where the placed regions (a mapped SIIM mask) fall in each lung field (the
    phantom's lung field is the hemithorax inside the ribs, i.e. the pleural space). Pleural
    air lies against the chest wall, so a gap the mapping left between the mask and the
    lung's edge, narrower than ``2 * PLEURAL_GAP``, is filled with air too (a closing of the
    air with everything outside the lung, kept near the air). One instance per side."""
    placed = np.logical_or.reduce(regions)
    reach = max(1, round(PLEURAL_GAP * anatomy.frame.size))
    masks = []
    for side in ("right", "left"):
        lung = anatomy.lung(side)
        inside = placed & lung
        if not inside.any():
            continue
        closed = ~_grow(~_grow(inside | ~lung, reach), reach)
        # Only gaps next to the air: not the lung's own narrow corners (costophrenic angles).
        air = lung & closed & _grow(inside, 2 * reach)
        _paint_air(film, lung, air, strength)
        masks.append(air)
    return masks


def _paint_air(film: Film, lung: np.ndarray, air: np.ndarray, strength: float) -> None:
    """Pleural air inside one lung field: black, with no vessels, bounded on the lung's side
    by the thin white visceral pleural line of the retracted lung."""
    pleural_line = lung & ~air & _touches(air)
    air_soft = air.astype(np.float32)
    film.markings *= 1.0 - air_soft
    film.air += 0.05 * strength * air_soft
    film.tissue += 0.1 * strength * pleural_line


def _pleural_air(
    anatomy: Anatomy, side: PatientSide, depth: float, apical_only: bool
) -> np.ndarray:
    """Lung pixels within ``depth`` of the apex or (tapering to nothing at the base) of the
    lateral chest wall, (size, size) bool."""
    lung = anatomy.lung(side)
    n = anatomy.frame.size
    index = np.arange(n)
    rows = np.flatnonzero(lung.any(1))
    height = max(1, rows[-1] - rows[0])
    towards_apex = np.clip((rows[-1] - index) / height, 0.0, 1.0)
    gap = depth * n
    if apical_only:
        # An apical cap: air over the apex, reaching down the wall only to mid-lung.
        lateral_gap = 0.6 * gap * np.clip(2.0 * towards_apex - 1.0, 0.0, 1.0)
    else:
        lateral_gap = gap * towards_apex**0.8
    top = np.argmax(lung, axis=0)
    # Only columns that reach the apex: not those whose top is a notch under the aortic knob.
    apical_cols = lung.any(0) & (top < rows[0] + 0.2 * height)
    apical = (index[:, None] - top[None, :] < gap) & apical_cols[None, :]
    return lung & ((lateral_distance(anatomy, side) < lateral_gap[:, None]) | apical)


def lateral_distance(anatomy: Anatomy, side: PatientSide) -> np.ndarray:
    """(size, size) pixels from each lung row's outermost (chest-wall) edge, inwards."""
    lung = anatomy.lung(side)
    n = anatomy.frame.size
    index = np.arange(n)
    if side == "right":  # lateral is the image left
        return index[None, :] - np.argmax(lung, axis=1)[:, None]
    return (n - 1 - np.argmax(lung[:, ::-1], axis=1))[:, None] - index[None, :]


def _grow(region: np.ndarray, steps: int) -> np.ndarray:
    """``region`` dilated by ``steps`` pixels (4-neighbour steps); the complement of growing
    the complement is an erosion."""
    for _ in range(steps):
        region = region | _touches(region)
    return region


def _touches(region: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour inside ``region``."""
    near = np.zeros_like(region)
    near[1:] |= region[:-1]
    near[:-1] |= region[1:]
    near[:, 1:] |= region[:, :-1]
    near[:, :-1] |= region[:, 1:]
    return near


def paint_pleural_thickening(
    film: Film, anatomy: Anatomy, finding: Finding, rng: np.random.Generator, strength: float
) -> list[np.ndarray]:
    """A band of soft tissue along the lateral chest wall (or an apical cap) inside the lung
    edge."""
    f = anatomy.frame
    masks = []
    thickness = (0.012, 0.018, 0.026)[severity_index(finding)] * rng.uniform(0.85, 1.15)
    shift = max(2, round(thickness * f.size))
    for side in sides(finding):
        lung = anatomy.lung(side)
        if finding.zone == "apical":
            band = lung & ~np.roll(lung, shift, axis=0)
            lo, hi = anatomy.zone_band(side, "apical")
        else:
            band = lung & (lateral_distance(anatomy, side) < shift)
            lo, hi = anatomy.zone_band(side, finding.zone or "lower")
        band &= (f.v >= lo) & (f.v <= hi)
        region = band.astype(np.float32)
        film.fill(region, strength)
        film.tissue += 0.08 * strength * region
        if band.any():
            masks.append(band)
    return masks
