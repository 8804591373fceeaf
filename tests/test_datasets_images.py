"""Decoding helpers shared by the adapters: JPEG/PNG, DICOM, letterbox resize."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from dataset_fixtures import (
    real_dicom_resized,
    write_cr_dicom,
    write_dicom_without_pixels,
    write_kaggle_dicom,
    write_radiograph,
    write_rgb_dicom,
    write_tiny_jpeg,
    write_truncated_dicom,
    write_truncated_jpeg,
    write_zero_byte,
)
from PIL import Image

from sista_core.assets import real_chest_dicom, real_radiograph_files
from sista_core.datasets import RecordError, read_dicom, read_image, resize_uint8
from sista_core.datasets.images import letterbox


def reason_of(read, path) -> str:
    with pytest.raises(RecordError) as caught:
        read(path, "rec-1")
    assert caught.value.record_id == "rec-1"
    return caught.value.reason


def test_real_jpeg_decodes_to_its_own_grayscale_pixels():
    path = real_radiograph_files()[0]
    image = read_image(path, "jpeg")
    with Image.open(path) as img:
        expected = np.asarray(img.convert("L"))
    assert image.dtype == np.uint8 and image.ndim == 2
    np.testing.assert_array_equal(image, expected)


def test_rgb_png_becomes_luminance(tmp_path):
    gray = np.asarray(Image.open(real_radiograph_files()[1]).convert("L").resize((200, 160)))
    Image.fromarray(np.stack([gray] * 3, axis=2)).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png", "rgb"), gray)


def test_sixteen_bit_png_is_scaled_over_its_range_not_clipped(tmp_path):
    values = real_dicom_resized(256, 240)  # 15-bit CR values, 800..26000
    Image.fromarray(values).save(tmp_path / "sixteen.png")
    with Image.open(tmp_path / "sixteen.png") as img:
        assert img.mode.startswith("I")
        clipped = np.asarray(img.convert("L"))
    image = read_image(tmp_path / "sixteen.png", "png16")
    assert (clipped == 255).mean() > 0.9  # what a plain PIL conversion would give
    assert len(np.unique(image)) > 200
    assert image.min() == 0 and image.max() == 255
    assert np.corrcoef(image.ravel(), values.ravel())[0, 1] > 0.99


@pytest.mark.parametrize(
    ("write", "reason"),
    [
        (write_truncated_jpeg, "truncated_image"),
        (write_zero_byte, "zero_byte_file"),
        (write_tiny_jpeg, "image_too_small"),
        (lambda path: path.write_text("not an image"), "undecodable_image"),
        (lambda path: None, "missing_file"),
    ],
)
def test_broken_image_files_raise_their_reason(tmp_path, write, reason):
    path = tmp_path / "image.jpg"
    write(path)
    assert reason_of(read_image, path) == reason


def test_min_size_is_configurable(tmp_path):
    path = tmp_path / "tiny.jpg"
    write_tiny_jpeg(path)
    assert read_image(path, "tiny", min_size=16).shape == (24, 32)


def test_monochrome1_dicom_is_inverted_so_bone_is_bright():
    dataset = pydicom.dcmread(real_chest_dicom())
    assert dataset.PhotometricInterpretation == "MONOCHROME1"
    image = read_dicom(real_chest_dicom(), "rg1")
    assert image.shape == dataset.pixel_array.shape and image.dtype == np.uint8
    assert np.corrcoef(image.ravel(), dataset.pixel_array.ravel())[0, 1] < -0.99
    height, width = image.shape

    def region(x0: float, x1: float, y0: float, y1: float) -> float:
        return float(
            image[int(y0 * height) : int(y1 * height), int(x0 * width) : int(x1 * width)].mean()
        )

    spine = region(0.46, 0.54, 0.25, 0.55)
    lungs = (region(0.20, 0.35, 0.25, 0.50) + region(0.65, 0.80, 0.25, 0.50)) / 2
    air = region(0.0, 0.03, 0.0, 0.03)
    assert spine > lungs + 60 and lungs > air + 40


def test_eight_bit_monochrome2_dicom_keeps_its_stored_pixels(tmp_path):
    stored = write_kaggle_dicom(tmp_path / "kaggle.dcm", "p1", side=256)
    np.testing.assert_array_equal(read_dicom(tmp_path / "kaggle.dcm", "k"), stored)


def test_voi_window_is_applied_before_scaling(tmp_path):
    dataset = write_cr_dicom(tmp_path / "full.dcm", "p1")
    values = dataset.pixel_array
    dataset.WindowCenter = float(np.median(values))
    dataset.WindowWidth = float(np.percentile(values, 60) - np.percentile(values, 40))
    dataset.save_as(tmp_path / "narrow.dcm")
    full = read_dicom(tmp_path / "full.dcm", "full")
    narrow = read_dicom(tmp_path / "narrow.dcm", "narrow")
    saturated = lambda image: np.mean((image == 0) | (image == 255))  # noqa: E731
    assert saturated(full) < 0.05 and saturated(narrow) > 0.6


def test_modality_rescale_is_applied(tmp_path):
    dataset = write_cr_dicom(tmp_path / "cr.dcm", "p1")
    del dataset.WindowCenter, dataset.WindowWidth
    dataset.RescaleSlope, dataset.RescaleIntercept = -1, 32767
    dataset.save_as(tmp_path / "negative_slope.dcm")
    image = read_dicom(tmp_path / "negative_slope.dcm", "slope")
    # the negative slope and the MONOCHROME1 inversion cancel: bright where stored is high
    assert np.corrcoef(image.ravel(), dataset.pixel_array.ravel())[0, 1] > 0.99


@pytest.mark.parametrize(
    ("write", "reason"),
    [
        (write_dicom_without_pixels, "no_pixel_data"),
        (write_rgb_dicom, "unsupported_photometric"),
        (write_truncated_dicom, "truncated_image"),
        (lambda path, _: write_kaggle_dicom(path, "p", side=32), "image_too_small"),
        (lambda path, _: write_zero_byte(path), "zero_byte_file"),
        (lambda path, _: write_radiograph(path, 0), "not_dicom"),
        (lambda path, _: None, "missing_file"),
    ],
)
def test_broken_dicoms_raise_their_reason(tmp_path, write, reason):
    path = tmp_path / "image.dcm"
    write(path, "p1")
    assert reason_of(read_dicom, path) == reason


def test_resize_pads_to_a_square_keeping_aspect():
    image = np.full((100, 200), 200, dtype=np.uint8)
    resized = resize_uint8(image, 64)
    assert resized.shape == (64, 64) and resized.dtype == np.uint8
    assert (resized[:16] == 0).all() and (resized[48:] == 0).all()  # black bands above, below
    assert (resized[16:48] == 200).all()  # the whole image, squeezed to 32 x 64
    box = letterbox((100, 200), 64)
    assert (box.scale, box.offset_x, box.offset_y) == (0.32, 0, 16)
