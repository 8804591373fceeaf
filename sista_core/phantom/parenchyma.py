"""Airspace and interstitial disease: lung opacity, consolidation, pneumonia, edema and
atelectasis. Each replaces lung air (``Film.fill``) rather than brightening pixels, so the
vessels and any border it touches disappear behind it, as on a real film.

Painters take (film, anatomy, finding, rng, strength) and return one bool mask per drawn
instance on the canonical film.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..findings import Finding
from .anatomy import Anatomy, PatientSide
from .attributes import severity_index, sides
from .film import Film
from .frame import blur, ellipse, elliptic_radius, ramp, smooth_noise


@dataclass(frozen=True)
class AirspacePattern:
    """How one kind of airspace disease looks: how much air it replaces, how patchy and how
    sharp it is, how many foci it has."""

    filling: float
    mottling: float  # 0 = homogeneous, 1 = very patchy inside
    ragged: float  # how irregular the outline is
    texture_cells: int  # outline irregularity scale: cells across the patch window
    edge: float  # width of the fading margin, canonical units
    foci: tuple[int, int]  # how many patches (inclusive range)
    radii: tuple[float, float, float]  # patch radius by severity
    bronchograms: bool


AIRSPACE_PATTERNS: dict[str, AirspacePattern] = {
    # Ill-defined, hazy, often several small patches.
    "Lung Opacity": AirspacePattern(0.6, 0.5, 0.8, 6, 0.04, (1, 3), (0.04, 0.055, 0.075), False),
    # Dense, homogeneous, confluent, with air bronchograms.
    "Consolidation": AirspacePattern(0.92, 0.2, 0.7, 9, 0.025, (1, 2), (0.065, 0.085, 0.11), True),
    # Patchy consolidation in one area, several foci.
    "Pneumonia": AirspacePattern(0.82, 0.4, 0.9, 9, 0.03, (2, 4), (0.045, 0.06, 0.08), True),
}
# Exponent of the outline a placed opacity takes inside its box (2 = ellipse, large = box).
SQUIRCLE = 2.5


def paint_airspace(
    film: Film, anatomy: Anatomy, finding: Finding, rng: np.random.Generator, strength: float
) -> list[np.ndarray]:
    """Opacity, consolidation or pneumonia: noisy blobs clipped to the lung, in the finding's
    zone."""
    pattern = AIRSPACE_PATTERNS[finding.observation]
    radius = pattern.radii[severity_index(finding)]
    f = anatomy.frame
    masks = []
    for side in sides(finding):
        centre = anatomy.pick_point(rng, side, finding.zone or "lower", depth=0.7)
        foci = int(rng.integers(pattern.foci[0], pattern.foci[1] + 1))
        reach = 2.6 * radius
        window = f.around(centre, reach)
        u, v = f.u[:, window[1]], f.v[window[0]]
        density = np.zeros((v.shape[0], u.shape[1]), dtype=np.float32)
        for _ in range(foci):
            spot = (
                centre[0] + rng.normal(0, 0.6 * radius) * (foci > 1),
                centre[1] + rng.normal(0, 0.6 * radius) * (foci > 1),
            )
            radii = (radius * rng.uniform(0.7, 1.3), radius * rng.uniform(0.7, 1.3))
            r = elliptic_radius(u, v, spot, radii, tilt=rng.uniform(0, np.pi))
            # A noisy outline: airspace disease follows acini and lobules, not circles.
            ragged = smooth_noise(rng, density.shape, pattern.texture_cells)
            shape = (1.0 - r) + pattern.ragged * (ragged - 0.5)
            np.maximum(density, ramp(shape * radius, pattern.edge), out=density)
        clip = anatomy.lungs[window] * anatomy.lung(side)[window]
        cells = max(4, round(radius * 160))
        mask = _fill_airspace(
            film, anatomy, finding, rng, strength, window, density, clip, cells, side
        )
        if mask.any():
            masks.append(mask)
    return masks


def paint_placed_airspace(
    film: Film,
    anatomy: Anatomy,
    finding: Finding,
    rng: np.random.Generator,
    strength: float,
    regions: list[np.ndarray],
) -> list[np.ndarray]:
    """Opacity, consolidation or pneumonia filling each placed region (a mapped RSNA box, or
    a mask) within the lungs: the region's outline rounded and made ragged, so a box holds a
    blob reaching its four sides, as a reader draws a box around an opacity."""
    pattern = AIRSPACE_PATTERNS[finding.observation]
    f = anatomy.frame
    masks = []
    for region in regions:
        rows, cols = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
        if rows.size == 0:
            continue
        window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        inside = region[window]
        # A squircle inscribed in the region's bounding box (rounded corners, sides reached
        # midway), its outline made ragged and its margin fading.
        half = np.array([cols[-1] + 1 - cols[0], rows[-1] + 1 - rows[0]]) / (2 * f.size)
        centre = (cols[0] / f.size + half[0], rows[0] / f.size + half[1])
        du = np.abs(f.u[:, window[1]] - centre[0]) / half[0]
        dv = np.abs(f.v[window[0]] - centre[1]) / half[1]
        r = (du**SQUIRCLE + dv**SQUIRCLE) ** (1.0 / SQUIRCLE)
        ragged = smooth_noise(rng, inside.shape, pattern.texture_cells)
        shape = (1.0 - r) + 0.3 * pattern.ragged * (ragged - 0.5)
        density = ramp(shape - 0.1, 0.4) * inside
        centre_u = (cols[0] + cols[-1] + 1) / 2 / f.size
        side: PatientSide = "right" if centre_u < anatomy.midline else "left"
        # Mottled at the scale of the unplaced patches (160 cells per unit of radius, over a
        # window 5.2 radii wide).
        cells = max(4, round(max(half) * 2 * 160 / 5.2))
        clip = anatomy.lungs[window]
        mask = _fill_airspace(
            film, anatomy, finding, rng, strength, window, density, clip, cells, side
        )
        if mask.any():
            masks.append(mask)
    return masks


def _fill_airspace(
    film: Film,
    anatomy: Anatomy,
    finding: Finding,
    rng: np.random.Generator,
    strength: float,
    window: tuple[slice, slice],
    density: np.ndarray,
    clip: np.ndarray,
    texture_cells: int,
    side: PatientSide,
) -> np.ndarray:
    """Mottle an airspace patch's density (window-sized) with noise of ``texture_cells``
    across the window, clip it to ``clip`` (the lung), cut air bronchograms towards
    ``side``'s hilum, and let it replace the air; returns the drawn mask on the whole film."""
    pattern = AIRSPACE_PATTERNS[finding.observation]
    f = anatomy.frame
    texture = smooth_noise(rng, density.shape, texture_cells)
    density *= 1.0 - pattern.mottling * texture
    density *= clip
    if pattern.bronchograms and severity_index(finding) > 0:
        density *= 1.0 - 0.55 * _bronchograms(
            rng, density.shape, anatomy.hila[side], window, f.size
        )
    film.fill_window(window, density, pattern.filling * strength)
    film.tissue[window] += 0.03 * strength * density
    mask = np.zeros((f.size, f.size), dtype=bool)
    mask[window] = density > 0.3
    return mask


