"""Object-CXR adapter: rectangle, ellipse and polygon annotations to boxes and masks."""

from __future__ import annotations

import numpy as np
import pytest
from dataset_fixtures import Layout, build_object_cxr, load_all

from sista_core.datasets import FOREIGN_OBJECT, ObjectCxr


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Layout:
    return build_object_cxr(tmp_path_factory.mktemp("object-cxr"))


@pytest.fixture(scope="module")
def samples(layout):
    samples, _ = load_all(ObjectCxr(layout.root))
    return samples


def test_images_load_and_each_broken_record_names_its_reason(layout):
    samples, reasons = load_all(ObjectCxr(layout.root))
    assert set(samples) == layout.good
    assert reasons == layout.broken  # unknown shape type, truncated, missing, short row


def test_rectangle_becomes_its_box_and_a_filled_mask(samples):
    sample = samples["00001"]
    np.testing.assert_array_equal(sample.boxes, [[40, 50, 80, 90]])
    assert sample.labels == {FOREIGN_OBJECT: 1.0}
    assert sample.mask[50:91, 40:81].all() and sample.mask.sum() == 41 * 41


def test_ellipse_box_is_its_bounding_box_and_mask_is_elliptic(samples):
    sample = samples["00002"]
    np.testing.assert_array_equal(sample.boxes, [[100, 60, 140, 120], [20, 30, 40, 45]])
    ellipse = sample.mask[60:121, 100:141]
    assert abs(ellipse.sum() - np.pi * 20 * 30) < 0.1 * np.pi * 20 * 30
    assert not ellipse[0, 0] and ellipse[30, 20]  # corner outside, centre inside


def test_polygon_box_encloses_its_points_and_boxes_stay_inside_the_image(layout, samples):
    sample = samples["00003"]
    height, width = layout.notes["sizes"]["00003.jpg"]
    np.testing.assert_array_equal(
        sample.boxes, [[30, 30, 60, 70], [width - 10, height - 10, width, height]]
    )
    assert sample.mask[45, 45] and not sample.mask[31, 59]


def test_image_without_annotation_is_negative(samples):
    sample = samples["00004"]
    assert sample.labels == {FOREIGN_OBJECT: 0.0}
    assert sample.boxes.shape == (0, 4) and not sample.mask.any()
    assert sample.mask.shape == sample.image.shape


def test_dev_split_is_the_validation_split(layout):
    samples, reasons = load_all(ObjectCxr(layout.root, split="dev"))
    assert not reasons and samples["08001"].split == "validate"
