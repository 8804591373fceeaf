"""Image decoding shared by every adapter: JPEG/PNG through PIL, DICOM through pydicom, both
ending as uint8 (H, W) grayscale with 0 = black. Every failure becomes a ``RecordError`` with
a reason ingest can count (``missing_file``, ``zero_byte_file``, ``truncated_image``, ...)."""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .base import RecordError

if TYPE_CHECKING:  # pydicom is optional: only DICOM sources (RSNA, SIIM) need it
    from pydicom import Dataset

MIN_IMAGE_SIDE = 64
"""Default smallest usable side in pixels: below it a radiograph shows no anatomy."""

MAX_PIXELS = 60_000_000
"""Pixel budget of one image (rows x columns x frames), checked from its header before any
pixel is decoded: the largest chest radiographs hold about 12 million; a file declaring more
is ``image_too_large`` (an image bomb decodes to gigabytes from a small file)."""

PERCENTILES = (0.5, 99.5)
"""Intensity percentiles mapped to 0 and 255 when more than 8 bits must become uint8."""


def check_file(path: Path, record_id: str) -> None:
    """Raise ``missing_file`` or ``zero_byte_file`` before any decoder sees ``path``."""
    if not path.is_file():
        raise RecordError(record_id, "missing_file", str(path))
    if path.stat().st_size == 0:
        raise RecordError(record_id, "zero_byte_file", str(path))


