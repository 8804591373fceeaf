"""Embedded downstream segmentation and detection sets: phantom films whose target finding is
drawn where a real annotation put it (labelled synthetic: the annotations are real, the
images are not).

- `PhantomPneumothoraxSegmentation`: positives take a real SIIM-ACR pneumothorax mask (a row
  of the RLE table torchxrayvision ships), negatives have none.
- `PhantomOpacityDetection`: positives take a real RSNA Pneumonia image's opacity boxes
  (1-4, as in the table), negatives have none.

Each record's other findings follow a row of the real CheXpert label table (so negatives are
not all clean films), less the observations that would look like the target. The masks,
boxes and label are what was drawn (a real annotation that lands outside the phantom's lungs
draws nothing and makes a negative). Annotations map from the 1024 x 1024 source films into
the phantom's thorax through `RADIOGRAPH_LUNG_BOX` (see `sista_core.phantom.placement`).

Record ids (``seg-00000``, ``det-00000``) differ from the classification set's
(``ds-00000``) and from pre-training's (Open-I report ids), and every record renders from
its own seed, so no phantom patient is shared. A record depends only on (seed, record id,
positive fraction): a larger set begins with the smaller one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from ..assets import RSNA_BOXES, SIIM_RLE, xrv_data_file
from ..findings import Finding
from ..phantom import Placement, render
from .base import DatasetAdapter, RecordRef, Sample
from .embedded import read_chexpert_label_rows, record_seed
from .rle import SIIM_SIZE, rle_decode
from .rsna import RsnaPneumonia
from .siim import PNEUMOTHORAX, SiimPneumothorax
from .tables import ROW_ERROR

LUNG_OPACITY = "Lung Opacity"
RSNA_SIZE = 1024  # RSNA's films, like SIIM's, are 1024 x 1024


@dataclass(frozen=True)
class AnnotationTable:
    """The usable positive rows of a real annotation table, as (source image id,
    annotation), and the share of the table's images that are positive."""

    positives: tuple[tuple[str, Any], ...]
    positive_fraction: float


def _positives(adapter: DatasetAdapter, annotation_key: str) -> AnnotationTable:
    """The positive rows an adapter lists from its table alone (the images are not shipped,
    so nothing else is read); rows the adapter finds broken are left out."""
    refs = [ref for ref in adapter.records() if ROW_ERROR not in ref.meta]
    positives = tuple(
        (ref.record_id, ref.meta[annotation_key]) for ref in refs if len(ref.meta[annotation_key])
    )
    return AnnotationTable(positives, len(positives) / len(refs))


@lru_cache(maxsize=1)
def siim_table() -> AnnotationTable:
    """SIIM-ACR's train RLE table: annotation = the image's mask parts (RLE strings)."""
    path = xrv_data_file(SIIM_RLE)
    return _positives(SiimPneumothorax(path.parent, rle_csv=path), "rle")


@lru_cache(maxsize=1)
def rsna_table() -> AnnotationTable:
    """RSNA Pneumonia's stage-2 train labels: annotation = the image's boxes, float32 (n, 4)
    x0, y0, x1, y1 in pixels of its 1024 x 1024 film."""
    path = xrv_data_file(RSNA_BOXES)
    return _positives(RsnaPneumonia(path.parent, labels_csv=path), "boxes")


@lru_cache(maxsize=1)
def chexpert_rows() -> tuple[dict[str, float], ...]:
    """The real CheXpert frontal label rows, read once per process (the table is large)."""
    return tuple(read_chexpert_label_rows())


def siim_placement(parts: list[str]) -> Placement:
    """A SIIM image's pneumothorax (its RLE parts merged) as a placement."""
    # Merged column-major, the order the runs are stored in (OR-ing the transposed views
    # that `rle_decode` returns is ten times slower).
    by_column = np.zeros((SIIM_SIZE, SIIM_SIZE), dtype=bool)
    for part in parts:
        by_column |= rle_decode(part).T
    return Placement(mask=by_column.T)


def rsna_placement(boxes: np.ndarray) -> Placement:
    """An RSNA image's opacity boxes (pixels of its 1024 film) as a placement."""
    return Placement.from_pixel_boxes(boxes, RSNA_SIZE, RSNA_SIZE)


