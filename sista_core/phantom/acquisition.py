"""How the film was taken and developed: projection (PA or AP), patient positioning (slight
rotation, magnification, shift), exposure and contrast, detector blur and quantum noise.

Everything here is drawn from the acquisition's own random stream, so adding a finding never
changes how the rest of the film was exposed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from PIL import Image, ImageFilter

from .anatomy import BodyPlan


@dataclass(frozen=True)
class Acquisition:
    """One exposure's settings; lengths are fractions of the film, ``blur`` is in pixels of a
    224-pixel film."""

    view: Literal["PA", "AP"]
    rotation: float  # degrees
    zoom: float
    shift: tuple[float, float]
    exposure: float  # gain of the film's response to attenuation
    window: tuple[float, float]  # developed range mapped to black..white
    gamma: float
    blur: float
    noise: float


def sample_acquisition(rng: np.random.Generator) -> Acquisition:
    """Typical departmental variety: mostly PA, a third portable AP."""
    rotation = float(np.clip(rng.normal(0.0, 1.4), -3.5, 3.5))
    shift = (float(rng.uniform(-0.015, 0.015)), float(rng.uniform(-0.015, 0.015)))
    # Enough magnification that the rotated, shifted film still covers every corner.
    cover = abs(np.sin(np.deg2rad(rotation))) + 2 * max(abs(shift[0]), abs(shift[1]))
    low = rng.uniform(0.08, 0.16)
    return Acquisition(
        view="AP" if rng.random() < 0.3 else "PA",
        rotation=rotation,
        zoom=float(rng.uniform(0.99, 1.05) + cover),
        shift=shift,
        exposure=float(rng.uniform(1.0, 1.25)),
        window=(float(low), float(rng.uniform(0.84, 0.92))),
        gamma=float(rng.uniform(0.85, 1.2)),
        blur=float(rng.uniform(0.35, 0.9)),
        noise=float(rng.uniform(0.008, 0.022)),
    )


def project(plan: BodyPlan, acquisition: Acquisition) -> BodyPlan:
    """An AP (portable, supine or semi-erect) film magnifies the heart, projects the clavicles
    higher and usually catches a shallower inspiration."""
    if acquisition.view == "PA":
        return plan
    u0, v0, u1, v1 = plan.lung_box
    return replace(
        plan,
        lung_box=(u0, v0 + 0.01, u1, v1 - 0.03),
        cardiothoracic_ratio=plan.cardiothoracic_ratio * 1.08,
        clavicle_level=plan.clavicle_level - 0.04,
    )


def _affine(acquisition: Acquisition, size: int) -> tuple[float, ...]:
    """PIL's output-to-input affine coefficients for the positioning."""
    theta = np.deg2rad(acquisition.rotation)
    c, s = np.cos(theta) / acquisition.zoom, np.sin(theta) / acquisition.zoom
    centre = size / 2
    sx, sy = acquisition.shift[0] * size, acquisition.shift[1] * size
    return (
        c,
        -s,
        centre - c * centre + s * centre - sx,
        s,
        c,
        centre - s * centre - c * centre - sy,
    )


def position(field: np.ndarray, acquisition: Acquisition) -> np.ndarray:
    """Apply the positioning to a float field (bilinear) or a bool mask (nearest)."""
    size = field.shape[0]
    coefficients = _affine(acquisition, size)
    if field.dtype == bool:
        image = Image.fromarray(field.astype(np.uint8) * 255)
        moved = image.transform((size, size), Image.AFFINE, coefficients, Image.NEAREST)
        return np.asarray(moved) > 127
    image = Image.fromarray(np.ascontiguousarray(field, dtype=np.float32))
    moved = image.transform((size, size), Image.AFFINE, coefficients, Image.BILINEAR)
    return np.asarray(moved, dtype=np.float32)


def develop(
    attenuation: np.ndarray, acquisition: Acquisition, rng: np.random.Generator
) -> np.ndarray:
    """Attenuation (already positioned) to a uint8 radiograph, 0 = black (no attenuation)."""
    size = attenuation.shape[0]
    low, high = acquisition.window
    response = np.maximum(attenuation, 0.0)
    response *= np.float32(-acquisition.exposure)
    np.exp(response, out=response)
    # shade = ((1 - exp(-gA)) - low) / (high - low), clipped, to the gamma
    response *= np.float32(-1.0 / (high - low))
    response += np.float32((1.0 - low) / (high - low))
    np.clip(response, 0.0, 1.0, out=response)
    response **= np.float32(acquisition.gamma)
    response *= np.float32(255.0)
    image = _blur(Image.fromarray((response + 0.5).astype(np.uint8)), acquisition.blur * size / 224)
    shade = np.asarray(image, dtype=np.float32)
    # Quantum noise: fewer photons reach the detector behind dense tissue, so bright areas
    # are noisier (std = noise * (89 + shade)). Uniform grain looks the same here and is
    # cheaper to draw than Gaussian; 3.46 = sqrt(12) gives it unit variance.
    grain = rng.random((size, size), dtype=np.float32)
    grain -= np.float32(0.5)
    grain *= (shade + np.float32(89.0)) * np.float32(3.46 * acquisition.noise)
    shade += grain
    shade += np.float32(0.5)
    return np.clip(shade, 0, 255, out=shade).astype(np.uint8)


def _blur(image: Image.Image, sigma: float) -> Image.Image:
    """Detector blur; a 3x3 Gaussian kernel where it is enough (fast), a true one beyond."""
    if sigma > 1.0:
        return image.filter(ImageFilter.GaussianBlur(sigma))
    side = float(np.exp(-0.5 / max(sigma, 0.05) ** 2))
    corner = side * side
    weights = [corner, side, corner, side, 1.0, side, corner, side, corner]
    return image.filter(ImageFilter.Kernel((3, 3), weights, scale=sum(weights)))
