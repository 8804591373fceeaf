"""Real lung-field shapes: the v7labs lung masks shipped by torchxrayvision, cropped to the
two lungs and normalised, decoded lazily and cached once per process.

The zip holds ~500 masks drawn on real radiographs (some on figure crops, some empty); a mask
is used only if it shows two separate lungs of plausible size, so a seed maps to a real
outline rather than to a drawn ellipse.
"""

from __future__ import annotations

import io
import threading
import zipfile
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..assets import LUNG_MASKS, xrv_data_file

TEMPLATE_SIZE = 192
_DECODE_SIZE = 160  # long side the masks are checked at; enough to find the two lungs


@dataclass(frozen=True)
class LungTemplate:
    """Both lung fields cropped to their joint bounding box and resized to
    (TEMPLATE_SIZE, TEMPLATE_SIZE), float32 in [0, 1] with soft edges. The image-left lung
    (the patient's right) lies left of column ``split * TEMPLATE_SIZE``."""

    name: str
    fields: np.ndarray
    split: float


@lru_cache(maxsize=1)
def _mask_names() -> tuple[str, ...]:
    with zipfile.ZipFile(xrv_data_file(LUNG_MASKS)) as archive:
        return tuple(sorted(n for n in archive.namelist() if not n.endswith("/")))


_cache: dict[str, LungTemplate | None] = {}
_lock = threading.Lock()


def lung_template(choice: int) -> LungTemplate:
    """The usable template at or after position ``choice`` (modulo the number of masks) in the
    sorted archive; deterministic for a given torchxrayvision data file."""
    names = _mask_names()
    for step in range(len(names)):
        name = names[(choice + step) % len(names)]
        with _lock:
            if name not in _cache:
                _cache[name] = _decode(name)
            template = _cache[name]
        if template is not None:
            return template
    raise RuntimeError(f"no usable lung mask in {LUNG_MASKS}")


def template_count() -> int:
    """How many masks the archive holds (usable or not): the range a seed picks from."""
    return len(_mask_names())


def _decode(name: str) -> LungTemplate | None:
    # A fresh handle per read: a ZipFile shared across forked workers shares its file offset.
    with zipfile.ZipFile(xrv_data_file(LUNG_MASKS)) as archive:
        image = Image.open(io.BytesIO(archive.read(name)))
        image.draft("L", (_DECODE_SIZE * 2, _DECODE_SIZE * 2))
        image = image.convert("L")
    scale = _DECODE_SIZE / max(image.size)
    small = image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR
    )
    # An opening removes stray specks that would stretch the crop.
    opened = small.filter(ImageFilter.MinFilter(3)).filter(ImageFilter.MaxFilter(3))
    return _normalise(name, np.asarray(opened) > 63)


def _normalise(name: str, mask: np.ndarray) -> LungTemplate | None:
    """Crop to the two lungs and check they look like a frontal pair; None when they do not."""
    if not 0.05 < mask.mean() < 0.8:
        return None
    rows = np.flatnonzero(mask.sum(1) > 1)
    cols = np.flatnonzero(mask.sum(0) > 1)
    if rows.size < 10 or cols.size < 10:
        return None
    crop = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = crop.shape
    if not 0.6 < height / width < 1.6:
        return None
    # The mediastinum is the run of (nearly) empty columns in the middle of the crop.
    profile = crop.sum(0)
    middle = slice(width // 4, 3 * width // 4)
    empty = profile[middle] <= 0.02 * profile.max()
    if not empty.any():
        return None
    gap = np.flatnonzero(empty) + width // 4
    split = (gap[0] + gap[-1] + 1) / 2 / width
    cut = int(split * width)
    right_lung, left_lung = _largest_part(crop[:, :cut]), _largest_part(crop[:, cut:])
    crop = np.concatenate([right_lung, left_lung], axis=1)
    areas = np.array([right_lung.sum(), left_lung.sum()], dtype=np.float64)
    if areas.min() < 0.55 * areas.max():
        return None
    for lung in (right_lung, left_lung):
        lung_rows = np.flatnonzero(lung.any(1))
        if lung_rows.size < 0.75 * height or lung.any(0).sum() < 0.25 * width:
            return None
    rows = np.flatnonzero(crop.any(1))
    cols = np.flatnonzero(crop.any(0))
    split = (split * width - cols[0]) / (cols[-1] + 1 - cols[0])
    crop = crop[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    resized = Image.fromarray(crop.astype(np.uint8) * 255).resize(
        (TEMPLATE_SIZE, TEMPLATE_SIZE), Image.BILINEAR
    )
    smooth = resized.filter(ImageFilter.GaussianBlur(TEMPLATE_SIZE / 160))
    fields = np.asarray(smooth, dtype=np.float32) / 255.0
    fields.flags.writeable = False
    return LungTemplate(name=name, fields=fields, split=float(split))


def _largest_part(lung: np.ndarray) -> np.ndarray:
    """The connected piece through the lung's widest row (drops specks and detached bits).
    Found at half resolution: PIL's flood fill is pure Python."""
    h, w = lung.shape
    coarse = np.asarray(Image.fromarray(lung.astype(np.uint8) * 255).reduce(2)) > 127
    row = int(np.argmax(coarse.sum(1)))
    cols = np.flatnonzero(coarse[row])
    if cols.size == 0:
        return lung
    # fromarray shares the array's memory read-only; the fill needs its own copy.
    canvas = Image.fromarray(coarse.astype(np.uint8) * 255).copy()
    ImageDraw.floodfill(canvas, (int(cols[cols.size // 2]), row), 128)
    part = np.asarray(canvas.resize((w, h), Image.NEAREST)) == 128
    # Grow the coarse piece by a pixel so its edge does not nibble the real outline.
    grown = Image.fromarray(part.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(5))
    return lung & (np.asarray(grown) > 127)
