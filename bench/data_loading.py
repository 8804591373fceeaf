"""Data-loading benchmark: images/s from the preprocessed uint8 shards vs decoding JPEGs.

The baseline decodes every radiograph from its JPEG file at every step (PIL decode, resize
to the training size, to tensor), as MGCA's loader does. SISTA decodes once at ingest and
training reads the uint8 shards (``components.stages.ingest.read_shard_images``). Both sides end
in the same normalised float batch (B, 3, S, S) (``ImageEncoder.normalize``), built inside
torch DataLoader workers (1 and 2), so only the way pixels are obtained differs.

The JPEGs are the 16 real chest radiographs of ``pneumonia-model-package`` at their
original size (968x592 to 1776x1416), copied to ``--images`` files in a temporary folder;
the shards are built there from the same files (decoded, letterboxed to S, written with
ingest's ``ShardWriter``), so the benchmark needs no ``data/`` folder.

    python -m bench.data_loading                     # 320 images, S = 96, batch 32
    python -m bench.data_loading --images 64 --min-seconds 0.2 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from components.platform.config import load_params
from components.platform.shards import ShardWriter, read_shard_images
from sista_core.assets import real_radiograph_files
from sista_core.datasets.images import read_image, resize_uint8
from sista_core.encoders.image import ImageEncoder


class Normaliser:
    """``ImageEncoder.normalize`` without the backbone: the training code's own pixel
    scaling, small enough to hand to loader workers."""

    normalize = ImageEncoder.normalize  # reads only config.in_chans, _mean and _std

    def __init__(self, encoder: ImageEncoder) -> None:
        self.config = encoder.config
        self._mean, self._std = encoder._mean.clone(), encoder._std.clone()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.normalize(images)


def write_jpegs(folder: Path, count: int) -> list[Path]:
    """``count`` JPEG files: the real radiographs, byte for byte, repeated."""
    sources = real_radiograph_files()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"image-{i:05d}.jpeg"
        shutil.copyfile(sources[i % len(sources)], path)
        paths.append(path)
    return paths


def build_shards(folder: Path, jpegs: list[Path], size: int, shard_size: int) -> list[dict]:
    """Decode each JPEG once into uint8 shards (as ingest does); returns manifest rows."""
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(folder / "shards", "pretrain", shard_size)
    rows = []
    for path in jpegs:
        image = resize_uint8(read_image(path, path.stem), size)
        shard, index = writer.add("train", image)
        rows.append({"record_id": path.stem, "shard": shard, "index": index})
    writer.close()
    return rows


class ShardBatches(Dataset):
    """Item b is batch b of a seeded shuffle, read from the shards and normalised: the
    pre-training reader (whole batches, sorted indices within a batch, no decoding)."""

    def __init__(self, folder: Path, rows: list[dict], batch_size: int, normalise: Normaliser):
        order = np.random.default_rng(0).permutation(len(rows))
        self.batches = [
            [rows[i] for i in np.sort(order[start : start + batch_size])]
            for start in range(0, len(rows) - batch_size + 1, batch_size)
        ]
        self.folder, self.normalise = folder, normalise

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, batch: int) -> torch.Tensor:
        images = read_shard_images(self.folder, self.batches[batch])
        return self.normalise(torch.from_numpy(images))


class JpegImages(Dataset):
    """Item i: JPEG file i decoded, letterboxed to ``size`` and made a uint8 tensor."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        path = self.paths[i]
        return torch.from_numpy(resize_uint8(read_image(path, path.stem), self.size))


class NormalisingCollate:
    """Stack uint8 images and normalise them in the worker, as the shard side does."""

    def __init__(self, normalise: Normaliser):
        self.normalise = normalise

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        return self.normalise(torch.stack(images))