def background_findings(row: dict[str, float], excluded: frozenset[str]) -> list[Finding]:
    """A CheXpert label row as findings (positive and uncertain), less ``excluded``."""
    return [
        Finding(name, "positive" if value == 1.0 else "uncertain")
        for name, value in row.items()
        if value in (1.0, -1.0) and name != "No Finding" and name not in excluded
    ]


class PlacedFindingDataset(DatasetAdapter):
    """Phantoms whose ``target`` finding, when present, is placed by a real annotation.

    ``positive_fraction`` None follows the real table's share of positive images. Subclasses
    name the target, the id prefix, the table, how an annotation becomes a `Placement`, and
    which background observations would be confused with the target.
    """

    target: str
    prefix: str
    confusable: frozenset[str]

    def __init__(
        self,
        num_patients: int,
        image_size: int = 128,
        seed: int = 0,
        positive_fraction: float | None = None,
    ) -> None:
        if positive_fraction is not None and not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction {positive_fraction} is not in [0, 1]")
        self.num_patients, self.image_size, self.seed = num_patients, image_size, seed
        self.positive_fraction = positive_fraction

    def table(self) -> AnnotationTable:
        raise NotImplementedError

    def placement(self, annotation: Any) -> Placement:
        raise NotImplementedError

    def records(self) -> Iterator[RecordRef]:
        table, background = self.table(), chexpert_rows()
        fraction = self.positive_fraction
        if fraction is None:
            fraction = table.positive_fraction
        # Fixed permutations keyed by the seed: record n takes entry n of each, so real
        # annotations repeat only once a set outgrows its table.
        annotations = np.random.default_rng([self.seed, 1]).permutation(len(table.positives))
        rows = np.random.default_rng([self.seed, 2]).permutation(len(background))
        for number in range(self.num_patients):
            record_id = f"{self.prefix}-{number:05d}"
            coin = np.random.default_rng(record_seed(self.seed, f"{record_id}/positive"))
            meta: dict[str, Any] = {"chexpert_row": background[rows[number % len(rows)]]}
            if coin.random() < fraction:
                source_id, annotation = table.positives[annotations[number % len(annotations)]]
                meta.update(source_id=source_id, annotation=annotation)
            yield RecordRef(record_id, record_id, meta=meta)

    def load(self, ref: RecordRef) -> Sample:
        findings = background_findings(ref.meta["chexpert_row"], self.confusable)
        placements = {}
        if "annotation" in ref.meta:
            findings.append(Finding(self.target))
            placements[self.target] = self.placement(ref.meta["annotation"])
        phantom = render(
            findings,
            seed=record_seed(self.seed, ref.record_id),
            size=self.image_size,
            placements=placements,
        )
        size = self.image_size
        mask = phantom.masks.get(self.target, np.zeros((size, size), dtype=bool))
        boxes = phantom.boxes.get(self.target, np.zeros((0, 4), dtype=np.float32))
        return Sample(
            record_id=ref.record_id,
            patient_id=ref.patient_id,
            image=phantom.image,
            labels={self.target: float(mask.any())},
            boxes=boxes,
            mask=mask,
            view=phantom.view,
        )


class PhantomPneumothoraxSegmentation(PlacedFindingDataset):
    """Pneumothorax segmentation: ``Sample.mask`` is the drawn pleural air (real SIIM masks
    mapped into the phantom), ``boxes`` one per side, ``labels`` {"Pneumothorax": 0/1}."""

    name = "siim_phantom"
    target = PNEUMOTHORAX
    prefix = "seg"
    confusable = frozenset({PNEUMOTHORAX})

    def table(self) -> AnnotationTable:
        return siim_table()

    def placement(self, annotation: list[str]) -> Placement:
        return siim_placement(annotation)


class PhantomOpacityDetection(PlacedFindingDataset):
    """Lung-opacity detection: ``Sample.boxes`` one per drawn opacity (real RSNA boxes
    mapped into the phantom, clipped to the lungs), ``mask`` their union (for opacity
    segmentation), ``labels`` {"Lung Opacity": 0/1}. Consolidation and pneumonia are left
    out of the background findings: a reader would box them too."""

    name = "rsna_phantom"
    target = LUNG_OPACITY
    prefix = "det"
    confusable = frozenset({LUNG_OPACITY, "Consolidation", "Pneumonia"})

    def table(self) -> AnnotationTable:
        return rsna_table()

    def placement(self, annotation: np.ndarray) -> Placement:
        return rsna_placement(annotation)