def scale_to_uint8(values: np.ndarray, record_id: str) -> np.ndarray:
    """Linearly map the ``PERCENTILES`` range of ``values`` to 0..255 (robust to a few hot or
    dead pixels); a constant image carries no information and raises ``constant_image``."""
    values = np.asarray(values, dtype=np.float32)
    low, high = np.percentile(values, PERCENTILES)
    if high <= low:
        low, high = float(values.min()), float(values.max())
    if high <= low:
        raise RecordError(record_id, "constant_image", f"every pixel is {low:g}")
    scaled = (values - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def check_size(image: np.ndarray, record_id: str, min_size: int) -> np.ndarray:
    """Raise ``image_too_small`` when either side is under ``min_size`` pixels."""
    if min(image.shape) < min_size:
        raise RecordError(
            record_id, "image_too_small", f"{image.shape[1]}x{image.shape[0]} < {min_size}"
        )
    return image


def read_image(path: Path, record_id: str, min_size: int = MIN_IMAGE_SIDE) -> np.ndarray:
    """Decode a JPEG/PNG radiograph to uint8 (H, W).

    8-bit images keep their pixel values (colour ones are converted to luminance); 16-bit and
    float images (e.g. 16-bit PNG) are scaled by ``scale_to_uint8`` rather than clipped, which
    is what PIL's own ``convert("L")`` would do. ``img.load()`` forces the full decode so a
    truncated file fails here, not later in a training worker.
    """
    path = Path(path)
    check_file(path, record_id)
    try:
        with warnings.catch_warnings(), Image.open(path) as img:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            width, height = img.size
            frames = getattr(img, "n_frames", 1)
            if width * height * frames > MAX_PIXELS:
                raise RecordError(
                    record_id, "image_too_large", f"{width}x{height}x{frames} > {MAX_PIXELS} pixels"
                )
            img.load()
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                image = scale_to_uint8(np.asarray(img), record_id)
            else:
                image = np.asarray(img.convert("L"), dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise RecordError(record_id, "image_too_large", str(error)) from error
    except UnidentifiedImageError as error:
        raise RecordError(record_id, "undecodable_image", str(error)) from error
    except OSError as error:  # PIL reports a short file as OSError("image file is truncated")
        reason = "truncated_image" if "truncated" in str(error) else "undecodable_image"
        raise RecordError(record_id, reason, str(error)) from error
    return check_size(image, record_id, min_size)


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError as error:  # pragma: no cover - pydicom is in the default environment
        raise ImportError(
            "reading DICOM (RSNA Pneumonia, SIIM-ACR) needs pydicom: pip install pydicom"
        ) from error
    return pydicom


DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
DEFLATED_HEADER_ROOM = 1 << 20  # bytes a deflated file's inflated header may take


def dicom_size_problem(path: Path) -> str | None:
    """Why a DICOM file would decode past ``MAX_PIXELS``, read from its header alone, or
    None. A deflated file is inflated first with a cap (its header is inside the deflated
    stream), so a small file that inflates to gigabytes is refused before it does."""
    pydicom = _pydicom()
    with open(path, "rb") as handle:
        pydicom.filereader.read_preamble(handle, False)
        meta = pydicom.filereader._read_file_meta_info(handle)
        if str(meta.get("TransferSyntaxUID", "")) == DEFLATED:
            cap = 4 * MAX_PIXELS + DEFLATED_HEADER_ROOM  # 16-bit pixels, two samples
            inflated = zlib.decompressobj(-zlib.MAX_WBITS).decompress(handle.read(), cap + 1)
            if len(inflated) > cap:
                return f"deflated data inflates past {cap} bytes"
    header = pydicom.dcmread(path, stop_before_pixels=True)
    rows, columns = int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0)
    frames = int(header.get("NumberOfFrames", 1) or 1)
    if rows * columns * frames > MAX_PIXELS:
        return f"{columns}x{rows}x{frames} > {MAX_PIXELS} pixels"
    return None


def open_dicom(path: Path, record_id: str) -> Dataset:
    """Parse a DICOM file (header and raw pixel bytes, nothing decoded yet), after its header
    says it fits ``MAX_PIXELS`` (``image_too_large`` otherwise)."""
    path = Path(path)
    check_file(path, record_id)
    pydicom = _pydicom()
    try:
        problem = dicom_size_problem(path)
        if problem:
            raise RecordError(record_id, "image_too_large", problem)
        return pydicom.dcmread(path)
    except RecordError:
        raise
    except pydicom.errors.InvalidDicomError as error:
        raise RecordError(record_id, "not_dicom", str(error)) from error
    except Exception as error:  # a damaged header fails in many ways; the listing goes on
        raise RecordError(record_id, "undecodable_dicom", str(error)) from error


def _expected_pixel_bytes(dataset: Dataset) -> int | None:
    """Bytes that uncompressed pixel data must hold; None for compressed transfer syntaxes."""
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and syntax.is_compressed:
        return None
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    samples = int(dataset.get("SamplesPerPixel", 1))
    bits = int(dataset.get("BitsAllocated", 16))
    return int(dataset.Rows) * int(dataset.Columns) * samples * frames * bits // 8


def dicom_pixels(dataset: Dataset, record_id: str, min_size: int = MIN_IMAGE_SIDE) -> np.ndarray:
    """Decode a DICOM dataset to uint8 (H, W), 0 = black.

    Applies the modality LUT (rescale slope/intercept) and the VOI LUT or window when present,
    then ``scale_to_uint8``; 8-bit data with neither (the Kaggle RSNA and SIIM DICOMs) keep
    their stored values. MONOCHROME1 (bright = low value) is inverted so that bone is bright;
    any other photometric interpretation (RGB, PALETTE COLOR, YBR) is ``unsupported_photometric``.
    Multi-frame data keep the first frame.
    """
    if "PixelData" not in dataset:
        raise RecordError(record_id, "no_pixel_data", "the file has no Pixel Data element")
    photometric = str(dataset.get("PhotometricInterpretation", "")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise RecordError(record_id, "unsupported_photometric", photometric or "absent")
    expected = _expected_pixel_bytes(dataset)
    if expected is not None and len(dataset.PixelData) < expected:
        raise RecordError(
            record_id, "truncated_image", f"{len(dataset.PixelData)} of {expected} pixel bytes"
        )
    pixels_module = _pydicom().pixels
    try:
        stored = dataset.pixel_array
    except Exception as error:  # decoders raise many types (missing plugin, corrupt stream)
        raise RecordError(record_id, "undecodable_pixels", str(error)) from error
    if stored.ndim == 3:
        stored = stored[0]
    has_modality = "RescaleSlope" in dataset or "ModalityLUTSequence" in dataset
    has_voi = "WindowCenter" in dataset or "VOILUTSequence" in dataset
    if stored.dtype == np.uint8 and not has_modality and not has_voi:
        image = stored.copy()
    else:
        values = pixels_module.apply_modality_lut(stored, dataset)
        values = pixels_module.apply_voi_lut(values, dataset, index=0)
        image = scale_to_uint8(values, record_id)
    if photometric == "MONOCHROME1":
        image = 255 - image
    return check_size(image, record_id, min_size)


def read_dicom(path: Path, record_id: str, min_size: int = MIN_IMAGE_SIDE) -> np.ndarray:
    """Decode one DICOM file to uint8 (H, W), 0 = black (see ``dicom_pixels``)."""
    return dicom_pixels(open_dicom(path, record_id), record_id, min_size)


@dataclass(frozen=True)
class DicomImage:
    """A decoded DICOM with the header fields adapters use: ``view`` is ViewPosition (PA, AP,
    LL, ...) and ``patient_id`` PatientID, None when absent."""

    image: np.ndarray
    view: str | None
    patient_id: str | None


def read_dicom_image(path: Path, record_id: str, min_size: int = MIN_IMAGE_SIDE) -> DicomImage:
    """``read_dicom`` plus the view and patient id from the same header read."""
    dataset = open_dicom(path, record_id)
    image = dicom_pixels(dataset, record_id, min_size)
    view = str(dataset.get("ViewPosition", "")).strip() or None
    patient_id = str(dataset.get("PatientID", "")).strip() or None
    return DicomImage(image, view, patient_id)


def dicom_patient_id(path: Path) -> str | None:
    """PatientID from a DICOM header alone (no pixels read: cheap enough for a listing);
    None when the file is missing or unreadable, which ``load`` then reports properly."""
    try:
        if dicom_size_problem(path):  # load reports it; the listing reads no bomb
            return None
        dataset = _pydicom().dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    except Exception:  # any unreadable file: the listing must go on
        return None
    return str(dataset.get("PatientID", "")).strip() or None


def clip_boxes(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Clip (n, 4) x0, y0, x1, y1 boxes to an (H, W) image; float32 (n, 4)."""
    height, width = shape
    clipped = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    clipped[:, 0::2] = np.clip(clipped[:, 0::2], 0, width)
    clipped[:, 1::2] = np.clip(clipped[:, 1::2], 0, height)
    return clipped


@dataclass(frozen=True)
class Letterbox:
    """How ``resize_uint8`` placed an image: multiply source pixel coordinates by ``scale``,
    then add ``offset_x``/``offset_y``, to get coordinates in the resized image (boxes too)."""

    scale: float
    offset_x: int
    offset_y: int
    height: int
    width: int


def letterbox(shape: tuple[int, int], size: int) -> Letterbox:
    """Geometry that fits an (H, W) image inside a ``size`` x ``size`` square, keeping aspect."""
    height, width = shape
    scale = size / max(height, width)
    new_height = max(1, round(height * scale))
    new_width = max(1, round(width * scale))
    return Letterbox(
        scale, (size - new_width) // 2, (size - new_height) // 2, new_height, new_width
    )


def resize_uint8(image: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 (H, W) to (size, size), keeping aspect and padding with black.

    Padding rather than centre-cropping: a crop would cut off costophrenic angles, apices or
    lateral pneumothoraces, and annotations would leave the frame; with padding every box and
    mask maps through ``letterbox`` and stays inside.
    """
    box = letterbox(image.shape, size)
    resized = Image.fromarray(image).resize((box.width, box.height), Image.Resampling.BILINEAR)
    canvas = np.zeros((size, size), dtype=np.uint8)
    canvas[box.offset_y : box.offset_y + box.height, box.offset_x : box.offset_x + box.width] = (
        np.asarray(resized)
    )
    return canvas


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A bool (H, W) mask placed the way ``resize_uint8`` places its image (nearest)."""
    box = letterbox(mask.shape, size)
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize(
        (box.width, box.height), Image.Resampling.NEAREST
    )
    canvas = np.zeros((size, size), dtype=bool)
    canvas[box.offset_y : box.offset_y + box.height, box.offset_x : box.offset_x + box.width] = (
        np.asarray(resized) > 127
    )
    return canvas


def resize_boxes(boxes: np.ndarray, shape: tuple[int, int], size: int) -> np.ndarray:
    """(n, 4) x0, y0, x1, y1 boxes of an (H, W) image, in pixels of its ``resize_uint8``."""
    box = letterbox(shape, size)
    mapped = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * box.scale
    mapped[:, 0::2] += box.offset_x
    mapped[:, 1::2] += box.offset_y
    return clip_boxes(mapped, (size, size))


def boxes_mask(boxes: np.ndarray, size: int) -> np.ndarray:
    """Bool (size, size) mask of the union of (n, 4) x0, y0, x1, y1 pixel boxes: the
    segmentation target of a set annotated with boxes only (RSNA, as MGCA segments it)."""
    mask = np.zeros((size, size), bool)
    for x0, y0, x1, y1 in np.asarray(boxes, np.float32).reshape(-1, 4):
        left, top = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
        right, bottom = min(size, int(np.ceil(x1))), min(size, int(np.ceil(y1)))
        mask[top:bottom, left:right] = True
    return mask
