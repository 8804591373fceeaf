"""COVIDx CXR (COVID-Net): radiographs pooled from several public sources, one class each."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from .base import DatasetAdapter, RecordRef, Sample
from .images import MIN_IMAGE_SIDE, read_image
from .paths import OUTSIDE_ROOT, PathOutsideRoot, check_contained, inside
from .tables import broken_ref, check_split, raise_if_broken

COVIDX_CLASSES: tuple[str, ...] = ("normal", "pneumonia", "COVID-19")
"""Classes of COVIDx v1 to v7A, 8A, CXR-3A (normal / non-COVID pneumonia / COVID-19)."""
COVIDX_BINARY_CLASSES: tuple[str, ...] = ("negative", "positive")
"""Classes of COVIDx 7B, 8B, CXR-2, CXR-3B, CXR-4 (COVID-19 negative / positive)."""
COVIDX_SPLITS = {"train": "train", "val": "validate", "test": "test"}


class Covidx(DatasetAdapter):
    """COVIDx CXR, as built by COVID-Net's scripts or downloaded from Kaggle::

        covidx-cxr/                   <- root
          train.txt  val.txt  test.txt
          train/<filename>  val/<filename>  test/<filename>

    Each line of ``<split>.txt`` is ``patient_id filename class source`` separated by
    spaces, e.g. ``3 SARS-10.1148rg.242035193-g04mr34g0-Fig8a-day0.jpeg pneumonia cohen``
    (a filename with spaces is everything between the first and the last two fields).
    ``classes`` lists the class names of the release in use; ``labels`` is then one-hot over
    them (a single-label target), and ``class_index`` in ``RecordRef.meta`` gives the index.
    A class outside ``classes`` is a ``bad_row``.
    """

    name = "covidx"
    listing_files = ("*.txt",)

    def __init__(
        self,
        root: Path,
        split: str = "train",
        classes: Sequence[str] = COVIDX_CLASSES,
        min_size: int = MIN_IMAGE_SIDE,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.official_split = check_split("COVIDx", split, COVIDX_SPLITS)
        self.classes = tuple(classes)
        self.table = self.root / f"{split}.txt"
        self.min_size = min_size

    def records(self) -> Iterator[RecordRef]:
        if not self.table.is_file():
            raise FileNotFoundError(f"COVIDx split file {self.table} not found")
        with open(self.table, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) < 4:
                    yield broken_ref(
                        f"{self.table.name}:{line_number}",
                        fields[0],
                        "bad_row",
                        f"{len(fields)} fields, expected patient_id filename class source",
                    )
                    continue
                patient_id, label, source = fields[0], fields[-2], fields[-1]
                filename = " ".join(fields[1:-2])
                if label not in self.classes:
                    detail = f"class {label!r} not in {self.classes}"
                    yield broken_ref(filename, patient_id, "bad_row", detail)
                    continue
                try:
                    image_path = inside(self.root, f"{self.split}/{filename}")
                except PathOutsideRoot as error:
                    yield broken_ref(filename, patient_id, OUTSIDE_ROOT, str(error))
                    continue
                yield RecordRef(
                    filename,
                    patient_id,
                    image_path,
                    meta={"class_index": self.classes.index(label), "source": source},
                )

    def load(self, ref: RecordRef) -> Sample:
        raise_if_broken(ref)
        check_contained(ref, self.root)
        index = ref.meta["class_index"]
        return Sample(
            record_id=ref.record_id,
            patient_id=ref.patient_id,
            image=read_image(ref.image_path, ref.record_id, self.min_size),
            labels={name: float(i == index) for i, name in enumerate(self.classes)},
            split=self.official_split,
        )
