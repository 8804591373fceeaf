"""Normal chest anatomy of one phantom patient: where the lungs, heart, mediastinum, spine
and diaphragm lie on the canonical film, and their soft-tissue attenuation.

A `BodyPlan` holds the numbers (sampled per seed, so normal films differ); findings that
change the whole chest (cardiomegaly, hyperinflation, scoliosis, a wide mediastinum) edit the
plan before `build_anatomy` turns it into fields. Sides are the patient's: the right lung is
drawn on the image left, as on any frontal radiograph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np
from PIL import Image

from .film import Film
from .frame import Frame, blur, ellipse, frame, ramp
from .lung_templates import lung_template, template_count

PatientSide = Literal["right", "left"]

# Fractions of a lung's height that each report zone covers (0 = apex, 1 = costophrenic angle).
ZONE_SPANS: dict[str, tuple[float, float]] = {
    "apical": (0.0, 0.2),
    "upper": (0.05, 0.38),
    "middle": (0.33, 0.66),
    "lower": (0.6, 0.92),
    "basilar": (0.75, 1.0),
    "perihilar": (0.3, 0.6),
}


@dataclass(frozen=True)
class BodyPlan:
    """The anatomy numbers of one patient and projection, in canonical units (fractions of
    the film width)."""

    template: int
    lung_box: tuple[float, float, float, float]  # u0, v0, u1, v1 of both lung fields
    rib_cage: tuple[float, float, float, float]  # the normal lung box: ribs and body hang on it
    cardiothoracic_ratio: float
    heart_right_share: float  # part of the cardiac width right of the midline (image left)
    heart_height: float  # cardiac height / cardiac width
    mediastinum_halfwidth: float
    aortic_knob: float  # radius
    spine_offset: float
    scoliosis: float  # signed lateral deviation of the mid-thoracic spine, + = image right
    dome_flattening: float  # 0 = normal domes, towards 1 = flat (hyperinflation)
    lung_lucency: float  # scales lung air; > 1 in hyperinflation
    body_margin: float  # chest wall soft tissue lateral to the lungs
    habitus: float  # soft-tissue thickness
    rib_spacing: float
    rib_arch: float
    clavicle_level: float  # medial clavicle height relative to the lung apices
    gastric_bubble: float  # radius; 0 = no bubble


def sample_plan(rng: np.random.Generator) -> BodyPlan:
    """A normal adult chest, varied per seed (lung outline, heart size, ribs, habitus)."""
    u0 = rng.uniform(0.1, 0.15)
    u1 = 1.0 - rng.uniform(0.1, 0.15)
    v0 = rng.uniform(0.06, 0.1)
    height = rng.uniform(0.62, 0.7)
    return BodyPlan(
        template=int(rng.integers(template_count())),
        lung_box=(u0, v0, u1, v0 + height),
        rib_cage=(u0, v0, u1, v0 + height),
        cardiothoracic_ratio=rng.uniform(0.39, 0.47),
        heart_right_share=rng.uniform(0.28, 0.36),
        heart_height=rng.uniform(0.68, 0.8),
        mediastinum_halfwidth=rng.uniform(0.05, 0.065),
        aortic_knob=rng.uniform(0.012, 0.022),
        spine_offset=rng.normal(0.0, 0.006),
        scoliosis=0.0,
        dome_flattening=0.0,
        lung_lucency=rng.uniform(0.92, 1.08),
        body_margin=rng.uniform(0.035, 0.07),
        habitus=rng.uniform(0.85, 1.15),
        rib_spacing=rng.uniform(0.93, 1.05),
        rib_arch=rng.uniform(0.8, 1.2),
        clavicle_level=rng.uniform(-0.01, 0.03),
        gastric_bubble=0.0 if rng.random() < 0.3 else rng.uniform(0.022, 0.04),
    )


@dataclass
class Anatomy:
    """The built anatomy on one film. Masks are (size, size); ``dome_v`` is (size,), the
    diaphragm's height per column; ``spine_u`` is (size, 1), the spine's centre per row."""

    frame: Frame
    plan: BodyPlan
    lungs: np.ndarray  # float32 soft aerated lung fields (heart and mediastinum removed)
    fields: np.ndarray  # float32 soft lung fields including the lung behind the heart
    right_lung: np.ndarray  # bool, patient's right (image left)
    left_lung: np.ndarray
    dome_v: np.ndarray
    spine_u: np.ndarray
    midline: float  # thorax centre; ribs hang from it so a curved spine moves only itself
    thorax: tuple[float, float]  # u of the lateral lung edges (inner ribs)
    heart: np.ndarray  # float32 soft cardiac silhouette
    mediastinum: np.ndarray  # float32 soft superior mediastinum incl. aortic knob
    hila: dict[str, tuple[float, float]]
    carina_v: float
    body_halfwidth: np.ndarray  # (size, 1) half-width of the body per row
    lung_rows: dict[str, tuple[float, float]] = field(default_factory=dict)  # apex, base v

    def lung(self, side: PatientSide) -> np.ndarray:
        return self.right_lung if side == "right" else self.left_lung

    @property
    def heart_mask(self) -> np.ndarray:
        return self.heart > 0.5

    @property
    def lung_mask(self) -> np.ndarray:
        return self.right_lung | self.left_lung

    @cached_property
    def lung_bounds(self) -> tuple[float, float, float, float]:
        """u0, v0, u1, v1 of the box around both lung fields (the lung behind the heart
        included), pixel edges in canonical units: the frame real annotations map into."""
        hard = self.fields > 0.5
        rows = np.flatnonzero(hard.any(1))
        cols = np.flatnonzero(hard.any(0))
        n = self.frame.size
        return (cols[0] / n, rows[0] / n, (cols[-1] + 1) / n, (rows[-1] + 1) / n)

    @cached_property
    def interior(self) -> np.ndarray:
        """Soft depth inside the lungs, ~1 well inside, ~0.5 at the edge: where a lesion can
        sit without touching the pleura."""
        return blur(self.lungs, max(2, self.frame.size // 28))

    @property
    def cardiothoracic_ratio(self) -> float:
        """Widest cardiac diameter over the widest inner thoracic diameter, as measured on a
        film (both in pixel columns)."""
        heart_cols = np.flatnonzero(self.heart_mask.any(0))
        if heart_cols.size == 0:
            return 0.0
        width = (heart_cols[-1] - heart_cols[0] + 1) / self.frame.size
        return float(width / (self.thorax[1] - self.thorax[0]))

    def zone_band(self, side: PatientSide, zone: str) -> tuple[float, float]:
        """The v range of a report zone on one lung."""
        top, bottom = self.lung_rows[side]
        lo, hi = ZONE_SPANS[zone]
        return top + lo * (bottom - top), top + hi * (bottom - top)

    def lateral_sign(self, side: PatientSide) -> float:
        """+1 where the side's lateral chest wall is towards the image right."""
        return -1.0 if side == "right" else 1.0

    def pick_point(
        self, rng: np.random.Generator, side: PatientSide, zone: str, depth: float = 0.8
    ) -> tuple[float, float]:
        """A random (u, v) inside one lung's zone, at least ``depth`` deep (see ``interior``)."""
        lo, hi = self.zone_band(side, zone)
        n = self.frame.size
        rows = slice(int(lo * n), max(int(lo * n) + 1, int(np.ceil(hi * n))))
        inside = self.lung(side)[rows] & (self.interior[rows] >= depth)
        if zone == "perihilar":
            hu, _ = self.hila[side]
            inside &= np.abs(self.frame.u - hu) < 0.12
        candidates = np.flatnonzero(inside)
        if candidates.size == 0:
            candidates = np.flatnonzero(self.lung(side)[rows])
        if candidates.size == 0:
            candidates = np.flatnonzero(self.lung_mask)
            row, col = divmod(int(rng.choice(candidates)), n)
            return (col + 0.5) / n, (row + 0.5) / n
        row, col = divmod(int(rng.choice(candidates)), n)
        return (col + 0.5) / n, (row + rows.start + 0.5) / n