def images_per_second(loader: DataLoader, min_seconds: float) -> float:
    """Images/s over whole passes of ``loader`` after its first batch (workers started,
    files in the page cache), repeating passes until ``min_seconds`` have elapsed."""
    batches = iter(loader)
    next(batches)
    images, start = 0, time.perf_counter()
    while True:
        for batch in batches:
            images += len(batch)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return images / elapsed
        batches = iter(loader)  # persistent workers: the next pass reuses them


def make_loader(
    side: str,
    folder: Path,
    jpegs: list[Path],
    rows: list[dict],
    size: int,
    batch_size: int,
    workers: int,
    normalise: Normaliser,
) -> DataLoader:
    """A loader of ``side`` ("shards" or "jpeg") with ``workers`` loader processes."""
    common = {"num_workers": workers, "persistent_workers": True}
    if side == "shards":
        shard_batches = ShardBatches(folder, rows, batch_size, normalise)
        return DataLoader(shard_batches, batch_size=None, **common)
    return DataLoader(
        JpegImages(jpegs, size),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=NormalisingCollate(normalise),
        generator=torch.Generator().manual_seed(0),
        **common,
    )


def bench_workers(
    folder, jpegs, rows, size, batch_size, workers, normalise, repeats, min_seconds
) -> dict[str, Any]:
    """Best images/s of each side at ``workers`` loader processes. The sides take turns, so
    a busy spell on a shared machine slows both rather than one."""
    best = {"shards": 0.0, "jpeg": 0.0}
    for _ in range(repeats):
        for name in best:
            loader = make_loader(name, folder, jpegs, rows, size, batch_size, workers, normalise)
            best[name] = max(best[name], images_per_second(loader, min_seconds))
            del loader  # shuts its workers down before the other side starts
    return {
        "workers": workers,
        "image_size": size,
        "batch": batch_size,
        "shard_images_per_s": best["shards"],
        "jpeg_images_per_s": best["jpeg"],
        "speedup": best["shards"] / best["jpeg"],
    }


def print_table(rows: list[dict], num_images: int) -> None:
    machine = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {machine}, {num_images} images")
    print(f"{'workers':>7} {'size':>4} {'shards img/s':>12} {'JPEG img/s':>10} {'speedup':>8}")
    for r in rows:
        print(
            f"{r['workers']:>7} {r['image_size']:>4} {r['shard_images_per_s']:>12.0f} "
            f"{r['jpeg_images_per_s']:>10.1f} {r['speedup']:>7.1f}x"
        )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=320, help="JPEG files (and shard rows)")
    parser.add_argument("--size", type=int, help="image side; default: params ingest.image_size")
    parser.add_argument("--batch", type=int, help="default: params pretrain.optim.batch_size")
    parser.add_argument("--workers", default="1,2", help="loader worker counts")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--min-seconds", type=float, default=1.0, help="per measurement")
    parser.add_argument("--out", type=Path, default=Path("bench/results/data_loading.json"))
    args = parser.parse_args(argv)

    params = load_params("params.yaml")
    size = args.size or params.ingest.image_size
    batch_size = args.batch or params.pretrain.optim.batch_size
    if args.images < 2 * batch_size:  # the first batch is not timed: at least one more
        parser.error(f"--images {args.images} must be at least 2 batches of {batch_size}")
    encoder = ImageEncoder(params.pretrain.image.name, img_size=params.pretrain.image.img_size)
    normalise = Normaliser(encoder)
    del encoder
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-data-loading-") as tmp:
        folder = Path(tmp)
        jpegs = write_jpegs(folder / "jpeg", args.images)
        manifest = build_shards(folder, jpegs, size, shard_size=max(batch_size, args.images // 4))
        for workers in (int(w) for w in args.workers.split(",")):
            rows.append(
                bench_workers(
                    folder,
                    jpegs,
                    manifest,
                    size,
                    batch_size,
                    workers,
                    normalise,
                    args.repeats,
                    args.min_seconds,
                )
            )
    print_table(rows, args.images)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
