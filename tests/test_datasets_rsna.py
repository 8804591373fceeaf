"""RSNA Pneumonia adapter on a fixture of real label rows and DICOMs in the Kaggle layout."""

from __future__ import annotations

import numpy as np
import pytest
from dataset_fixtures import KAGGLE_SIDE, Layout, build_rsna, load_all

from sista_core.assets import RSNA_BOXES, xrv_data_file
from sista_core.datasets import RsnaPneumonia
from sista_core.datasets.tables import ROW_ERROR


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Layout:
    return build_rsna(tmp_path_factory.mktemp("rsna"))


@pytest.fixture(scope="module")
def loaded(layout):
    return load_all(RsnaPneumonia(layout.root))


def test_images_load_and_each_broken_record_names_its_reason(layout, loaded):
    samples, reasons = loaded
    assert set(samples) == layout.good
    # no pixel data, RGB, truncated DICOM, zero-byte, missing file, 32 px image, short row
    assert reasons == layout.broken


def test_every_box_row_of_an_image_becomes_one_pixel_box(layout, loaded):
    samples, _ = loaded
    for patient_id, count in layout.notes["box_counts"].items():
        sample = samples[patient_id]
        assert sample.image.shape == (KAGGLE_SIDE, KAGGLE_SIDE)
        assert sample.boxes.shape == (count, 4) and sample.boxes.dtype == np.float32
        if count:
            x, y, w, h = (float(v) for v in layout.notes["real_rows"][patient_id][0][1:5])
            np.testing.assert_allclose(sample.boxes[0], [x, y, x + w, y + h])
        assert (sample.boxes[:, 0] < sample.boxes[:, 2]).all()
        assert (sample.boxes[:, 1] < sample.boxes[:, 3]).all()
        assert (sample.boxes >= 0).all() and (sample.boxes <= KAGGLE_SIDE).all()
        target = float(count > 0)
        assert sample.labels == {"Pneumonia": target, "Lung Opacity": target}
        assert (sample.patient_id, sample.view, sample.split) == (patient_id, "PA", "train")


def test_whole_real_table_aggregates_boxes_per_image(tmp_path):
    adapter = RsnaPneumonia(tmp_path, labels_csv=xrv_data_file(RSNA_BOXES))
    refs = list(adapter.records())
    assert not [ref for ref in refs if ROW_ERROR in ref.meta]
    assert len(refs) == 26684
    assert sum(ref.meta["target"] for ref in refs) == 6012
    assert sum(len(ref.meta["boxes"]) for ref in refs) == 9555
    assert max(len(ref.meta["boxes"]) for ref in refs) == 4