def build_anatomy(plan: BodyPlan, size: int) -> Anatomy:
    """Turn a plan into lung, heart and mediastinum fields on a (size, size) film."""
    f = frame(size)
    template = lung_template(plan.template)
    u0, v0, u1, v1 = plan.lung_box
    fields = _place(template.fields, plan.lung_box, size)
    if plan.dome_flattening > 0:
        fields = _flatten_domes(fields, plan.dome_flattening)
    split_u = u0 + template.split * (u1 - u0)
    hard = fields > 0.5
    cols = np.flatnonzero(hard.any(0))
    # Plain floats: a numpy float64 scalar would promote every float32 field it touches.
    thorax = (float(cols[0] + 0.5) / size, float(cols[-1] + 0.5) / size)
    midline = 0.5 * (thorax[0] + thorax[1]) + plan.spine_offset
    dome_v = _dome_heights(hard)
    # A C-shaped curve peaking mid-thorax, tapering to the midline at both ends.
    along = np.clip((f.v - (v0 - 0.08)) / (v1 - v0 + 0.16), 0.0, 1.0)
    spine_u = (midline + plan.scoliosis * np.sin(np.pi * along)).astype(np.float32)

    hila = _hila(hard, split_u, plan, f)
    heart, mediastinum = _cardiomediastinal(plan, f, thorax, midline, dome_v)
    silhouette = np.maximum(heart, mediastinum)
    lungs = fields * (1.0 - silhouette)
    aerated = lungs > 0.5
    on_right = f.u < split_u
    right_lung, left_lung = aerated & on_right, aerated & ~on_right
    anatomy = Anatomy(
        frame=f,
        plan=plan,
        lungs=lungs,
        fields=fields,
        right_lung=right_lung,
        left_lung=left_lung,
        dome_v=dome_v,
        spine_u=spine_u,
        midline=midline,
        thorax=thorax,
        heart=heart,
        mediastinum=mediastinum,
        hila=hila,
        carina_v=min(hila["right"][1], hila["left"][1]) - 0.05,
        body_halfwidth=_body_halfwidth(plan, f, midline),
    )
    for side, mask in (("right", right_lung), ("left", left_lung)):
        rows = np.flatnonzero(mask.any(1))
        anatomy.lung_rows[side] = ((rows[0] + 0.5) / size, (rows[-1] + 0.5) / size)
    return anatomy


