"""Support devices: endotracheal tube, central venous line, pacemaker with leads, nasogastric
tube, sternotomy wires and ECG electrodes. Drawn with PIL on the canonical film (lines and
shapes are what devices are) and added to the metal layer; each device is one instance."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from ..findings import Finding
from .anatomy import Anatomy
from .attributes import severity_index
from .film import Film

Points = list[tuple[float, float]]
DeviceDrawer = Callable[[ImageDraw.ImageDraw, Anatomy, np.random.Generator], float]


def _px(anatomy: Anatomy, points: Points) -> Points:
    n = anatomy.frame.size
    return [(u * n, v * n) for u, v in points]


def _width(anatomy: Anatomy, canonical: float) -> int:
    return max(1, round(canonical * anatomy.frame.size))


def _curve(points: Points, steps: int = 12) -> Points:
    """A smooth path through the points (Catmull-Rom), for tubes and leads."""
    p = np.asarray([points[0], *points, points[-1]], dtype=np.float64)
    out = []
    t = np.linspace(0, 1, steps, endpoint=False)[:, None]
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        segment = 0.5 * (
            2 * p1
            + (-p0 + p2) * t
            + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
            + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3
        )
        out.extend(segment.tolist())
    out.append(tuple(p[-2]))
    return [tuple(q) for q in out]


def _endotracheal_tube(draw: ImageDraw.ImageDraw, anatomy: Anatomy, rng) -> float:
    """Down the trachea to a few centimetres above the carina, with its radiopaque stripe."""
    tip = anatomy.carina_v - rng.uniform(0.03, 0.06)
    u = float(anatomy.spine_u[0, 0]) + rng.normal(0, 0.003)
    draw.line(_px(anatomy, [(u, 0.0), (u, tip)]), fill=110, width=_width(anatomy, 0.018))
    stripe = u + 0.006
    draw.line(_px(anatomy, [(stripe, 0.0), (stripe, tip)]), fill=255, width=_width(anatomy, 0.003))
    return 0.8


def _central_line(draw: ImageDraw.ImageDraw, anatomy: Anatomy, rng) -> float:
    """A right subclavian or jugular catheter down the superior vena cava."""
    mid, carina = anatomy.midline, anatomy.carina_v
    svc = mid - rng.uniform(0.035, 0.05)
    tip = (svc + 0.005, carina + rng.uniform(0.06, 0.1))
    if rng.random() < 0.5:
        entry = [
            (anatomy.thorax[0] + 0.06, anatomy.plan.rib_cage[1] + 0.07),
            (svc - 0.05, carina - 0.08),
        ]
    else:
        entry = [(mid - 0.05, 0.0), (svc - 0.01, carina - 0.1)]
    path = _curve([*entry, (svc, carina - 0.02), tip])
    draw.line(_px(anatomy, path), fill=255, width=_width(anatomy, 0.004), joint="curve")
    return 0.7


def _pacemaker(draw: ImageDraw.ImageDraw, anatomy: Anatomy, rng) -> float:
    """A generator below the left clavicle (image right) with leads into the right atrium and
    the right ventricular apex."""
    gu = anatomy.thorax[1] - rng.uniform(0.1, 0.16)
    gv = anatomy.plan.rib_cage[1] + rng.uniform(0.08, 0.12)
    w, h = rng.uniform(0.032, 0.042), rng.uniform(0.024, 0.032)
    box = _px(anatomy, [(gu - w, gv - h), (gu + w, gv + h)])
    draw.rounded_rectangle([*box[0], *box[1]], radius=h * anatomy.frame.size * 0.8, fill=255)
    mid, carina = anatomy.midline, anatomy.carina_v
    heart_rows = np.flatnonzero(anatomy.heart_mask.any(1))
    heart_top = (heart_rows[0] + 0.5) / anatomy.frame.size
    heart_bottom = (heart_rows[-1] + 0.5) / anatomy.frame.size
    vein = [(gu - w, gv), (mid + 0.02, gv - 0.01), (mid - 0.035, carina), (mid - 0.04, heart_top)]
    atrium = (mid - 0.05, heart_top + 0.05)
    apex = (mid + 0.08 + 0.3 * (anatomy.plan.cardiothoracic_ratio - 0.4), heart_bottom - 0.03)
    lead_width = _width(anatomy, 0.005)
    for end in (atrium, (mid - 0.01, heart_bottom - 0.06), apex)[: 1 + int(rng.integers(1, 3))]:
        path = _curve([*vein, end])
        draw.line(_px(anatomy, path), fill=230, width=lead_width, joint="curve")
    return 1.5


def _nasogastric_tube(draw: ImageDraw.ImageDraw, anatomy: Anatomy, rng) -> float:
    """Down the oesophagus, through the diaphragm, into the stomach under the left dome."""
    mid = anatomy.midline + 0.012
    col = min(anatomy.frame.size - 1, int((mid + 0.12) * anatomy.frame.size))
    dome = float(anatomy.dome_v[col])
    points = [(mid - 0.005, 0.0), (mid, anatomy.carina_v), (mid + 0.02, dome - 0.05)]
    points += [(mid + 0.08, dome + 0.04), (mid + 0.13, dome + 0.06)]
    draw.line(_px(anatomy, _curve(points)), fill=200, width=_width(anatomy, 0.006), joint="curve")
    return 0.6


def _sternotomy_wires(draw: ImageDraw.ImageDraw, anatomy: Anatomy, rng) -> float:
    """Four to six twisted wire loops stacked on the sternum, over the midline."""
    top = anatomy.carina_v - 0.04
    width = _width(anatomy, 0.0035)
    for v in np.linspace(top, top + rng.uniform(0.17, 0.24), int(rng.integers(4, 7))):
        u = anatomy.midline + rng.normal(0, 0.003)
        box = _px(anatomy, [(u - 0.014, v - 0.007), (u + 0.014, v + 0.007)])
        draw.ellipse([*box[0], *box[1]], outline=255, width=width)
    return 1.2


def _ecg_electrodes(draw: ImageDraw.ImageDraw, anatomy: Anatomy, rng) -> float:
    """Snap electrodes on the chest wall with their lead wires trailing off the film."""
    for _ in range(int(rng.integers(2, 5))):
        u = rng.uniform(0.12, 0.88)
        v = rng.uniform(anatomy.plan.rib_cage[1], anatomy.plan.rib_cage[3])
        r = 0.012
        box = _px(anatomy, [(u - r, v - r), (u + r, v + r)])
        draw.ellipse([*box[0], *box[1]], outline=200, width=_width(anatomy, 0.003))
        dot = _px(anatomy, [(u - 0.004, v - 0.004), (u + 0.004, v + 0.004)])
        draw.ellipse([*dot[0], *dot[1]], fill=255)
        out = 0.0 if u < 0.5 else 1.0
        path = _curve(
            [(u, v), ((u + out) / 2, v + rng.uniform(-0.1, 0.1)), (out, v + rng.uniform(-0.2, 0.2))]
        )
        draw.line(_px(anatomy, path), fill=150, width=_width(anatomy, 0.003), joint="curve")
    return 0.7


# Roughly how often each device appears on inpatient films with "support devices".
DEVICES: tuple[tuple[DeviceDrawer, float], ...] = (
    (_central_line, 0.3),
    (_pacemaker, 0.2),
    (_endotracheal_tube, 0.15),
    (_nasogastric_tube, 0.15),
    (_sternotomy_wires, 0.1),
    (_ecg_electrodes, 0.1),
)


def paint_devices(
    film: Film, anatomy: Anatomy, finding: Finding, rng: np.random.Generator, strength: float
) -> list[np.ndarray]:
    """One to three different devices (by severity); uncertain ones are drawn fainter."""
    count = 1 + severity_index(finding) // 2 + int(rng.random() < 0.3)
    weights = np.asarray([w for _, w in DEVICES])
    chosen = rng.choice(
        len(DEVICES), size=min(count, len(DEVICES)), replace=False, p=weights / weights.sum()
    )
    size = anatomy.frame.size
    masks = []
    for index in sorted(chosen):
        canvas = Image.new("L", (size, size), 0)
        density = DEVICES[index][0](ImageDraw.Draw(canvas), anatomy, rng)
        drawn = np.asarray(canvas, dtype=np.float32) / 255.0
        film.metal += density * strength * drawn
        masks.append(drawn > 0.1)
    return masks
