"""Render a phantom frontal chest radiograph from a list of findings, with exact ground-truth
masks and boxes.

A finding can also be drawn where a real annotation says (`Placement`: RSNA boxes, a SIIM
mask), mapped from the source film's lung box into the phantom's; see `placement`.

Deterministic in (findings, seed, placements): the anatomy, the acquisition, the lung
markings, the noise and each finding draw from separate random streams keyed by the seed
(and, for a finding, by its observation and how many of that observation came before it), so
adding or removing one finding changes the film only where that finding is.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from ..findings import Finding
from . import devices, habitus, nodules, parenchyma, pleura, skeleton
from .acquisition import Acquisition, develop, position, project, sample_acquisition
from .anatomy import Anatomy, BodyPlan, build_anatomy, paint_soft_tissue, sample_plan
from .attributes import resolve, strength
from .film import Film
from .markings import paint_markings
from .placement import Placement, landed_side

Painter = Callable[[Film, Anatomy, Finding, np.random.Generator, float], list[np.ndarray]]
PlanEdit = Callable[[BodyPlan, Finding, float], BodyPlan]
PlacedPainter = Callable[
    [Film, Anatomy, Finding, np.random.Generator, float, list[np.ndarray]], list[np.ndarray]
]

# Plan edits run in this order (hyperinflation narrows the heart before cardiomegaly sets it).
PLAN_EDITS: dict[str, PlanEdit] = {
    "Emphysema": habitus.hyperinflate,
    "Cardiomegaly": habitus.enlarge_heart,
    "Enlarged Cardiomediastinum": habitus.widen_mediastinum,
    "Scoliosis": habitus.curve_spine,
}
# Painters run in this order: what replaces air first, then what sits on top of it.
PAINTERS: dict[str, Painter] = {
    "Emphysema": habitus.paint_emphysema,
    "Cardiomegaly": habitus.paint_cardiomegaly,
    "Enlarged Cardiomediastinum": habitus.paint_wide_mediastinum,
    "Scoliosis": habitus.paint_scoliosis,
    "Edema": parenchyma.paint_edema,
    "Lung Opacity": parenchyma.paint_airspace,
    "Consolidation": parenchyma.paint_airspace,
    "Pneumonia": parenchyma.paint_airspace,
    "Atelectasis": parenchyma.paint_atelectasis,
    "Pleural Effusion": pleura.paint_effusion,
    "Pleural Other": pleura.paint_pleural_thickening,
    "Pneumothorax": pleura.paint_pneumothorax,
    "Nodule": nodules.paint_nodule,
    "Mass": nodules.paint_mass,
    "Lung Lesion": nodules.paint_lung_lesion,
    "Granuloma": nodules.paint_granuloma,
    "Fracture": skeleton.paint_fracture,
    "Support Devices": devices.paint_devices,
}
# Observations that can be drawn at a `Placement`; each painter takes the placed regions.
PLACED_PAINTERS: dict[str, PlacedPainter] = {
    "Lung Opacity": parenchyma.paint_placed_airspace,
    "Consolidation": parenchyma.paint_placed_airspace,
    "Pneumonia": parenchyma.paint_placed_airspace,
    "Pneumothorax": pleura.paint_placed_pneumothorax,
}


@dataclass(frozen=True)
class Phantom:
    """A rendered film and its ground truth, all in image pixels.

    ``image`` is uint8 (size, size), 0 = black (air). ``masks`` maps each drawn observation to
    a bool (size, size) mask; ``boxes`` maps it to float32 (n, 4) boxes x0, y0, x1, y1 (one
    per instance: per side, per nodule, per device). ``findings`` are the findings actually
    drawn, with the side, severity and zone used. ``anatomy`` holds bool masks of the
    normal structures ("lungs", "heart", "thorax"). ``placed`` maps each observation drawn
    at a `Placement` to the region the placement asked for, mapped onto this film before
    clipping to the lungs (bool (size, size)); ``masks`` says what was actually drawn.
    """

    image: np.ndarray
    masks: dict[str, np.ndarray]
    boxes: dict[str, np.ndarray]
    findings: tuple[Finding, ...]
    view: str
    cardiothoracic_ratio: float
    anatomy: Mapping[str, np.ndarray] = field(default_factory=dict)
    placed: Mapping[str, np.ndarray] = field(default_factory=dict)


class PositionedMasks(Mapping[str, np.ndarray]):
    """Canonical-film masks moved into image pixels on first access (most callers of
    `render` never look at the normal anatomy, and positioning costs a resampling each)."""

    def __init__(self, canonical: dict[str, np.ndarray], acquisition: Acquisition) -> None:
        self._canonical = canonical
        self._acquisition = acquisition
        self._moved: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._moved:
            self._moved[name] = position(self._canonical[name], self._acquisition)
        return self._moved[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._canonical)

    def __len__(self) -> int:
        return len(self._canonical)


def _stream(seed: int, *key: str | int) -> np.random.Generator:
    """An independent random stream per (seed, purpose); seeds count modulo 2**32."""
    words = [int(seed) & 0xFFFFFFFF]
    words += [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in key]
    return np.random.default_rng(words)


def render(
    findings: Sequence[Finding],
    seed: int,
    size: int = 224,
    placements: Mapping[str, Placement] | None = None,
) -> Phantom:
    """Render ``findings`` onto a phantom frontal chest film of ``size`` pixels (96-512 work;
    the patient's left is on the image right).

    Only positive findings are drawn, uncertain ones half the time and fainter (see
    `attributes`); "No Finding" and negative findings draw nothing. Attributes a finding
    leaves as None are picked from the seed and reported in ``Phantom.findings``.

    ``placements`` maps an observation (one of ``PLACED_PAINTERS``) to where its first
    finding is drawn instead of a seeded spot: the placed region clipped to the lungs
    (opacity) or to the pleural space (pneumothorax). A placement draws nothing without a
    finding of its observation. A placed finding is reported with the side it landed on
    and no severity or zone (the placement sets its extent).
    """
    unplaceable = set(placements or {}) - set(PLACED_PAINTERS)
    if unplaceable:
        raise ValueError(f"cannot place {sorted(unplaceable)}; placeable: {list(PLACED_PAINTERS)}")
    pending = dict(placements or {})
    acquisition = sample_acquisition(_stream(seed, "acquisition"))
    plan = sample_plan(_stream(seed, "anatomy"))

    drawn: list[tuple[Finding, float, np.random.Generator]] = []
    seen: dict[str, int] = {}
    for finding in findings:
        occurrence = seen.get(finding.observation, 0)
        seen[finding.observation] = occurrence + 1
        if finding.observation not in PAINTERS:
            continue
        rng = _stream(seed, "finding", finding.observation, occurrence)
        resolved = resolve(finding, rng)
        weight = strength(finding, rng)
        if weight > 0:
            drawn.append((resolved, weight, rng))
    order = list(PAINTERS)
    drawn.sort(key=lambda item: order.index(item[0].observation))

    for observation, edit in PLAN_EDITS.items():
        for finding, weight, _ in drawn:
            if finding.observation == observation:
                plan = edit(plan, finding, weight)
    plan = project(plan, acquisition)
    anatomy = build_anatomy(plan, size)

    film = Film.blank(size)
    paint_soft_tissue(film, anatomy)
    skeleton.paint_skeleton(film, anatomy)
    paint_markings(film, anatomy, _stream(seed, "markings"))
    instances: dict[str, list[np.ndarray]] = {}
    placed: dict[str, np.ndarray] = {}
    reported: list[Finding] = []
    for finding, weight, rng in drawn:
        placement = pending.pop(finding.observation, None)
        if placement is None:
            painted = PAINTERS[finding.observation](film, anatomy, finding, rng, weight)
        else:
            regions = placement.regions(anatomy)
            placed[finding.observation] = np.logical_or.reduce(regions)
            painted = PLACED_PAINTERS[finding.observation](
                film, anatomy, finding, rng, weight, regions
            )
            side = landed_side(anatomy, painted)
            finding = replace(finding, side=side, severity=None, zone=None)
        instances.setdefault(finding.observation, []).extend(painted)
        reported.append(finding)

    image = develop(position(film.attenuation(), acquisition), acquisition, _stream(seed, "noise"))
    masks, boxes = {}, {}
    for observation, parts in instances.items():
        moved = [m for m in (position(p, acquisition) for p in parts) if m.any()]
        if not moved:
            continue
        masks[observation] = np.logical_or.reduce(moved)
        boxes[observation] = np.stack([_box(m) for m in moved]).astype(np.float32)
    thorax = (anatomy.frame.v < anatomy.dome_v[None, :] + 0.02) & (
        np.abs(anatomy.frame.u - anatomy.midline) < anatomy.body_halfwidth
    )
    return Phantom(
        image=image,
        masks=masks,
        boxes=boxes,
        findings=tuple(f for f in reported if f.observation in masks),
        view=acquisition.view,
        cardiothoracic_ratio=anatomy.cardiothoracic_ratio,
        anatomy=PositionedMasks(
            {"lungs": anatomy.lung_mask, "heart": anatomy.heart_mask, "thorax": thorax},
            acquisition,
        ),
        placed=PositionedMasks(placed, acquisition),
    )


def _box(mask: np.ndarray) -> np.ndarray:
    """x0, y0, x1, y1 in pixels enclosing every set pixel (x1, y1 exclusive edges)."""
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)
