"""RSNA Pneumonia Detection Challenge (Kaggle, 2018): lung-opacity boxes on NIH radiographs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .base import DatasetAdapter, RecordRef, Sample
from .images import MIN_IMAGE_SIDE, clip_boxes, read_dicom_image
from .paths import OUTSIDE_ROOT, PathOutsideRoot, check_contained, inside
from .tables import Row, broken_ref, first_problem, group_rows, raise_if_broken, read_rows

_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
RSNA_LABELS = ("Pneumonia", "Lung Opacity")


def parse_rsna_boxes(rows: list[Row]) -> tuple[np.ndarray, float]:
    """All rows of one image -> (boxes (n, 4) float32 x0, y0, x1, y1, target 0/1).

    A ``Target`` 1 row holds one box ``x,y,width,height`` in pixels of the 1024 x 1024 image;
    a ``Target`` 0 row holds none. ValueError when rows disagree or a box is malformed.
    """
    targets = {(row.fields["Target"] or "").strip() for row in rows}
    if targets == {"0"}:
        if any((row.fields[name] or "").strip() for row in rows for name in _COLUMNS[1:5]):
            raise ValueError("a Target 0 row has box coordinates")
        return np.zeros((0, 4), dtype=np.float32), 0.0
    if targets != {"1"}:
        raise ValueError(f"Target values {sorted(targets)}; expected all 0 or all 1")
    boxes = []
    for row in rows:
        x, y, width, height = (float(row.fields[name] or "nan") for name in _COLUMNS[1:5])
        if not (width > 0 and height > 0 and x >= 0 and y >= 0):
            raise ValueError(f"line {row.line}: box x={x} y={y} width={width} height={height}")
        boxes.append((x, y, x + width, y + height))
    return np.asarray(boxes, dtype=np.float32), 1.0


class RsnaPneumonia(DatasetAdapter):
    """RSNA Pneumonia Detection, Kaggle stage 2, as downloaded::

        rsna-pneumonia-detection-challenge/       <- root
          stage_2_train_labels.csv                patientId,x,y,width,height,Target
          stage_2_train_images/<patientId>.dcm    1024 x 1024, 8-bit MONOCHROME2

    One row per box (an image with k opacities has k rows; a negative image one row with
    empty coordinates), aggregated per image. ``patientId`` names one image and is used as
    both record and patient id. Labels ``Pneumonia`` and ``Lung Opacity`` both equal
    ``Target`` (the challenge's positives are pneumonia-compatible opacities). ``labels_csv``
    may be the zip torchxrayvision ships.
    """

    name = "rsna_pneumonia"
    listing_files = ("*.csv",)

    def __init__(
        self,
        root: Path,
        labels_csv: Path | None = None,
        images_dir: str = "stage_2_train_images",
        min_size: int = MIN_IMAGE_SIDE,
    ) -> None:
        self.root = Path(root)
        self.labels_csv = Path(labels_csv) if labels_csv else self.root / "stage_2_train_labels.csv"
        self.images = self.root / images_dir
        self.min_size = min_size

    def records(self) -> Iterator[RecordRef]:
        groups, orphans = group_rows(
            self.labels_csv, read_rows(self.labels_csv, _COLUMNS), "patientId"
        )
        yield from orphans
        for patient_id, rows in groups.items():
            problem = first_problem(rows)
            try:
                if problem:
                    raise ValueError(problem)
                boxes, target = parse_rsna_boxes(rows)
            except ValueError as error:
                yield broken_ref(patient_id, patient_id, "bad_row", str(error))
                continue
            try:
                image_path = inside(self.images, f"{patient_id}.dcm")
            except PathOutsideRoot as error:
                yield broken_ref(patient_id, patient_id, OUTSIDE_ROOT, str(error))
                continue
            yield RecordRef(
                patient_id,
                patient_id,
                image_path,
                meta={"boxes": boxes, "target": target},
            )

    def load(self, ref: RecordRef) -> Sample:
        raise_if_broken(ref)
        check_contained(ref, self.root)
        dicom = read_dicom_image(ref.image_path, ref.record_id, self.min_size)
        target = ref.meta["target"]
        return Sample(
            record_id=ref.record_id,
            patient_id=ref.patient_id,
            image=dicom.image,
            labels=dict.fromkeys(RSNA_LABELS, target),
            boxes=clip_boxes(ref.meta["boxes"], dicom.image.shape),
            view=dicom.view,
            split="train",
        )
