"""Object-CXR (JF Healthcare, MIDL 2020): foreign objects on frontal chest radiographs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .base import DatasetAdapter, RecordError, RecordRef, Sample
from .images import MIN_IMAGE_SIDE, clip_boxes, read_image
from .paths import OUTSIDE_ROOT, PathOutsideRoot, check_contained, inside
from .tables import broken_ref, check_split, raise_if_broken, read_rows, row_id

FOREIGN_OBJECT = "foreign_object"
"""The binary target: any annotated foreign object (buttons, jewellery, clips...). Not CheXpert's
``Support Devices``: the annotators excluded support devices."""
OBJECT_CXR_SPLITS = {"train": "train", "dev": "validate"}
RECTANGLE, ELLIPSE, POLYGON = 0, 1, 2


@dataclass(frozen=True)
class ForeignObject:
    """One annotated shape: ``kind`` 0 rectangle, 1 ellipse (both given by their bounding box
    x1 y1 x2 y2), 2 polygon (x1 y1 ... xn yn); ``points`` (k, 2) float32 pixels."""

    kind: int
    points: np.ndarray

    @property
    def box(self) -> tuple[float, float, float, float]:
        """x0, y0, x1, y1 enclosing the shape."""
        x0, y0 = self.points.min(axis=0)
        x1, y1 = self.points.max(axis=0)
        return float(x0), float(y0), float(x1), float(y1)


def parse_annotation(annotation: str) -> list[ForeignObject]:
    """``"0 x1 y1 x2 y2;2 x1 y1 x2 y2 x3 y3"`` -> shapes; empty string -> none. ValueError
    for an unknown type or a wrong count of coordinates."""
    shapes = []
    for part in annotation.split(";"):
        numbers = part.split()
        if not numbers:
            continue
        kind = int(numbers[0])
        coordinates = [float(value) for value in numbers[1:]]
        if kind not in (RECTANGLE, ELLIPSE, POLYGON):
            raise ValueError(f"unknown annotation type {kind} in {part!r}")
        if kind in (RECTANGLE, ELLIPSE) and len(coordinates) != 4:
            raise ValueError(f"type {kind} needs x1 y1 x2 y2, got {part!r}")
        if kind == POLYGON and (len(coordinates) < 6 or len(coordinates) % 2):
            raise ValueError(f"a polygon needs 3 or more x y pairs, got {part!r}")
        shapes.append(ForeignObject(kind, np.asarray(coordinates, np.float32).reshape(-1, 2)))
    return shapes


def rasterize(shapes: list[ForeignObject], shape: tuple[int, int]) -> np.ndarray:
    """Bool mask (H, W) covering every shape, filled."""
    height, width = shape
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for item in shapes:
        if item.kind == POLYGON:
            draw.polygon([tuple(point) for point in item.points.tolist()], fill=255)
        elif item.kind == ELLIPSE:
            draw.ellipse(item.box, fill=255)
        else:
            draw.rectangle(item.box, fill=255)
    return np.asarray(canvas) > 0


class ObjectCxr(DatasetAdapter):
    """Object-CXR challenge data, as released (train and dev)::

        object-CXR/            <- root
          train.csv  dev.csv   image_name,annotation
          train/00001.jpg  dev/08001.jpg

    ``annotation`` is empty for an image without foreign objects, else ``;``-separated shapes
    ``TYPE x1 y1 x2 y2`` (0 rectangle, 1 ellipse: the bounding box) or ``2 x1 y1 ... xn yn``
    (polygon), in pixels of the full-size image, origin top left. Boxes enclose each shape
    (clipped to the image), the mask fills them, label ``foreign_object`` 1.0/0.0. The images
    carry no patient id; the image name stands in for it. A malformed annotation is
    ``bad_annotation``.
    """

    name = "object_cxr"
    listing_files = ("*.csv",)

    def __init__(self, root: Path, split: str = "train", min_size: int = MIN_IMAGE_SIDE) -> None:
        self.root = Path(root)
        self.split = split
        self.official_split = check_split("Object-CXR", split, OBJECT_CXR_SPLITS)
        self.table = self.root / f"{split}.csv"
        self.min_size = min_size

    def records(self) -> Iterator[RecordRef]:
        for row in read_rows(self.table, ("image_name", "annotation")):
            image_name = (row.fields["image_name"] or "").strip()
            record_id = Path(image_name).stem or row_id(self.table, row)
            if row.problem or not image_name:
                yield broken_ref(record_id, record_id, "bad_row", row.problem or "no image_name")
                continue
            try:
                image_path = inside(self.root, f"{self.split}/{image_name}")
            except PathOutsideRoot as error:
                yield broken_ref(record_id, record_id, OUTSIDE_ROOT, str(error))
                continue
            yield RecordRef(
                record_id,
                record_id,
                image_path,
                meta={"annotation": (row.fields["annotation"] or "").strip()},
            )

    def load(self, ref: RecordRef) -> Sample:
        raise_if_broken(ref)
        check_contained(ref, self.root)
        try:
            shapes = parse_annotation(ref.meta["annotation"])
        except ValueError as error:
            raise RecordError(ref.record_id, "bad_annotation", str(error)) from error
        image = read_image(ref.image_path, ref.record_id, self.min_size)
        boxes = clip_boxes(np.asarray([item.box for item in shapes]), image.shape)
        return Sample(
            record_id=ref.record_id,
            patient_id=ref.patient_id,
            image=image,
            labels={FOREIGN_OBJECT: 1.0 if shapes else 0.0},
            boxes=boxes,
            mask=rasterize(shapes, image.shape),
            split=self.official_split,
        )
