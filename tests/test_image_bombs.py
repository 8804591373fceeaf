"""Images and reports whose size would exhaust a worker are refused from their headers, before
any pixel is decoded; a bad table row is quarantined while the rest of the table is read."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from dataset_fixtures import write_csv, write_kaggle_dicom
from PIL import Image
from pydicom.uid import DeflatedExplicitVRLittleEndian

from sista_core.datasets import RecordError, images
from sista_core.datasets.images import dicom_patient_id, open_dicom, read_image
from sista_core.datasets.tables import read_rows


@pytest.fixture
def small_budget(monkeypatch):
    """A 100 x 100 pixel budget: the bombs below stay small enough for a test."""
    monkeypatch.setattr(images, "MAX_PIXELS", 100 * 100)


def test_a_png_past_the_pixel_budget_is_refused_from_its_header(tmp_path, small_budget):
    path = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((300, 200), np.uint16)).save(path)  # compresses to ~1 KB
    with pytest.raises(RecordError) as error:
        read_image(path, "bomb")
    assert error.value.reason == "image_too_large" and "200x300x1" in error.value.detail
    Image.fromarray(np.full((90, 90), 7, np.uint8)).save(tmp_path / "fine.png")
    assert read_image(tmp_path / "fine.png", "fine").shape == (90, 90)  # within budget


def test_a_dicom_declaring_too_many_pixels_is_refused_before_its_pixels(tmp_path, small_budget):
    path = tmp_path / "big.dcm"
    write_kaggle_dicom(path, "p1", side=128)
    with pytest.raises(RecordError) as error:
        open_dicom(path, "big")
    assert error.value.reason == "image_too_large" and "128x128x1" in error.value.detail
    assert dicom_patient_id(path) is None  # the listing never parses it either


def test_a_deflated_dicom_is_inflated_with_a_cap(tmp_path, monkeypatch):
    path = tmp_path / "deflated.dcm"
    write_kaggle_dicom(path, "p1", side=256)
    dataset = pydicom.dcmread(path)
    dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    dataset.save_as(path, enforce_file_format=True)
    assert open_dicom(path, "ok").Rows == 256  # under the cap: read as usual
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)  # cap: 4,000 inflated bytes
    monkeypatch.setattr(images, "DEFLATED_HEADER_ROOM", 0)
    with pytest.raises(RecordError) as error:
        open_dicom(path, "bomb")
    assert error.value.reason == "image_too_large" and "inflates past" in error.value.detail


def test_one_bad_row_is_quarantined_and_the_table_read_on(tmp_path):
    path = tmp_path / "table.csv"
    write_csv(path, ["id", "value"], [["a", "1"], ["b", "x" * 200_000], ["c", "3"]])
    raw = path.read_bytes().replace(b"c,3", b"c,\xff3")  # one byte that is not UTF-8
    path.write_bytes(raw + b"d,4\n")
    rows = list(read_rows(path, ["id", "value"]))
    assert [(row.fields["id"], row.problem is None) for row in rows] == [
        ("a", True),
        (None, False),
        (None, False),
        ("d", True),
    ]
    assert "field larger than field limit" in rows[1].problem
    assert "not UTF-8" in rows[2].problem
