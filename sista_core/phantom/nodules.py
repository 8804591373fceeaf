"""Focal round lesions: nodule (small, soft-tissue dense), mass (larger, lobulated) and
granuloma (tiny, calcified, much denser than a nodule of its size). The densities are what
lets a learner tell a granuloma from a nodule: size alone overlaps."""

from __future__ import annotations

import numpy as np

from ..findings import Finding
from .anatomy import Anatomy
from .attributes import severity_index, sides
from .film import Film
from .frame import sphere

# Radii (canonical units) by severity; a 224-pixel film is ~35 cm, so 0.015 is ~1 cm.
NODULE_RADII = (0.011, 0.015, 0.02)
MASS_RADII = (0.045, 0.058, 0.072)
GRANULOMA_RADII = (0.0055, 0.007, 0.009)


def _disc(
    film: Film,
    anatomy: Anatomy,
    centre: tuple[float, float],
    radius: float,
    lobulation: float,
    rng: np.random.Generator,
) -> tuple[tuple[slice, slice], np.ndarray]:
    """A (possibly lobulated) ball's projected thickness in a window around it."""
    f = anatomy.frame
    reach = radius * (1.0 + lobulation) + 2.0 / f.size
    window = f.around(centre, reach)
    u, v = f.u[:, window[1]], f.v[window[0]]
    if lobulation:
        angle = np.arctan2(v - centre[1], u - centre[0])
        phases = rng.uniform(0, 2 * np.pi, 2)
        bumps = 1.0 + lobulation * (
            0.6 * np.sin(3 * angle + phases[0]) + 0.4 * np.sin(5 * angle + phases[1])
        )
        du, dv = (u - centre[0]) / bumps, (v - centre[1]) / bumps
        thickness = sphere(du + centre[0], dv + centre[1], centre, radius)
    else:
        thickness = sphere(u, v, centre, radius)
    return window, thickness


def _paint_round(
    film: Film,
    anatomy: Anatomy,
    finding: Finding,
    rng: np.random.Generator,
    strength: float,
    radii: tuple[float, float, float],
    count: tuple[int, int],
    density: float,
    calcified: bool,
    lobulation: float,
) -> list[np.ndarray]:
    f = anatomy.frame
    masks = []
    for side in sides(finding):
        for _ in range(int(rng.integers(count[0], count[1] + 1))):
            # Never smaller than about a pixel and a half, or blur erases it.
            radius = max(radii[severity_index(finding)] * rng.uniform(0.85, 1.15), 1.5 / f.size)
            centre = anatomy.pick_point(rng, side, finding.zone or "middle", depth=0.9)
            window, thickness = _disc(film, anatomy, centre, radius, lobulation, rng)
            layer = film.metal if calcified else film.tissue
            layer[window] += density * strength * thickness
            mask = np.zeros((f.size, f.size), dtype=bool)
            mask[window] = thickness > 0.05
            masks.append(mask)
    return masks


def paint_nodule(
    film: Film, anatomy: Anatomy, finding: Finding, rng: np.random.Generator, strength: float
) -> list[np.ndarray]:
    """One round soft-tissue nodule per side (sometimes two)."""
    return _paint_round(
        film, anatomy, finding, rng, strength, NODULE_RADII, (1, 1), 0.22, False, 0.0
    )


def paint_mass(
    film: Film, anatomy: Anatomy, finding: Finding, rng: np.random.Generator, strength: float
) -> list[np.ndarray]:
    """One large lobulated soft-tissue mass."""
    return _paint_round(film, anatomy, finding, rng, strength, MASS_RADII, (1, 1), 0.34, False, 0.1)


def paint_granuloma(
    film: Film, anatomy: Anatomy, finding: Finding, rng: np.random.Generator, strength: float
) -> list[np.ndarray]:
    """One to three tiny calcified dots: as bright as bone though a few pixels across."""
    count = (1, 1 + severity_index(finding))
    return _paint_round(
        film, anatomy, finding, rng, strength, GRANULOMA_RADII, count, 0.55, True, 0.0
    )


def paint_lung_lesion(
    film: Film, anatomy: Anatomy, finding: Finding, rng: np.random.Generator, strength: float
) -> list[np.ndarray]:
    """CheXpert's umbrella label: a nodule, or a mass when large."""
    painter = paint_mass if finding.severity == "large" or rng.random() < 0.2 else paint_nodule
    return painter(film, anatomy, finding, rng, strength)
