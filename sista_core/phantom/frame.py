"""The canonical film the anatomy is painted on, and the soft shape primitives every painter
shares.

The film is an upright square grid: ``u`` runs to the image right and ``v`` downward, both
in [0, 1] whatever the pixel size, so every length in the renderer is a fraction of the
image width and the same seed looks the same at 128, 224 or 512 pixels. The acquisition
(rotation, magnification, shift) is applied to the finished film and its masks at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Frame:
    """Pixel-centre coordinates of a (size, size) film: ``u`` is (1, size), ``v`` is (size, 1),
    so shape formulas broadcast to (size, size) without building full grids."""

    size: int
    u: np.ndarray
    v: np.ndarray

    def around(self, centre: tuple[float, float], reach: float) -> tuple[slice, slice]:
        """Row and column slices covering the square of half-side ``reach`` (canonical units)
        around ``centre``, clipped to the film; painters of small shapes evaluate only there."""
        n = self.size
        u, v = centre
        rows = slice(max(0, int((v - reach) * n) - 1), min(n, int(np.ceil((v + reach) * n)) + 1))
        cols = slice(max(0, int((u - reach) * n) - 1), min(n, int(np.ceil((u + reach) * n)) + 1))
        return rows, cols


@lru_cache(maxsize=8)
def frame(size: int) -> Frame:
    """The cached frame of one film size."""
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size
    u = centres[None, :]
    v = centres[:, None]
    u.flags.writeable = False
    v.flags.writeable = False
    return Frame(size=size, u=u, v=v)


def ramp(signed: np.ndarray | float, width: float) -> np.ndarray:
    """Soft inside-indicator: 1 where ``signed`` > width/2, 0 below -width/2, linear between."""
    out = np.multiply(signed, np.float32(1.0 / width), dtype=np.float32)
    out += np.float32(0.5)
    return np.clip(out, 0.0, 1.0, out=out)


def elliptic_radius(
    u: np.ndarray,
    v: np.ndarray,
    centre: tuple[float, float],
    radii: tuple[float, float],
    tilt: float = 0.0,
) -> np.ndarray:
    """Normalised distance from ``centre``: 1 on the ellipse with ``radii``; ``tilt`` in
    radians turns the first radius from the u axis towards +v."""
    du = u - np.float32(centre[0])
    dv = v - np.float32(centre[1])
    if tilt:
        c, s = np.float32(np.cos(tilt)), np.float32(np.sin(tilt))
        du, dv = du * c + dv * s, dv * c - du * s
    return np.sqrt((du / np.float32(radii[0])) ** 2 + (dv / np.float32(radii[1])) ** 2)


def ellipse(
    u: np.ndarray,
    v: np.ndarray,
    centre: tuple[float, float],
    radii: tuple[float, float],
    edge: float,
    tilt: float = 0.0,
) -> np.ndarray:
    """Soft filled ellipse (1 inside) with an edge ``edge`` wide."""
    r = elliptic_radius(u, v, centre, radii, tilt)
    return ramp((1.0 - r) * min(radii), edge)


def sphere(u: np.ndarray, v: np.ndarray, centre: tuple[float, float], radius: float) -> np.ndarray:
    """Projected thickness of a ball, 1 at its centre: what a round nodule adds to the film."""
    r2 = ((u - np.float32(centre[0])) ** 2 + (v - np.float32(centre[1])) ** 2) / np.float32(
        radius**2
    )
    return np.sqrt(np.clip(1.0 - r2, 0.0, None))


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Band-limited noise in [0, 1] of ``shape``: ``cells`` random values across the longer
    side, bicubically interpolated (cheap organic texture for airspace disease)."""
    h, w = shape
    ch = max(2, round(cells * h / max(h, w)))
    cw = max(2, round(cells * w / max(h, w)))
    coarse = rng.random((ch, cw), dtype=np.float32)
    fine = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
    return np.asarray(fine, dtype=np.float32)


def blur(field: np.ndarray, factor: int) -> np.ndarray:
    """A strong, cheap low-pass: box-downsample by ``factor`` then bilinear-upsample."""
    h, w = field.shape
    small = Image.fromarray(np.ascontiguousarray(field, dtype=np.float32)).resize(
        (max(1, w // factor), max(1, h // factor)), Image.BOX
    )
    return np.asarray(small.resize((w, h), Image.BILINEAR), dtype=np.float32)