def paint_soft_tissue(film: Film, anatomy: Anatomy) -> None:
    """Body, lung air, heart, mediastinum, trachea and upper abdomen."""
    f, plan = anatomy.frame, anatomy.plan
    du = (f.u - anatomy.midline) / anatomy.body_halfwidth
    body = ramp(1.0 - np.abs(du), 0.04)
    # An elliptical cross-section: the ray through the chest wall is shorter than the centre.
    thickness = np.sqrt(np.clip(1.0 - du**2, 0.0, 1.0))
    film.tissue += plan.habitus * (0.32 + 0.48 * thickness) * body
    # Shoulders and neck muscles add tissue above and around the apices.
    apex_v = plan.rib_cage[1]
    film.tissue += 0.22 * ramp(apex_v + 0.06 - f.v, 0.12) * body

    dome = anatomy.dome_v[None, :]
    # Below the domes the liver and spleen replace lung; lateral to the lungs the chest wall
    # is soft tissue on both sides of the diaphragm, so no step is drawn there.
    medial = ramp(f.u - anatomy.thorax[0], 0.04) * ramp(anatomy.thorax[1] - f.u, 0.04)
    abdomen = ramp(f.v - dome, 0.006) * body * medial
    film.tissue += 0.36 * abdomen
    if plan.gastric_bubble > 0:
        left_cols = np.flatnonzero(anatomy.left_lung.any(0))
        bubble_u = (left_cols[0] + left_cols[-1]) / 2 / f.size + 0.02
        col = min(f.size - 1, int(bubble_u * f.size))
        r = plan.gastric_bubble
        bubble = ellipse(f.u, f.v, (bubble_u, anatomy.dome_v[col] + 0.9 * r), (1.4 * r, r), 0.01)
        film.tissue -= 0.25 * bubble * ramp(f.v - anatomy.dome_v[col] - 0.012, 0.006)

    depth = 0.6 + 0.4 * np.clip(anatomy.interior * 1.2, 0.0, 1.0)
    film.air += 0.42 * plan.lung_lucency * anatomy.lungs * depth
    film.tissue += 0.36 * anatomy.heart * (1.0 - abdomen)
    film.tissue += 0.26 * anatomy.mediastinum
    trachea = ramp(0.016 - np.abs(f.u - anatomy.spine_u), 0.01) * ramp(anatomy.carina_v - f.v, 0.02)
    film.tissue -= 0.25 * trachea


