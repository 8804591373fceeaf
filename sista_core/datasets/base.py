"""The contract every dataset adapter follows (torchxrayvision's pattern: one small class per
source format, all yielding the same sample shape)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class RecordError(Exception):
    """One record cannot be used. Carries the record id and a short machine-readable reason
    (e.g. ``truncated_image``, ``missing_file``, ``empty_report``) so ingest can quarantine it
    and count it instead of dropping it silently."""

    def __init__(self, record_id: str, reason: str, detail: str = "") -> None:
        self.record_id, self.reason, self.detail = record_id, reason, detail
        super().__init__(f"record {record_id}: {reason}" + (f" ({detail})" if detail else ""))


@dataclass
class RecordRef:
    """A pointer to one record, cheap to list; ``load`` turns it into a ``Sample``."""

    record_id: str
    patient_id: str
    image_path: Path | None = None
    meta: dict = field(default_factory=dict)

    def files(self) -> list[Path]:
        """The files ``load`` reads for this record: its image and any path in ``meta``."""
        paths = [self.image_path, *self.meta.values()]
        return [path for path in paths if isinstance(path, Path)]

    def relocated(self, old_root: Path, new_root: Path) -> RecordRef:
        """The same record with its files below ``old_root`` read below ``new_root``."""
        meta = {key: _moved(value, old_root, new_root) for key, value in self.meta.items()}
        image_path = _moved(self.image_path, old_root, new_root)
        return RecordRef(self.record_id, self.patient_id, image_path, meta)


def _moved(value, old_root: Path, new_root: Path):
    if isinstance(value, Path) and value.is_relative_to(old_root):
        return new_root / value.relative_to(old_root)
    return value


@dataclass
class Sample:
    """One image with whatever the source annotates.

    image: uint8 (H, W), grayscale, 0 = black (MONOCHROME2 convention, already inverted where
    the source stores MONOCHROME1). labels: observation name -> 1.0 positive, 0.0 negative,
    -1.0 uncertain (CheXpert convention); absent = not mentioned. boxes: (n, 4) float32
    x0, y0, x1, y1 in pixels of ``image``. mask: bool (H, W). report: free text or None.
    split: the source's official split when it has one ("train", "validate", "test").
    """

    record_id: str
    patient_id: str
    image: np.ndarray
    labels: dict[str, float] = field(default_factory=dict)
    boxes: np.ndarray | None = None
    mask: np.ndarray | None = None
    report: str | None = None
    view: str | None = None
    split: str | None = None


class DatasetAdapter:
    """Base class: ``records()`` lists references without reading pixels; ``load(ref)``
    reads one record and raises ``RecordError`` when it cannot be used."""

    name: str = "dataset"
    listing_files: tuple[str, ...] = ("**",)
    """The files ``records()`` reads, as patterns relative to the dataset's root (``*.csv``:
    the tables at the top; ``**``: everything). A remote copy of the dataset needs these
    before listing; the other files are fetched record by record, for ``load``."""

    def records(self) -> Iterator[RecordRef]:
        raise NotImplementedError

    def load(self, ref: RecordRef) -> Sample:
        raise NotImplementedError

    def relocated(self, old_root: Path, new_root: Path) -> DatasetAdapter:
        """This adapter reading a copy of its files moved from ``old_root`` to ``new_root``
        (paired with :meth:`RecordRef.relocated`): every path attribute below ``old_root``
        is moved, in nested adapters too."""
        moved = copy.copy(self)
        for key, value in vars(self).items():
            if isinstance(value, DatasetAdapter):
                value = value.relocated(old_root, new_root)
            elif isinstance(value, dict):
                value = {
                    k: v.relocated(old_root, new_root)
                    if isinstance(v, DatasetAdapter)
                    else _moved(v, old_root, new_root)
                    for k, v in value.items()
                }
            setattr(moved, key, _moved(value, old_root, new_root))
        return moved

    def __iter__(self) -> Iterator[Sample]:
        for ref in self.records():
            yield self.load(ref)
