"""The ingest stage's output format, which the later stages read: images (and masks) as
uint8 ``.npy`` shards below ``shards/``, each manifest row naming its shard and index, and the
training subsets of each downstream set as id lists."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np


class ShardWriter:
    """Buffers images per split and writes ``<dataset>-<split>-<k>.npy`` of ``shard_size``,
    and the records' masks, when given, as ``<dataset>-<split>-<k>.mask.npy``."""

    def __init__(self, folder: Path, dataset: str, shard_size: int):
        self.folder, self.dataset, self.shard_size = folder, dataset, shard_size
        self.buffers: dict[str, list[np.ndarray]] = {}
        self.mask_buffers: dict[str, list[np.ndarray]] = {}
        self.counts: Counter[str] = Counter()

    def add(self, split: str, image: np.ndarray, mask: np.ndarray | None = None) -> tuple[str, int]:
        buffer = self.buffers.setdefault(split, [])
        shard = f"{self.dataset}-{split}-{self.counts[split] // self.shard_size:05d}.npy"
        position = len(buffer)
        # Copies: a view would keep its whole loaded block in Ray's object store until this
        # split's shard fills (a small split's shard: most of the dataset's blocks).
        buffer.append(np.array(image))
        if mask is not None:
            self.mask_buffers.setdefault(split, []).append(np.array(mask))
        self.counts[split] += 1
        if len(buffer) == self.shard_size:
            self._flush(split)
        return shard, position

    def _flush(self, split: str) -> None:
        buffer = self.buffers.pop(split, [])
        masks = self.mask_buffers.pop(split, [])
        if buffer:
            shard = (self.counts[split] - 1) // self.shard_size
            name = f"{self.dataset}-{split}-{shard:05d}"
            np.save(self.folder / f"{name}.npy", np.stack(buffer))
            if masks:
                np.save(self.folder / f"{name}.mask.npy", np.stack(masks))

    def close(self) -> None:
        for split in list(self.buffers):
            self._flush(split)


def read_shard_images(ingest_dir: Path, rows: list[dict[str, Any]]) -> np.ndarray:
    """The images of manifest ``rows`` (B, H, W) uint8, each shard opened (memory-mapped)
    once: the reader of this stage's declared output for the stages that follow."""
    return ShardImages(ingest_dir, rows)[:]


class ShardImages:
    """The images of manifest ``rows``, read on demand from memory-mapped shards: indexing
    with positions returns copies of those rows only (B, H, W) uint8, so a reader's memory
    does not grow with the number of images (the page cache holds what is hot)."""

    def __init__(self, ingest_dir: Path, rows: list[dict[str, Any]]) -> None:
        names = sorted({row["shard"] for row in rows})
        self._shards = [np.load(ingest_dir / "shards" / name, mmap_mode="r") for name in names]
        number = {name: i for i, name in enumerate(names)}
        self._shard_of = np.array([number[row["shard"]] for row in rows], np.int32)
        self._index_in_shard = np.array([row["index"] for row in rows], np.int64)

    def __len__(self) -> int:
        return len(self._shard_of)

    def __getitem__(self, positions: slice | np.ndarray | list[int]) -> np.ndarray:
        chosen = np.arange(len(self))[positions] if isinstance(positions, slice) else positions
        chosen = np.asarray(chosen, np.int64).reshape(-1)
        if not len(chosen):
            return np.zeros((0, 1, 1), np.uint8)
        shards, indices = self._shard_of[chosen], self._index_in_shard[chosen]
        return np.stack([self._shards[s][i] for s, i in zip(shards, indices, strict=True)])


def read_shard_masks(ingest_dir: Path, rows: list[dict[str, Any]]) -> np.ndarray:
    """The masks (B, H, W) bool of segmentation/detection manifest ``rows``."""
    mask_rows = [{**row, "shard": row["shard"].replace(".npy", ".mask.npy")} for row in rows]
    return read_shard_images(ingest_dir, mask_rows).astype(bool)


def row_boxes(row: dict[str, Any]) -> np.ndarray:
    """A manifest row's boxes as float32 (n, 4) x0, y0, x1, y1."""
    return np.asarray(row["boxes"] or [], np.float32).reshape(-1, 4)


def subset_file_name(fraction: float, seed: int, dataset: str) -> str:
    return f"{dataset}-train-frac{fraction:g}-seed{seed}.txt"