def _bronchograms(
    rng: np.random.Generator,
    shape: tuple[int, int],
    hilum: tuple[float, float],
    window: tuple[slice, slice],
    size: int,
) -> np.ndarray:
    """Air-filled bronchi running away from the hilum through the consolidation, (h, w)."""
    h, w = shape
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    hx, hy = hilum[0] * size - window[1].start, hilum[1] * size - window[0].start
    cx, cy = w / 2, h / 2
    heading = np.arctan2(cy - hy, cx - hx)
    for _ in range(int(rng.integers(2, 4))):
        x, y = cx - 0.4 * w * np.cos(heading), cy - 0.4 * h * np.sin(heading)
        x += rng.normal(0, 0.12 * w)
        y += rng.normal(0, 0.12 * h)
        angle = heading + rng.normal(0, 0.25)
        for width in (2, 1, 1):
            length = rng.uniform(0.18, 0.3) * max(h, w)
            x1, y1 = x + length * np.cos(angle), y + length * np.sin(angle)
            draw.line((x, y, x1, y1), fill=255, width=max(1, round(width * size / 224)))
            x, y, angle = x1, y1, angle + rng.normal(0, 0.35)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def paint_edema(
    film: Film, anatomy: Anatomy, finding: Finding, rng: np.random.Generator, strength: float
) -> list[np.ndarray]:
    """Bilateral perihilar ("bat-wing") haze fading to the periphery, with Kerley B lines at
    the lateral bases when moderate or worse."""
    f = anatomy.frame
    grade = severity_index(finding)
    reach = (0.14, 0.18, 0.22)[grade]
    haze = np.zeros((f.size, f.size), dtype=np.float32)
    for hu, hv in anatomy.hila.values():
        du, dv = (f.u - hu) / reach, (f.v - hv - 0.02) / (1.5 * reach)
        # Compact support, so the ground truth can say exactly where the haze ends.
        np.maximum(haze, np.clip(1.0 - (du * du + dv * dv), 0.0, 1.0) ** 1.5, out=haze)
    haze *= 0.6 + 0.4 * smooth_noise(rng, haze.shape, 14)
    haze *= anatomy.lungs
    film.fill(haze, (0.75 + 0.1 * grade) * strength)
    region = haze > 0.08
    if grade >= 1:
        region |= _kerley_lines(film, anatomy, rng, strength)
    # Congested vessels: the hila look larger and fuzzier.
    congestion = blur(film.markings, max(2, f.size // 56)) * haze
    film.markings += 0.3 * strength * congestion
    return [region] if region.any() else []


def _kerley_lines(
    film: Film, anatomy: Anatomy, rng: np.random.Generator, strength: float
) -> np.ndarray:
    """Short horizontal septal lines reaching the lateral pleura of both lower zones."""
    f = anatomy.frame
    canvas = Image.new("L", (f.size, f.size), 0)
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(f.size / 224))
    for side in ("right", "left"):
        lo, hi = anatomy.zone_band(side, "lower")
        inward = 1.0 if side == "right" else -1.0
        for v in np.linspace(lo, hi, int(rng.integers(4, 7))) + rng.normal(0, 0.006, 1):
            row = min(f.size - 1, int(v * f.size))
            cols = np.flatnonzero(anatomy.lung(side)[row])
            if cols.size == 0:
                continue
            edge = (cols[0] if side == "right" else cols[-1]) / f.size
            start = edge + inward * 0.004
            end = start + inward * rng.uniform(0.015, 0.03)
            draw.line((start * f.size, v * f.size, end * f.size, v * f.size), fill=255, width=width)
    lines = np.asarray(canvas, dtype=np.float32) / 255.0 * anatomy.lungs
    film.markings += 0.12 * strength * lines
    return lines > 0.3


def paint_atelectasis(
    film: Film, anatomy: Anatomy, finding: Finding, rng: np.random.Generator, strength: float
) -> list[np.ndarray]:
    """Plate-like (discoid) bands when small or moderate; a collapsed lower (or upper) lobe,
    a dense triangle against the mediastinum, when large."""
    masks = []
    for side in sides(finding):
        if severity_index(finding) == 2:
            region = _lobar_collapse(anatomy, side, finding.zone or "basilar")
            # Airless lobe: denser than lung, seen even behind the heart (the "sail").
            film.fill(region, 0.95 * strength)
            film.tissue += 0.1 * strength * region
        else:
            region = _plates(anatomy, side, finding, rng)
            film.fill(region, 0.75 * strength)
        mask = region > 0.5
        if mask.any():
            masks.append(mask)
    return masks


def _plates(
    anatomy: Anatomy, side: PatientSide, finding: Finding, rng: np.random.Generator
) -> np.ndarray:
    f = anatomy.frame
    region = np.zeros((f.size, f.size), dtype=np.float32)
    plates = 1 + severity_index(finding) + int(rng.integers(0, 2))
    for _ in range(plates):
        centre = anatomy.pick_point(rng, side, finding.zone or "basilar", depth=0.85)
        length = rng.uniform(0.045, 0.075) * (1 + 0.3 * severity_index(finding))
        thickness = max(rng.uniform(0.005, 0.008), 1.0 / f.size)
        tilt = rng.normal(0, 0.2) + (0.12 if side == "right" else -0.12)
        reach = length + 0.01
        window = f.around(centre, reach)
        band = ellipse(
            f.u[:, window[1]], f.v[window[0]], centre, (length, thickness), 2.0 / f.size, tilt
        )
        np.maximum(region[window], band, out=region[window])
    return region * anatomy.lung(side)


def _lobar_collapse(anatomy: Anatomy, side: PatientSide, zone: str) -> np.ndarray:
    """A lobe collapsed against the mediastinum: the lung on the medial side of a line from
    the hilum to the dome (lower lobe, behind the heart on the left) or to the lateral apex
    (upper lobe)."""
    f = anatomy.frame
    hu, hv = anatomy.hila[side]
    top, bottom = anatomy.lung_rows[side]
    lateral = anatomy.lateral_sign(side)
    on_side = (f.u < anatomy.midline) if side == "right" else (f.u >= anatomy.midline)
    lung = (anatomy.fields > 0.5) & on_side
    cols = np.flatnonzero(lung.any(0))
    width = (cols[-1] - cols[0] + 1) / f.size
    if zone in ("upper", "apical"):
        # Upper lobe: above a line rising from the hilum to the lateral apex.
        end_u, end_v = hu + lateral * 0.8 * width, top + 0.1 * (bottom - top)
        along = (f.u - hu) / (end_u - hu)
        boundary = hv + (end_v - hv) * np.clip(along, 0.0, 1.0)
        inside = ramp(boundary - f.v, 0.01) * ramp(hv + 0.02 - f.v, 0.01)
    else:
        # Lower lobe: medial to a line from the hilum down to the medial third of the dome.
        end_u, end_v = hu + lateral * 0.4 * width, bottom
        along = (f.v - hv) / (end_v - hv)
        boundary = hu + (end_u - hu) * np.clip(along, 0.0, 1.0)
        inside = ramp(lateral * (boundary - f.u), 0.01) * ramp(f.v - hv, 0.02)
    return (inside * lung).astype(np.float32)
