"""The phantom renderer: deterministic, radiological side convention, ground truth that
matches what is drawn, severities that mean something."""

import numpy as np
import pytest

from sista_core.findings import OBSERVATIONS, Finding
from sista_core.phantom import Phantom, render

DRAWN = [o for o in OBSERVATIONS if o != "No Finding"]


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    grown = mask.copy()
    for _ in range(steps):
        step = grown.copy()
        step[1:] |= grown[:-1]
        step[:-1] |= grown[1:]
        step[:, 1:] |= grown[:, :-1]
        step[:, :-1] |= grown[:, 1:]
        grown = step
    return grown


def _image_half(mask: np.ndarray) -> tuple[float, float]:
    """Fractions of a mask's pixels in the image's left and right halves."""
    half = mask.shape[1] // 2
    total = mask.sum()
    return mask[:, :half].sum() / total, mask[:, half:].sum() / total


def test_same_seed_gives_the_same_bytes_and_another_seed_another_film():
    findings = [Finding("Pleural Effusion", side="left"), Finding("Nodule")]
    first, again = render(findings, seed=3), render(findings, seed=3)
    assert first.image.tobytes() == again.image.tobytes()
    assert all(np.array_equal(first.masks[k], again.masks[k]) for k in first.masks)
    other = render(findings, seed=4)
    assert np.abs(first.image.astype(int) - other.image.astype(int)).mean() > 5


def test_normal_films_differ_between_seeds():
    films = [render([], seed=s, size=128).image.astype(int) for s in range(3)]
    assert np.abs(films[0] - films[1]).mean() > 5
    assert np.abs(films[1] - films[2]).mean() > 5


@pytest.mark.parametrize("size", [128, 224])
def test_types_and_shapes(size):
    phantom = render([Finding("Pleural Effusion", side="bilateral"), Finding("Granuloma")], 1, size)
    assert isinstance(phantom, Phantom)
    assert phantom.image.dtype == np.uint8 and phantom.image.shape == (size, size)
    for name, mask in phantom.masks.items():
        assert mask.dtype == bool and mask.shape == (size, size)
        boxes = phantom.boxes[name]
        assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert len(phantom.boxes["Pleural Effusion"]) == 2  # one per side
    # Air outside the body is black, lungs are darker than the heart.
    assert phantom.image[size // 2, :2].mean() < 60
    lungs, heart = phantom.anatomy["lungs"], phantom.anatomy["heart"]
    assert phantom.image[lungs].mean() + 40 < phantom.image[heart].mean()


def test_left_effusion_is_on_the_image_right():
    for seed in range(3):
        mask = render([Finding("Pleural Effusion", side="left")], seed).masks["Pleural Effusion"]
        left_of_image, right_of_image = _image_half(mask)
        assert right_of_image > 0.9


def test_right_pneumothorax_is_on_the_image_left():
    for seed in range(3):
        mask = render([Finding("Pneumothorax", side="right")], seed).masks["Pneumothorax"]
        left_of_image, right_of_image = _image_half(mask)
        assert left_of_image > 0.9


def test_heart_sits_left_of_the_midline_in_patient_terms():
    heart = render([], seed=5).anatomy["heart"]
    left_of_image, right_of_image = _image_half(heart)
    assert right_of_image > 0.55


@pytest.mark.parametrize("observation", DRAWN)
def test_each_finding_is_drawn_where_its_mask_says(observation):
    seed = 21
    with_it = render([Finding(observation)], seed)
    without = render([], seed)
    mask = with_it.masks[observation]
    assert mask.any()
    inside_thorax = (mask & with_it.anatomy["thorax"]).sum() / mask.sum()
    # Tubes and electrodes may leave the chest (neck, stomach, skin).
    assert inside_thorax > (0.6 if observation == "Support Devices" else 0.85)
    change = np.abs(with_it.image.astype(int) - without.image.astype(int))
    change[change <= 3] = 0  # rounding and noise
    assert change.sum() > 0
    near_mask = _dilate(mask, 3)
    assert change[near_mask].sum() / change.sum() > 0.6


@pytest.mark.parametrize("observation", DRAWN)
def test_boxes_enclose_their_masks(observation):
    phantom = render([Finding(observation)], seed=8)
    mask = phantom.masks[observation]
    covered = np.zeros_like(mask)
    for x0, y0, x1, y1 in phantom.boxes[observation].astype(int):
        assert 0 <= x0 < x1 <= mask.shape[1] and 0 <= y0 < y1 <= mask.shape[0]
        assert mask[y0:y1, x0:x1].any()
        covered[y0:y1, x0:x1] = True
    assert not (mask & ~covered).any()


def test_cardiomegaly_makes_the_heart_wider_than_half_the_chest():
    for seed in range(3):
        normal = render([], seed)
        enlarged = render([Finding("Cardiomegaly", severity="moderate")], seed)
        assert normal.cardiothoracic_ratio < 0.5 < enlarged.cardiothoracic_ratio
        width = [p.anatomy["heart"].any(0).sum() for p in (normal, enlarged)]
        assert width[1] > 1.15 * width[0]


def test_larger_effusion_covers_more_lung():
    for seed in range(3):
        area = [
            render([Finding("Pleural Effusion", side="right", severity=s)], seed)
            .masks["Pleural Effusion"]
            .sum()
            for s in ("small", "moderate", "large")
        ]
        assert area[0] < area[1] < area[2]


def test_unstated_attributes_are_chosen_and_reported():
    phantom = render([Finding("Lung Opacity")], seed=2)
    (drawn,) = phantom.findings
    assert drawn.side in ("left", "right", "bilateral")
    assert drawn.severity in ("small", "moderate", "large")
    assert drawn.zone is not None


def test_negative_findings_are_not_drawn_and_uncertain_ones_sometimes():
    negative = render([Finding("Pneumothorax", certainty="negative")], seed=1)
    assert not negative.masks and negative.findings == ()
    assert negative.image.tobytes() == render([], seed=1).image.tobytes()
    drawn = [
        "Nodule" in render([Finding("Nodule", certainty="uncertain")], seed=s, size=128).masks
        for s in range(12)
    ]
    assert 0 < sum(drawn) < len(drawn)


@pytest.mark.parametrize("size", [128, 512])
def test_every_finding_at_once_renders(size):
    everything = [Finding(o, side="bilateral", severity="large") for o in OBSERVATIONS]
    phantom = render(everything, seed=0, size=size)
    assert phantom.image.shape == (size, size)
    assert set(phantom.masks) <= set(OBSERVATIONS)
    assert len(phantom.masks) >= len(DRAWN) - 1
