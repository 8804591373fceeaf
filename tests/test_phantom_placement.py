"""Findings drawn where a real annotation says: the source-to-phantom mapping, opacities that
fill their (mapped) boxes within the lungs, pneumothoraces from a mask, and ground truth
that is what was drawn."""

import numpy as np
import pytest

from sista_core.findings import Finding
from sista_core.phantom import RADIOGRAPH_LUNG_BOX, Placement, render
from sista_core.phantom.anatomy import build_anatomy, sample_plan
from sista_core.phantom.pleura import _touches

OPACITY, PNEUMOTHORAX = "Lung Opacity", "Pneumothorax"
# A box in the middle of the source film's right lung (image left), in source fractions.
RIGHT_MID = (0.2, 0.35, 0.4, 0.65)


def _bbox(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=float)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area - inter)


def _centre(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([cols.mean(), rows.mean()])


def _placed_opacity(boxes, seed: int, size: int = 224):
    placement = Placement(boxes=np.asarray(boxes, dtype=float))
    return render([Finding(OPACITY)], seed, size, {OPACITY: placement})


def test_the_source_lung_box_maps_onto_the_phantoms_lung_box():
    anatomy = build_anatomy(sample_plan(np.random.default_rng(4)), 224)
    placement = Placement(boxes=np.array([RADIOGRAPH_LUNG_BOX]))
    np.testing.assert_allclose(placement.film_boxes(anatomy)[0], anatomy.lung_bounds, atol=1e-9)
    x0, y0, x1, y1 = RADIOGRAPH_LUNG_BOX
    middle = Placement(boxes=np.array([[x0, y0, (x0 + x1) / 2, (y0 + y1) / 2]]))
    u0, v0, u1, v1 = anatomy.lung_bounds
    np.testing.assert_allclose(
        middle.film_boxes(anatomy)[0], [u0, v0, (u0 + u1) / 2, (v0 + v1) / 2], atol=1e-9
    )


@pytest.mark.parametrize("seed", range(4))
def test_a_placed_opacity_fills_its_box_within_the_lungs(seed):
    phantom = _placed_opacity([RIGHT_MID], seed)
    drawn = phantom.masks[OPACITY]
    requested = phantom.placed[OPACITY] & phantom.anatomy["lungs"]
    (box,) = phantom.boxes[OPACITY]
    assert _iou(box, _bbox(requested)) > 0.8
    assert np.linalg.norm(_centre(drawn) - _centre(requested)) < 0.04 * 224
    assert drawn.sum() > 0.6 * requested.sum()
    assert (drawn & ~phantom.placed[OPACITY]).sum() < 0.03 * drawn.sum()  # only rotation
    (finding,) = phantom.findings
    assert finding.side == "right" and finding.severity is None and finding.zone is None
    assert not drawn[:, 112:].any()  # the patient's right is the image left


def test_each_placed_box_is_one_drawn_box_and_boxes_outside_the_lungs_draw_nothing():
    two = _placed_opacity([RIGHT_MID, (0.6, 0.3, 0.8, 0.7)], seed=1)
    assert len(two.boxes[OPACITY]) == 2
    assert two.findings[0].side == "bilateral"
    outside = _placed_opacity([(0.0, 0.0, 0.05, 0.05)], seed=1)
    assert OPACITY not in outside.masks and outside.findings == ()
    assert OPACITY in outside.placed  # asked for, mapped, but nothing landed in a lung


def test_an_opacity_over_the_mediastinum_is_clipped_to_the_lungs():
    phantom = _placed_opacity([(0.35, 0.3, 0.65, 0.7)], seed=2)
    drawn = phantom.masks[OPACITY]
    lungs = phantom.anatomy["lungs"]
    assert (drawn & ~lungs).sum() < 0.05 * drawn.sum()
    assert drawn.sum() < 0.8 * phantom.placed[OPACITY].sum()


def _strip_mask() -> np.ndarray:
    """A SIIM-like lateral pneumothorax on a 1024 film: a band inside the right chest wall."""
    mask = np.zeros((1024, 1024), dtype=bool)
    mask[120:600, 90:150] = True
    return mask


@pytest.mark.parametrize("seed", range(3))
def test_a_placed_pneumothorax_is_dark_air_with_a_pleural_line(seed):
    phantom = render(
        [Finding(PNEUMOTHORAX)], seed, 224, {PNEUMOTHORAX: Placement(mask=_strip_mask())}
    )
    normal = render([], seed, 224)
    air = phantom.masks[PNEUMOTHORAX]
    assert air.sum() > 50
    assert (air & phantom.anatomy["thorax"]).sum() / air.sum() > 0.97
    assert air[:, :112].sum() / air.sum() > 0.97  # the patient's right is the image left
    change = phantom.image.astype(float) - normal.image.astype(float)
    assert change[air].mean() < -8  # air, and no vessels
    line = phantom.anatomy["lungs"] & ~air & _touches(air)
    assert change[line].mean() > 2  # the visceral pleural line, brighter than lung
    # Drawn where asked: against the wall, within a few pixels of the mapped mask.
    placed = phantom.placed[PNEUMOTHORAX]
    grown = placed.copy()
    for _ in range(8):
        grown |= _touches(grown)
    assert (air & ~grown).sum() < 0.05 * air.sum()


def test_placement_is_deterministic_and_changes_only_its_finding():
    placements = {PNEUMOTHORAX: Placement(mask=_strip_mask())}
    findings = [Finding(PNEUMOTHORAX), Finding("Cardiomegaly")]
    first = render(findings, 5, 128, placements)
    again = render(findings, 5, 128, placements)
    assert first.image.tobytes() == again.image.tobytes()
    assert np.array_equal(first.masks[PNEUMOTHORAX], again.masks[PNEUMOTHORAX])
    unplaced = render(findings, 5, 128)
    assert np.array_equal(first.masks["Cardiomegaly"], unplaced.masks["Cardiomegaly"])


def test_a_placement_draws_nothing_without_its_finding():
    placements = {OPACITY: Placement(boxes=np.array([RIGHT_MID]))}
    assert render([], 3, 128, placements).image.tobytes() == render([], 3, 128).image.tobytes()


def test_bad_placements_are_refused():
    with pytest.raises(ValueError, match="exactly one"):
        Placement()
    with pytest.raises(ValueError, match="exactly one"):
        Placement(boxes=np.array([RIGHT_MID]), mask=np.ones((4, 4), dtype=bool))
    with pytest.raises(ValueError, match="at least one box"):
        Placement(boxes=np.zeros((0, 4)))
    with pytest.raises(ValueError, match="x1 > x0"):
        Placement(boxes=np.array([[0.5, 0.5, 0.4, 0.6]]))
    with pytest.raises(ValueError, match="cannot place"):
        render([Finding("Nodule")], 0, 128, {"Nodule": Placement(boxes=np.array([RIGHT_MID]))})


def test_pixel_boxes_become_source_fractions():
    placement = Placement.from_pixel_boxes(np.array([[102.4, 256, 512, 768]]), 1024, 1024)
    np.testing.assert_allclose(placement.boxes, [[0.1, 0.25, 0.5, 0.75]])
