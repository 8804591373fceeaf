"""SIIM-ACR Pneumothorax adapter on real RLE rows with DICOMs in the Kaggle folder tree."""

from __future__ import annotations

import numpy as np
import pytest
from dataset_fixtures import KAGGLE_SIDE, Layout, build_siim, load_all

from sista_core.assets import SIIM_RLE, xrv_data_file
from sista_core.datasets import SiimPneumothorax
from sista_core.datasets.rle import rle_decode
from sista_core.datasets.tables import ROW_ERROR


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Layout:
    return build_siim(tmp_path_factory.mktemp("siim"))


@pytest.fixture(scope="module")
def loaded(layout):
    return load_all(SiimPneumothorax(layout.root))


def test_images_load_and_each_broken_record_names_its_reason(layout, loaded):
    samples, reasons = loaded
    assert set(samples) == layout.good
    assert reasons == layout.broken  # DICOM absent from the tree, mask outside the grid


def test_mask_parts_of_one_image_are_merged(layout, loaded):
    samples, _ = loaded
    for image_id, parts in layout.notes["rle"].items():
        sample = samples[image_id]
        assert sample.mask.shape == sample.image.shape == (KAGGLE_SIDE, KAGGLE_SIDE)
        expected = np.zeros((KAGGLE_SIDE, KAGGLE_SIDE), dtype=bool)
        for rle in parts:
            expected |= rle_decode(rle)
        np.testing.assert_array_equal(sample.mask, expected)
        positive = parts != ["-1"]
        assert sample.labels == {"Pneumothorax": float(positive)}
        assert sample.mask.any() == positive
    assert sorted(len(p) for p in layout.notes["rle"].values() if p != ["-1"]) == [1, 2, 3]


def test_patient_id_is_read_from_the_dicom_header(layout, loaded):
    samples, _ = loaded
    refs = {ref.record_id: ref for ref in SiimPneumothorax(layout.root).records()}
    for image_id in layout.good:
        assert refs[image_id].patient_id.startswith("patient-")
        assert samples[image_id].patient_id == refs[image_id].patient_id
        assert samples[image_id].view == "PA"


def test_whole_real_table_lists_one_record_per_image(tmp_path):
    adapter = SiimPneumothorax(tmp_path, rle_csv=xrv_data_file(SIIM_RLE))
    refs = list(adapter.records())
    assert not [ref for ref in refs if ROW_ERROR in ref.meta]
    assert len(refs) == 12047
    assert sum(bool(ref.meta["rle"]) for ref in refs) == 2669
    assert sum(len(ref.meta["rle"]) for ref in refs) == 3576
