"""Word heat maps from STA's sparse word-to-patch attention, and a check that they localise.

The attention is the one training optimises (the model's own ``STALoss`` on its projected
words and patches), so a heat map shows what the objective aligned, not a post-hoc saliency.
``localisation_rate`` asks whether a finding's name attends to where the phantom renderer
drew that finding, against the chance level of a uniform map.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from .datasets.images import resize_uint8
from .findings import Finding
from .phantom import render

if TYPE_CHECKING:
    from .model import SISTAModel

# Findings the phantom draws as one bounded region with a mask -> how a report names them.
# The last word of each phrase is the word whose heat map is checked.
FOCAL_FINDINGS: dict[str, str] = {
    "Pneumothorax": "pneumothorax",
    "Nodule": "lung nodule",
    "Mass": "lung mass",
    "Consolidation": "consolidation",
    "Lung Opacity": "lung opacity",
}
DEFAULT_WORDS_SHOWN = 4


def word_attention(
    model: SISTAModel, image: np.ndarray, report: str
) -> tuple[list[str], torch.Tensor]:
    """uint8 image (H, W) at the model's size and a report -> the report's alignable words
    (Nw of them, punctuation and ``XXXX`` left out) and their word-to-patch attention
    (Nw, h, w) on the patch grid; each row sums to 1. Puts the model in eval mode."""
    size = model.image_encoder.config.img_size
    if image.shape != (size, size):
        raise ValueError(f"image is {image.shape}, the model takes ({size}, {size}) uint8")
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode():
        pixels = model.image_encoder.normalize(torch.as_tensor(image, device=device)[None])
        visual, text = model.encode_image(pixels), model.encode_text([report])
        attention = model.sta_loss(text["words"], text["word_mask"], visual["patches"])
    real = text["word_mask"][0]
    words = [word for word, keep in zip(text["words_text"][0], real.tolist(), strict=True) if keep]
    return words, attention["attention"][0][real].reshape(len(words), *visual["grid"]).cpu()


def most_concentrated(attention: torch.Tensor, count: int = DEFAULT_WORDS_SHOWN) -> list[int]:
    """Indices of the ``count`` words (Nw, h, w) whose attention peaks highest: the ones
    that point at a spot rather than spread over the image."""
    peaks = attention.flatten(1).amax(1)
    return peaks.argsort(descending=True)[:count].tolist()


def find_words(words: Sequence[str], wanted: Sequence[str]) -> list[int]:
    """Index of the first occurrence of each wanted word (case-insensitive)."""
    lowered = [word.lower() for word in words]
    indices = []
    for word in wanted:
        if word.lower() not in lowered:
            raise ValueError(f"{word!r} is not a word of the report; its words: {list(words)}")
        indices.append(lowered.index(word.lower()))
    return indices


def explain_png(
    model: SISTAModel,
    image: np.ndarray,
    report: str,
    out_path: str | Path,
    words: Sequence[str] | None = None,
) -> list[str]:
    """Write a PNG: the image, then one panel per word with its attention over the image
    (patches it never selects stay clear) and how many patches it selects. ``words``
    defaults to the most concentrated ones. Returns the words shown."""
    report_words, attention = word_attention(model, image, report)
    chosen = find_words(report_words, words) if words else most_concentrated(attention)
    figure = Figure(figsize=(3 * (1 + len(chosen)), 3.4), layout="constrained")
    axes = figure.subplots(1, 1 + len(chosen), squeeze=False)[0]
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=255)
    axes[0].set_title("\n".join(textwrap.wrap(report, 32)[:3]), fontsize=8)
    height, width = image.shape
    for axis, index in zip(axes[1:], chosen, strict=True):
        word_map = attention[index].numpy()
        axis.imshow(image, cmap="gray", vmin=0, vmax=255)
        # Nearest upsampling onto the image keeps each patch's weight exact; masking the
        # zeros shows the sparsity itself, which a smoothed map would blur away.
        axis.imshow(
            np.ma.masked_equal(word_map, 0.0),
            cmap="inferno",
            alpha=0.6,
            vmin=0.0,
            vmax=max(float(word_map.max()), 1e-6),
            extent=(0, width, height, 0),
            interpolation="nearest",
        )
        selected = int((word_map > 0).sum())
        axis.set_title(f"{report_words[index]}: {selected}/{word_map.size} patches")
    for axis in axes:
        axis.set_axis_off()
    figure.savefig(out_path, dpi=100)
    return [report_words[index] for index in chosen]


def attention_mass_in_mask(attention_hw: torch.Tensor, mask: np.ndarray | torch.Tensor) -> float:
    """Share of a non-negative attention map (h, w) that falls inside a bool mask (H, W) over
    the same image: each patch contributes its weight times the fraction of its pixels in the
    mask (exact when h divides H and w divides W). 0 for an all-zero map."""
    mask = torch.as_tensor(mask, dtype=torch.float32)
    coverage = F.adaptive_avg_pool2d(mask[None, None], tuple(attention_hw.shape))[0, 0]
    total = float(attention_hw.sum())
    return float((attention_hw * coverage).sum()) / total if total > 0 else 0.0


def points_inside(
    attention_hw: torch.Tensor, mask: np.ndarray | torch.Tensor
) -> tuple[bool, float]:
    """The pointing game: whether the map's highest patch overlaps the mask (a hit), and the
    hit rate of a uniformly random patch (the share of patches that overlap it). An all-zero
    map points nowhere: a miss."""
    mask = torch.as_tensor(mask, dtype=torch.float32)
    coverage = F.adaptive_avg_pool2d(mask[None, None], tuple(attention_hw.shape))[0, 0]
    touched = coverage.flatten() > 0
    chance = float(touched.float().mean())
    if float(attention_hw.max()) <= 0:
        return False, chance
    return bool(touched[int(attention_hw.flatten().argmax())]), chance


def focal_report(finding: Finding) -> str:
    """A one-line report naming a drawn focal finding and its side: "Left pneumothorax."."""
    phrase = FOCAL_FINDINGS[finding.observation]
    return f"{finding.side} {phrase}.".capitalize() if finding.side else f"{phrase.capitalize()}."


def _summary(
    masses: list[float], uniform: list[float], points: list[bool], chances: list[float]
) -> dict[str, int | float]:
    """Count, hit rates and mean masses of one group of images (NaN for an empty group).

    ``rate``: share of images whose naming word puts more mass in the mask than a uniform
    map; ``majority_rate``: share where it puts most of its mass (> 1/2) in the mask, and
    ``uniform_majority_rate`` the same for a uniform map (the mask's area above 1/2);
    ``pointing_game``: share whose highest patch overlaps the mask, ``uniform_pointing``
    the same for a uniformly random patch."""
    hits = [mass > chance for mass, chance in zip(masses, uniform, strict=True)]
    return {
        "pointing_game": float(np.mean(points)) if points else float("nan"),
        "uniform_pointing": float(np.mean(chances)) if chances else float("nan"),
        "num_images": len(masses),
        "rate": float(np.mean(hits)) if hits else float("nan"),
        "majority_rate": float(np.mean([m > 0.5 for m in masses])) if masses else float("nan"),
        "uniform_majority_rate": (
            float(np.mean([u > 0.5 for u in uniform])) if uniform else float("nan")
        ),
        "mean_mass_in_mask": float(np.mean(masses)) if masses else float("nan"),
        "mean_uniform_mass": float(np.mean(uniform)) if uniform else float("nan"),
    }


def localisation_rate(
    model: SISTAModel, num_images: int, seed: int = 0, size: int | None = None
) -> dict[str, Any]:
    """Render ``num_images`` phantoms with one focal finding each (cycling through
    ``FOCAL_FINDINGS``; seeds ``seed``, ``seed + 1``, ...; ``size`` pixels, default the
    model's), report it ("Left pneumothorax."), and count how often the naming word puts
    more attention inside the finding's mask than a uniform map would (the mask's area).

    Returns ``num_images`` (those where the finding was drawn), ``rate``,
    ``mean_mass_in_mask``, ``mean_uniform_mass``, the pointing game (``pointing_game``
    against ``uniform_pointing``) and the same per finding.
    """
    model_size = model.image_encoder.config.img_size
    records: dict[str, tuple[list, list, list, list]] = {
        o: ([], [], [], []) for o in FOCAL_FINDINGS
    }
    for index in range(num_images):
        observation = list(FOCAL_FINDINGS)[index % len(FOCAL_FINDINGS)]
        phantom = render([Finding(observation)], seed + index, size or model_size)
        if observation not in phantom.masks:  # nothing visible was drawn: nothing to find
            continue
        words, attention = word_attention(
            model, resize_uint8(phantom.image, model_size), focal_report(phantom.findings[0])
        )
        naming = find_words(words, [FOCAL_FINDINGS[observation].split()[-1]])[0]
        mask = phantom.masks[observation]
        masses, uniform, points, chances = records[observation]
        masses.append(attention_mass_in_mask(attention[naming], mask))
        # Chance through the same function, so the uniform map sees the same patch coverage.
        uniform.append(attention_mass_in_mask(torch.ones_like(attention[naming]), mask))
        hit, chance = points_inside(attention[naming], mask)
        points.append(hit)
        chances.append(chance)
    pooled = [[value for group in records.values() for value in group[i]] for i in range(4)]
    return {
        **_summary(*pooled),
        "per_finding": {name: _summary(*group) for name, group in records.items()},
    }
