"""CheXpert (Stanford): 224,316 radiographs of 65,240 patients with 14 labels from reports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..findings import CHEXPERT_OBSERVATIONS
from .base import DatasetAdapter, RecordRef, Sample
from .images import MIN_IMAGE_SIDE, read_image
from .paths import OUTSIDE_ROOT, PathOutsideRoot, check_contained, inside
from .tables import (
    UncertainPolicy,
    broken_ref,
    check_split,
    check_uncertain_policy,
    chexpert_labels,
    raise_if_broken,
    read_rows,
    row_id,
)

CHEXPERT_SPLITS = {"train": "train", "valid": "validate"}
_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBSERVATIONS)


class CheXpert(DatasetAdapter):
    """CheXpert-v1.0 or CheXpert-v1.0-small, as unpacked::

        CheXpert-v1.0-small/            <- root
          train.csv  valid.csv
          train/patient00001/study1/view1_frontal.jpg
          valid/patient64541/study1/view1_frontal.jpg

    Each table has ``Path,Sex,Age,Frontal/Lateral,AP/PA`` and the 14 observations, with cells
    ``1.0``/``0.0``/``-1.0``/blank. ``Path`` starts with the dataset folder's own name
    (``CheXpert-v1.0-small/train/...``); that first part is replaced by ``root``, so a renamed
    folder still works. Patient id is the ``patientNNNNN`` part of the path. Frontal views
    only by default. ``uncertain``: ``keep`` (-1.0), ``ones``, ``zeros`` or ``ignore`` (drops
    the observation). ``labels_csv`` overrides the table (e.g. torchxrayvision's gzipped copy).
    """

    name = "chexpert"
    listing_files = ("*.csv",)

    def __init__(
        self,
        root: Path,
        split: str = "train",
        uncertain: UncertainPolicy = "keep",
        frontal_only: bool = True,
        labels_csv: Path | None = None,
        min_size: int = MIN_IMAGE_SIDE,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.official_split = check_split("CheXpert", split, CHEXPERT_SPLITS)
        self.uncertain = check_uncertain_policy(uncertain)
        self.frontal_only = frontal_only
        self.labels_csv = Path(labels_csv) if labels_csv else self.root / f"{split}.csv"
        self.min_size = min_size

    def records(self) -> Iterator[RecordRef]:
        for row in read_rows(self.labels_csv, _COLUMNS):
            fields = row.fields
            parts = (fields["Path"] or "").strip().split("/")  # str ops: pathlib is slow here
            if len(parts) < 4 or not parts[-1].endswith(".jpg"):
                yield broken_ref(row_id(self.labels_csv, row), "", "bad_row", f"Path {parts}")
                continue
            record_id = "/".join(parts[-3:])[: -len(".jpg")]
            patient_id = parts[-3]
            if row.problem:  # quarantined whatever its view: the row cannot be trusted
                yield broken_ref(record_id, patient_id, "bad_row", row.problem)
                continue
            if self.frontal_only and (fields["Frontal/Lateral"] or "").strip() != "Frontal":
                continue
            try:
                labels = chexpert_labels(fields, CHEXPERT_OBSERVATIONS, self.uncertain)
            except ValueError as error:
                yield broken_ref(record_id, patient_id, "bad_row", str(error))
                continue
            view = (fields["AP/PA"] or "").strip() or (fields["Frontal/Lateral"] or "").strip()
            try:
                image_path = inside(self.root, "/".join(parts[1:]))
            except PathOutsideRoot as error:
                yield broken_ref(record_id, patient_id, OUTSIDE_ROOT, str(error))
                continue
            yield RecordRef(
                record_id,
                patient_id,
                image_path,
                meta={
                    "labels": labels,
                    "view": view or None,
                    "sex": fields["Sex"],
                    "age": fields["Age"],
                },
            )

    def load(self, ref: RecordRef) -> Sample:
        raise_if_broken(ref)
        check_contained(ref, self.root)
        return Sample(
            record_id=ref.record_id,
            patient_id=ref.patient_id,
            image=read_image(ref.image_path, ref.record_id, self.min_size),
            labels=dict(ref.meta["labels"]),
            view=ref.meta["view"],
            split=self.official_split,
        )


def only_positive(labels: dict[str, float], finding: str) -> bool:
    """``finding`` is 1.0 and every other observation but ``No Finding`` is negative or blank:
    the CheXpert 5x200 condition (MGCA's preprocessing; an uncertain label disqualifies)."""
    if labels.get(finding) != 1.0:
        return False
    return all(
        labels.get(name, 0.0) == 0.0
        for name in CHEXPERT_OBSERVATIONS
        if name not in (finding, "No Finding")
    )


def five_by_200(
    refs: list[RecordRef], findings: tuple[str, ...], per_finding: int, seed: int
) -> dict[str, list[RecordRef]]:
    """CheXpert 5x200: for each finding, ``per_finding`` frontal training records (a seeded
    draw, sorted by id first) in which it alone is positive. ``refs`` carry CheXpert's raw
    labels (``uncertain="keep"``). ValueError when a finding has too few such records."""
    rng = np.random.default_rng(seed)
    chosen: dict[str, list[RecordRef]] = {}
    for finding in findings:
        pool = sorted(
            (ref for ref in refs if only_positive(ref.meta["labels"], finding)),
            key=lambda ref: ref.record_id,
        )
        if len(pool) < per_finding:
            raise ValueError(
                f"CheXpert 5x200: {len(pool)} training images have only {finding!r} positive, "
                f"{per_finding} wanted (per_finding)"
            )
        picked = rng.choice(len(pool), size=per_finding, replace=False)
        chosen[finding] = [pool[i] for i in sorted(picked)]
    return chosen
