"""Drawing a finding where a real annotation says: boxes (RSNA opacities) or a mask (SIIM
pneumothorax) annotated on a source radiograph, mapped into this phantom's thorax.

The mapping. A real annotation lies on a film whose lungs are elsewhere (another patient,
another positioning), and the real tables say nothing of where those lungs were. Both frames
are therefore reduced to the box around both lung fields: a point at fraction (s, t) of
the source film's lung box lands at fraction (s, t) of the phantom's lung box on the
canonical film (`Anatomy.lung_bounds`, the lung behind the heart included), a per-axis scale
and shift. The film then moves under the acquisition (rotation, zoom, shift) with the
drawing, so what comes back in `Phantom.masks` is in image pixels like everything else.

The source lung box is a typical one, ``RADIOGRAPH_LUNG_BOX``, fitted to the real tables
(see the constant). One box serves RSNA and SIIM: both are NIH-style PA/AP films resampled
to 1024 x 1024.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..findings import Side
from .anatomy import Anatomy

UnitBox = tuple[float, float, float, float]

RADIOGRAPH_LUNG_BOX: UnitBox = (0.08, 0.04, 0.92, 0.92)
"""x0, y0, x1, y1 of both lung fields on a typical 1024 x 1024 frontal film, as fractions of
its width and height. x: the lateral margin that puts the most real annotation inside the
phantoms' lungs (over 300 RSNA box sets and 200 SIIM masks on 12 phantom chests, margins
0.02-0.14 tried: 0.08 is best, 80 % of RSNA box area and 79 % of SIIM mask area land in a
lung field); y0: the apices, where SIIM's apical pneumothoraces begin (5th percentile of
mask tops 0.05); y1: below the 95th percentile of RSNA box bottoms (0.88), as lower-lobe
opacities reach behind the domes. With it 1.5 % of SIIM masks miss the lungs entirely."""


@dataclass(frozen=True, eq=False)
class Placement:
    """Where one finding is to be drawn, as annotated on a source radiograph.

    Give exactly one of ``boxes``, float (n >= 1, 4) x0, y0, x1, y1 as fractions of the source
    image's width and height (one instance per box), or ``mask``, bool (H, W) covering the
    whole source image at any resolution. ``source_lungs`` is the source film's lung box in
    the same fractions (see the module docstring for the mapping).
    """

    boxes: np.ndarray | None = None
    mask: np.ndarray | None = None
    source_lungs: UnitBox = field(default=RADIOGRAPH_LUNG_BOX)

    def __post_init__(self) -> None:
        if (self.boxes is None) == (self.mask is None):
            raise ValueError("a Placement takes boxes or a mask, exactly one of them")
        if self.boxes is not None:
            boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
            if not len(boxes):
                raise ValueError("a Placement needs at least one box")
            if (boxes[:, 2:] <= boxes[:, :2]).any():
                raise ValueError(f"boxes need x1 > x0 and y1 > y0, got {boxes.tolist()}")
            object.__setattr__(self, "boxes", boxes)
        else:
            mask = np.asarray(self.mask, dtype=bool)
            if mask.ndim != 2:
                raise ValueError(f"a placement mask is 2-D, got shape {mask.shape}")
            object.__setattr__(self, "mask", mask)

    @classmethod
    def from_pixel_boxes(cls, boxes: np.ndarray, width: int, height: int) -> Placement:
        """Boxes x0, y0, x1, y1 in pixels of a ``width`` x ``height`` source image (RSNA's
        are in pixels of 1024 x 1024 films)."""
        scale = np.array([width, height, width, height], dtype=np.float64)
        return cls(boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / scale)

    def film_boxes(self, anatomy: Anatomy) -> np.ndarray:
        """The boxes mapped onto the canonical film, (n, 4) u0, v0, u1, v1."""
        if self.boxes is None:
            raise ValueError("this placement is a mask; it has no boxes")
        gain, offset = _source_to_film(self.source_lungs, anatomy.lung_bounds)
        return self.boxes * np.tile(gain, 2) + np.tile(offset, 2)

    def regions(self, anatomy: Anatomy) -> list[np.ndarray]:
        """The placement on the canonical film, one bool (size, size) region per instance
        (per box, or the whole mask), not yet clipped to the lungs."""
        f = anatomy.frame
        if self.boxes is not None:
            return [
                (f.u >= u0) & (f.u < u1) & (f.v >= v0) & (f.v < v1)
                for u0, v0, u1, v1 in self.film_boxes(anatomy).tolist()
            ]
        # Sample the source mask at each film pixel's source position (nearest).
        gain, offset = _source_to_film(self.source_lungs, anatomy.lung_bounds)
        height, width = self.mask.shape
        cols = np.floor((f.u[0] - offset[0]) / gain[0] * width).astype(np.int64)
        rows = np.floor((f.v[:, 0] - offset[1]) / gain[1] * height).astype(np.int64)
        inside_cols, inside_rows = (cols >= 0) & (cols < width), (rows >= 0) & (rows < height)
        sampled = self.mask[np.clip(rows, 0, height - 1)[:, None], np.clip(cols, 0, width - 1)]
        return [sampled & inside_rows[:, None] & inside_cols[None, :]]


def _source_to_film(source: UnitBox, film: UnitBox) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis gain and offset (u, v) taking source fractions to canonical film units so
    that the source lung box lands on the film's."""
    sx0, sy0, sx1, sy1 = source
    fu0, fv0, fu1, fv1 = film
    gain = np.array([(fu1 - fu0) / (sx1 - sx0), (fv1 - fv0) / (sy1 - sy0)])
    return gain, np.array([fu0, fv0]) - gain * np.array([sx0, sy0])


def landed_side(anatomy: Anatomy, masks: list[np.ndarray]) -> Side | None:
    """The patient side(s) whose lung the drawn instances overlap (None if neither)."""
    right = any((mask & anatomy.right_lung).any() for mask in masks)
    left = any((mask & anatomy.left_lung).any() for mask in masks)
    if right and left:
        return "bilateral"
    return "right" if right else "left" if left else None