def _place(template: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """Resize a lung template into its box on a (size, size) film."""
    u0, v0, u1, v1 = box
    x0, y0 = round(u0 * size), round(v0 * size)
    w = max(2, round((u1 - u0) * size))
    h = max(2, round((v1 - v0) * size))
    resized = Image.fromarray(template).resize((w, h), Image.BILINEAR)
    fields = np.zeros((size, size), dtype=np.float32)
    patch = np.asarray(resized, dtype=np.float32)
    y1, x1 = min(size, y0 + h), min(size, x0 + w)
    fields[y0:y1, x0:x1] = patch[: y1 - y0, : x1 - x0]
    return fields


def _flatten_domes(fields: np.ndarray, amount: float) -> np.ndarray:
    """Push each lung base towards its lowest point: the flat, low diaphragm of
    hyperinflation."""
    size = fields.shape[0]
    hard = fields > 0.5
    has = hard.any(0)
    bottom = (size - 1 - np.argmax(hard[::-1], axis=0)).astype(np.float32)
    rows = np.flatnonzero(hard.any(1))
    # Only columns whose lung reaches the lower chest have a dome to flatten (not the apices
    # curling over the heart).
    has &= bottom >= rows[0] + 0.7 * (rows[-1] - rows[0])
    cols = np.flatnonzero(has)
    centre = (cols[0] + cols[-1]) / 2
    target = bottom.copy()
    for side_cols in (cols[cols < centre], cols[cols >= centre]):
        if side_cols.size:
            lowest = bottom[side_cols].max()
            target[side_cols] += amount * (lowest - bottom[side_cols])
    rows = np.arange(size, dtype=np.float32)[:, None]
    extension = ramp(target[None, :] - rows + 0.5, 1.5) * (rows >= bottom[None, :] - 1) * has
    return np.maximum(fields, extension)


def _dome_heights(hard: np.ndarray) -> np.ndarray:
    """v of the diaphragm under each column: the lung bases, bridged under the heart.

    A column counts only where the lung reaches the lower chest; medial columns that hold
    just an apex (above the mediastinum) are bridged like the heart's.
    """
    size = hard.shape[0]
    bottom = size - 1 - np.argmax(hard[::-1], axis=0)
    rows = np.flatnonzero(hard.any(1))
    low_enough = rows[0] + 0.7 * (rows[-1] - rows[0])
    cols = np.flatnonzero(hard.any(0) & (bottom >= low_enough))
    dome = np.interp(np.arange(size), cols, bottom[cols]) + 1.0
    # A lung outline is ragged at pixel scale; a diaphragm is not.
    kernel = max(1, size // 40)
    padded = np.pad(dome, kernel, mode="edge")
    dome = np.convolve(padded, np.ones(2 * kernel + 1) / (2 * kernel + 1), mode="valid")
    return ((dome + 0.5) / size).astype(np.float32)


def _hila(hard: np.ndarray, split_u: float, plan: BodyPlan, f: Frame) -> dict:
    """Hilar points just inside each lung's medial edge; the left hilum sits higher."""
    _, v0, _, v1 = plan.lung_box
    split_col = int(split_u * f.size)
    hila = {}
    for side, level in (("right", 0.44), ("left", 0.4)):
        v = v0 + level * (v1 - v0)
        row = hard[min(f.size - 1, int(v * f.size))]
        if side == "right":
            cols = np.flatnonzero(row[:split_col])
            u = (cols[-1] + 0.5) / f.size - 0.02 if cols.size else split_u - 0.1
        else:
            cols = np.flatnonzero(row[split_col:]) + split_col
            u = (cols[0] + 0.5) / f.size + 0.02 if cols.size else split_u + 0.1
        hila[side] = (float(u), float(v))
    return hila


def _cardiomediastinal(
    plan: BodyPlan, f: Frame, thorax: tuple[float, float], midline: float, dome_v: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Soft cardiac silhouette and superior mediastinum, each (size, size).

    Built row by row from its two borders, as a radiologist reads it: on the image left the
    superior vena cava then the right atrium; on the image right the aortic knob, then the
    left ventricle bulging down to the apex. The heart's widest span is the plan's
    cardiothoracic ratio, a third of it right of the midline.
    """
    width = plan.cardiothoracic_ratio * (thorax[1] - thorax[0])
    right_reach = plan.heart_right_share * width
    left_reach = width - right_reach
    cols = slice(int((midline - right_reach) * f.size), int((midline + left_reach) * f.size) + 1)
    base_v = float(dome_v[cols].max())
    height = plan.heart_height * width
    top_v = base_v - height
    tau = np.clip((f.v - top_v) / height, 0.0, 1.0)
    hw = plan.mediastinum_halfwidth
    # The superior mediastinum is narrow at the thoracic inlet and widens to the heart.
    widening = np.clip(f.v / max(top_v, 0.1), 0.0, 1.0)
    pedicle_right = hw * (0.75 + 0.25 * widening)
    knob_v = top_v - 0.025
    knob = plan.aortic_knob * np.sqrt(np.clip(1.0 - ((f.v - knob_v) / 0.028) ** 2, 0.0, None))
    pedicle_left = hw * (0.85 + 0.2 * widening) + knob
    # From the pedicle the borders swell to their widest (right atrium a little higher than
    # the left ventricle), then turn in towards the cardiophrenic angles.
    right_top, left_top = float(pedicle_right[-1, 0]), float(pedicle_left[-1, 0])
    right_border = _swell(tau, right_top, right_reach, peak=0.6, tuck=0.12)
    left_border = _swell(tau, left_top, left_reach, peak=0.62, tuck=0.3)
    below_top = f.v >= top_v
    right = np.where(below_top, right_border, pedicle_right)
    left = np.where(below_top, left_border, pedicle_left)
    offset = f.u - midline
    edge = 0.006
    silhouette = ramp(offset + right, edge) * ramp(left - offset, edge)
    # The heart rests on the diaphragm: its base follows the domes but may press a little
    # below them, so a big heart overhangs the medial lung bases instead of being cut into a
    # tent by their curve.
    floor = np.minimum(base_v, dome_v + 0.05)[None, :]
    silhouette *= ramp(floor + 0.005 - f.v, 0.01)
    in_heart = ramp(f.v - top_v, 0.01)
    return silhouette * in_heart, silhouette * (1.0 - in_heart)


def _swell(tau: np.ndarray, start: float, reach: float, peak: float, tuck: float) -> np.ndarray:
    """A cardiac border's distance from the midline down the heart (tau 0 top, 1 base):
    from ``start`` out to ``reach`` at ``peak`` along a half cosine (leaving the pedicle
    gently, so no shelf), then in by ``tuck``."""
    eased = 0.5 - 0.5 * np.cos(np.pi * np.clip(tau / peak, 0.0, 1.0))
    rising = start + (reach - start) * eased
    falling = reach * (1.0 - tuck * np.clip((tau - peak) / (1.0 - peak), 0.0, 1.0) ** 2)
    return np.where(tau <= peak, rising, falling)


def _body_halfwidth(plan: BodyPlan, f: Frame, midline: float) -> np.ndarray:
    """Half-width of the body per row: the chest wall below the shoulders, narrowing to the
    neck above them."""
    u0, v0, u1, v1 = plan.rib_cage
    chest = max(midline - u0, u1 - midline) + 0.03 + plan.body_margin
    # The chest widens towards the lower ribs and narrows over the shoulders to the neck.
    flare = 0.94 + 0.1 * np.clip((f.v - v0) / (v1 - v0), 0.0, 1.2)
    # The trapezius slopes from the neck (a quarter of the film wide) out to the shoulders
    # just above the apices; the film's top edge usually cuts through that slope.
    neck = 0.12
    shoulder_v = v0 + 0.02
    slope = np.clip((f.v - (shoulder_v - 0.3)) / 0.3, 0.0, 1.0) ** 0.6
    shoulders = neck + (chest - neck) * slope
    return np.where(f.v < shoulder_v, shoulders, chest * flare).astype(np.float32)
