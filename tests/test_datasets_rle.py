"""SIIM-ACR run-length code: round trips, and the whole real table shipped by torchxrayvision."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
from dataset_fixtures import real_table_rows

from sista_core.assets import SIIM_RLE
from sista_core.datasets.rle import resize_mask, rle_decode, rle_encode, rle_runs


@pytest.fixture(scope="module")
def siim_table() -> tuple[list[str], list[list[str]]]:
    return real_table_rows(SIIM_RLE)


def test_runs_count_from_the_previous_run_end_column_by_column():
    # 3 x 4 image (height 3, width 4); pixels numbered down each column: x * 3 + y.
    mask = rle_decode("1 2 4 1", height=3, width=4)
    expected = np.zeros((3, 4), dtype=bool)
    expected[1:3, 0] = True  # pixels 1, 2: column 0, rows 1-2
    expected[1, 2] = True  # pixel 3 + 4 = 7: column 2, row 1
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("empty", ["-1", " -1", ""])
def test_empty_code_decodes_to_an_empty_mask(empty):
    assert not rle_decode(empty, 8, 8).any()


def test_encode_then_decode_gives_back_the_mask():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((37, 53)) < rng.uniform(0.01, 0.5)
        np.testing.assert_array_equal(rle_decode(rle_encode(mask), 37, 53), mask)
    corner = np.zeros((5, 5), dtype=bool)
    corner[-1, -1] = True  # a run ending on the last pixel is kept
    np.testing.assert_array_equal(rle_decode(rle_encode(corner), 5, 5), corner)
    assert rle_encode(np.zeros((5, 5), dtype=bool)) == "-1"


@pytest.mark.parametrize("broken", ["5 0", "3 4 5", "-2 3", "1048570 10", "1 x"], ids=str.strip)
def test_invalid_codes_are_rejected(broken):
    with pytest.raises(ValueError):
        rle_runs(broken)


def test_every_positive_row_of_the_real_table_lies_inside_the_grid(siim_table):
    header, rows = siim_table
    assert header == ["ImageId", " EncodedPixels"]  # the real file's leading space
    positives = [rle for _, rle in rows if rle.strip() != "-1"]
    areas = np.array([rle_runs(rle)[:, 1].sum() for rle in positives])  # validates each row
    per_image = defaultdict(list)
    for image_id, rle in rows:
        per_image[image_id].append(rle.strip())
    positive_images = [parts for parts in per_image.values() if parts != ["-1"]]
    assert len(rows) == 12954 and len(per_image) == 12047
    assert len(positives) == 3576 and len(positive_images) == 2669
    assert all("-1" not in parts for parts in positive_images)  # no image is both
    assert areas.min() > 0 and np.median(areas) > 1000


def test_real_masks_decode_and_reencode_exactly(siim_table):
    _, rows = siim_table
    sample = [rle.strip() for _, rle in rows if rle.strip() != "-1"][::20]
    for rle in sample:
        mask = rle_decode(rle)
        assert mask.sum() == rle_runs(rle)[:, 1].sum()
        assert rle_encode(mask) == rle


def test_real_masks_sit_where_pneumothoraces_do(siim_table):
    # Orientation check: decoded column-major, masks fall on both sides of the midline and
    # mostly in the upper chest (apical); transposed, almost all would sit on one side.
    _, rows = siim_table
    sample = [rle for _, rle in rows if rle.strip() != "-1"][::10]
    centre_x, centre_y = [], []
    for rle in sample:
        mask = rle_decode(rle)
        area = mask.sum()
        centre_x.append((mask.sum(axis=0) * np.arange(1024)).sum() / area)
        centre_y.append((mask.sum(axis=1) * np.arange(1024)).sum() / area)
    right_half = np.mean(np.array(centre_x) > 512)
    upper_half = np.mean(np.array(centre_y) < 512)
    assert 0.3 < right_half < 0.7 and upper_half > 0.7


def test_resize_mask_keeps_shape_and_position():
    mask = np.zeros((1024, 1024), dtype=bool)
    mask[100:300, 600:700] = True
    small = resize_mask(mask, (256, 256))
    assert small.shape == (256, 256) and small.dtype == bool
    ys, xs = np.nonzero(small)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (25, 74, 150, 174)
