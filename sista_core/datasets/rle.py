"""SIIM-ACR Pneumothorax's run-length encoding (the Kaggle ``mask_functions.py`` convention).

A mask string is pairs ``start length``; each start is counted from the end of the previous
run (the first from pixel 0), and pixels are numbered column by column (x * height + y) over
the image's pixel grid (1024 x 1024 in SIIM). ``"-1"`` (or an empty string) means no
pneumothorax. Decoding is ``flat.reshape(width, height).T``, as in the Kaggle kernels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIIM_SIZE = 1024
EMPTY_RLE = "-1"


def rle_runs(rle: str, height: int = SIIM_SIZE, width: int = SIIM_SIZE) -> np.ndarray:
    """Absolute runs (n, 2) int64: first column-major pixel, length. Validates without
    allocating a mask: every length positive, no run before the previous one ends, every run
    inside the height x width grid. Raises ValueError naming the problem."""
    text = rle.strip()
    if text in ("", EMPTY_RLE):
        return np.zeros((0, 2), dtype=np.int64)
    try:
        numbers = np.array(text.split(), dtype=np.int64)
    except ValueError as error:
        raise ValueError(f"run-length string holds a non-integer: {error}") from error
    if numbers.size % 2:
        raise ValueError(f"run-length string has an odd count of numbers ({numbers.size})")
    gaps, lengths = numbers[0::2], numbers[1::2]
    if (lengths <= 0).any():
        raise ValueError("a run has a length of zero or less")
    if (gaps < 0).any():
        raise ValueError("a run starts before the previous run ends")
    starts = np.cumsum(gaps) + np.cumsum(lengths) - lengths
    end = int(starts[-1] + lengths[-1])
    if end > height * width:
        raise ValueError(f"runs end at pixel {end}, past the {height}x{width} grid")
    return np.stack([starts, lengths], axis=1)


def rle_decode(rle: str, height: int = SIIM_SIZE, width: int = SIIM_SIZE) -> np.ndarray:
    """Decode a SIIM run-length string to a bool mask (height, width)."""
    flat = np.zeros(height * width, dtype=bool)
    for start, length in rle_runs(rle, height, width).tolist():
        flat[start : start + length] = True
    return flat.reshape(width, height).T  # a transposed view: copying costs more than decoding


def rle_encode(mask: np.ndarray) -> str:
    """Encode a bool mask (H, W) as a SIIM run-length string (``"-1"`` when empty).

    Unlike Kaggle's reference encoder, a run that reaches the last pixel is written too.
    """
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    if not flat.any():
        return EMPTY_RLE
    padded = np.concatenate([[False], flat, [False]])
    changes = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = changes[0::2], changes[1::2]
    lengths = ends - starts
    previous_ends = np.concatenate([[0], ends[:-1]])
    gaps = starts - previous_ends
    return " ".join(f"{gap} {length}" for gap, length in zip(gaps, lengths, strict=True))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to ``size`` = (height, width); a mask drawn on
    SIIM's 1024 grid placed onto an image of another size keeps its shape and position."""
    height, width = size
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    resized = image.resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(resized) > 127
