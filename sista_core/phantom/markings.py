"""Lung markings: the pulmonary vessels branching out of each hilum, plus a faint
interstitial texture. Without them a lung is a flat grey field and a pneumothorax (air
with no markings) has nothing to be told apart from.

Drawing a few hundred branches per film is the slowest thing a phantom would do, so each
process draws a fixed bank of trees per film size once (deterministically) and a film picks
one per hilum by its seed; the lung outline then clips each tree differently.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .anatomy import Anatomy
from .film import Film
from .frame import smooth_noise

TREES_PER_SIDE = 48
_BRANCH_LEVELS = 5
# Root directions from the hilum, degrees from lateral; negative is towards the apex.
_ROOT_ANGLES = (-80.0, -55.0, -30.0, -5.0, 20.0, 45.0, 70.0)


@lru_cache(maxsize=4)
def tree_bank(size: int) -> np.ndarray:
    """(2, TREES_PER_SIDE, size, size) uint8 vessel trees, [0] right lung, [1] left; the hilum
    sits at pixel (size // 2, size // 2)."""
    bank = np.zeros((2, TREES_PER_SIDE, size, size), dtype=np.uint8)
    for side in range(2):
        for index in range(TREES_PER_SIDE):
            rng = np.random.default_rng([0x7E55E1, side, index])
            bank[side, index] = _draw_tree(size, rng, lateral=np.pi if side == 0 else 0.0)
    bank.flags.writeable = False
    return bank


def _draw_tree(size: int, rng: np.random.Generator, lateral: float) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    turn = -1.0 if lateral else 1.0
    angles = np.deg2rad(np.asarray(_ROOT_ANGLES) + rng.normal(0, 6, len(_ROOT_ANGLES)))
    # Lower-lobe vessels are larger in an upright patient (gravity).
    downward = np.sin(angles)
    heading = lateral + turn * angles
    starts = np.full((len(angles), 2), 0.5) + rng.normal(0, 0.008, (len(angles), 2))
    lengths = rng.uniform(0.045, 0.065, len(angles)) * (1.0 + 0.25 * np.abs(downward))
    widths = 0.009 * (1.0 + 0.35 * downward)
    for _ in range(_BRANCH_LEVELS):
        ends = starts + lengths[:, None] * np.stack([np.cos(heading), np.sin(heading)], 1)
        for (x0, y0), (x1, y1), w in zip(
            (starts * size).tolist(), (ends * size).tolist(), (widths * size).tolist(), strict=True
        ):
            # Sub-pixel vessels are drawn one pixel wide and fainter: cheap anti-aliasing.
            draw.line((x0, y0, x1, y1), fill=int(255 * min(1.0, w)), width=max(1, round(w)))
        n = len(heading)
        spread = rng.uniform(0.2, 0.55, n)
        heading = np.concatenate([heading - spread, heading + spread * 0.8])
        heading += rng.normal(0, 0.18, 2 * n)
        starts = np.concatenate([ends, ends])
        lengths = np.concatenate([lengths, lengths]) * rng.uniform(0.65, 0.9, 2 * n)
        widths = np.concatenate([widths, widths]) * 0.7
    canvas = canvas.filter(ImageFilter.GaussianBlur(max(0.4, 0.6 * size / 224)))
    return np.asarray(canvas)


def vessel_trees(anatomy: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Both hila's vessel trees on the film, (size, size) float32 in [0, 1]."""
    size = anatomy.frame.size
    bank = tree_bank(size)
    vessels = np.zeros((size, size), dtype=np.float32)
    centre = size // 2
    for side_index, side in enumerate(("right", "left")):
        tree = bank[side_index, int(rng.integers(TREES_PER_SIDE))]
        hu, hv = anatomy.hila[side]
        dx, dy = round(hu * size) - centre, round(hv * size) - centre
        rows = slice(max(0, dy), min(size, size + dy))
        cols = slice(max(0, dx), min(size, size + dx))
        src = tree[rows.start - dy : rows.stop - dy, cols.start - dx : cols.stop - dx]
        np.maximum(vessels[rows, cols], src, out=vessels[rows, cols])
    return vessels * np.float32(1.0 / 255.0)


def paint_markings(film: Film, anatomy: Anatomy, rng: np.random.Generator) -> None:
    """Vessels, hilar shadows and interstitial texture, seen only inside the lungs."""
    vessels = vessel_trees(anatomy, rng)
    f = anatomy.frame
    hilar = np.zeros_like(vessels)
    for hu, hv in anatomy.hila.values():
        window = f.around((hu, hv), 0.1)
        du, dv = f.u[:, window[1]] - hu, f.v[window[0]] - hv
        hilar[window] += np.exp((du * du + dv * dv) * np.float32(-1.0 / 0.0015))
    texture = smooth_noise(rng, (f.size, f.size), 56)
    film.markings += anatomy.lungs * (0.16 * vessels + 0.14 * hilar + 0.07 * texture)
