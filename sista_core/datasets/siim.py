"""SIIM-ACR Pneumothorax Segmentation (Kaggle, 2019): pneumothorax masks as run lengths."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .base import DatasetAdapter, RecordError, RecordRef, Sample
from .images import MIN_IMAGE_SIDE, dicom_patient_id, read_dicom_image
from .paths import OUTSIDE_ROOT, PathOutsideRoot, check_contained, inside
from .rle import EMPTY_RLE, rle_decode
from .tables import broken_ref, first_problem, group_rows, raise_if_broken, read_rows

PNEUMOTHORAX = "Pneumothorax"


class SiimPneumothorax(DatasetAdapter):
    """SIIM-ACR Pneumothorax, as distributed for the Kaggle challenge::

        siim-acr-pneumothorax/                    <- root
          train-rle.csv                           ImageId, EncodedPixels  (note the space)
          dicom-images-train/<study UID>/<series UID>/<ImageId>.dcm   1024 x 1024, 8-bit

    ``EncodedPixels`` is ``-1`` for no pneumothorax or one mask part in SIIM's relative,
    column-major run-length code (``rle.py``); an image with several parts has several rows,
    merged here into one mask. DICOMs are found by name anywhere under ``images_dir`` (the
    study/series folders are not in the table). The patient id is the DICOM PatientID, read
    from the header alone during listing (the ImageId when the file cannot be read; ``load``
    then reports why). Label ``Pneumothorax`` 1.0/0.0 and the bool mask.
    """

    name = "siim_pneumothorax"

    def __init__(
        self,
        root: Path,
        rle_csv: Path | None = None,
        images_dir: str = "dicom-images-train",
        min_size: int = MIN_IMAGE_SIDE,
    ) -> None:
        self.root = Path(root)
        self.rle_csv = Path(rle_csv) if rle_csv else self.root / "train-rle.csv"
        self.images = self.root / images_dir
        self.min_size = min_size
        self._dicom_paths: dict[str, Path] | None = None

    def dicom_paths(self) -> dict[str, Path]:
        """ImageId -> DICOM path over the whole image tree, found once."""
        if self._dicom_paths is None:
            self._dicom_paths = {path.stem: path for path in sorted(self.images.rglob("*.dcm"))}
        return self._dicom_paths

    def records(self) -> Iterator[RecordRef]:
        groups, orphans = group_rows(
            self.rle_csv, read_rows(self.rle_csv, ("ImageId", "EncodedPixels")), "ImageId"
        )
        yield from orphans
        paths = self.dicom_paths()
        for image_id, rows in groups.items():
            problem = first_problem(rows)
            if problem:
                yield broken_ref(image_id, image_id, "bad_row", problem)
                continue
            try:
                path = paths.get(image_id) or inside(self.images, f"{image_id}.dcm")
            except PathOutsideRoot as error:
                yield broken_ref(image_id, image_id, OUTSIDE_ROOT, str(error))
                continue
            parts = [(row.fields["EncodedPixels"] or "").strip() for row in rows]
            yield RecordRef(
                image_id,
                dicom_patient_id(path) or image_id,
                path,
                meta={"rle": [part for part in parts if part not in ("", EMPTY_RLE)]},
            )

    def load(self, ref: RecordRef) -> Sample:
        raise_if_broken(ref)
        check_contained(ref, self.root)
        dicom = read_dicom_image(ref.image_path, ref.record_id, self.min_size)
        height, width = dicom.image.shape
        mask = np.zeros((height, width), dtype=bool)
        for part in ref.meta["rle"]:
            try:
                mask |= rle_decode(part, height, width)
            except ValueError as error:
                raise RecordError(ref.record_id, "bad_mask", str(error)) from error
        return Sample(
            record_id=ref.record_id,
            patient_id=ref.patient_id,
            image=dicom.image,
            labels={PNEUMOTHORAX: 1.0 if ref.meta["rle"] else 0.0},
            mask=mask,
            view=dicom.view,
            split="train",
        )
