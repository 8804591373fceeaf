"""The contract every dataset adapter follows (torchxrayvision's pattern: one small class per
source format, all yielding the same sample shape)."""

from __future__ import annotations

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

    def records(self) -> Iterator[RecordRef]:
        raise NotImplementedError

    def load(self, ref: RecordRef) -> Sample:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Sample]:
        for ref in self.records():
            yield self.load(ref)
