"""Side by side: the hand-written detection head vs torchvision's FCOS on the same cached pyramid.

The embedded opacity detection set (phantom films whose opacities are placed by real RSNA
boxes) is rendered at ``--size`` px as the ingest stage does (``resize_uint8`` /
``resize_boxes``), split by patient into train and test, and encoded once by each frozen
random-init encoder (ViT-Tiny/16 and ResNet-18, 4 pyramid levels). Both detectors then train
on the cached pyramid with the same optimiser (AdamW), batch size, width and number of
optimiser steps, and the same learning-rate search: each (encoder, detector) takes the ``--lrs``
value with the best validation mAP@[.40:.75] (seed 0, trained on 80 % of the train patients,
scored on the other 20 %), then trains on all train patients for every ``--seeds`` seed. The
encoders stay fixed; a seed changes a head's initialisation and batch order. Reported: test
mAP (``detection_map``: map_40_75, map_50) and the seconds ``train_detector`` took. CPU only.

    python -m bench.detector_side_by_side [--records 400] [--size 96] [--steps 200]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sista_core.datasets.embedded_tasks import PhantomOpacityDetection
from sista_core.datasets.images import resize_boxes, resize_uint8
from sista_core.datasets.splits import patient_splits
from sista_core.encoders.image import ImageEncoder
from sista_core.heads import detection as handwritten
from sista_core.heads import torchvision_detection
from sista_core.heads.metrics import detection_map

DETECTORS: dict[str, tuple[Callable, Callable]] = {
    "hand-written head": (handwritten.train_detector, handwritten.predict_boxes),
    "torchvision FCOS + FPN": (
        torchvision_detection.train_detector,
        torchvision_detection.predict_boxes,
    ),
}
ENCODERS = ("vit_tiny_patch16_224", "resnet18")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_records(records: int, size: int, seed: int):
    """uint8 films (N, size, size), one (n_j, 4) float box tensor each, patient ids."""
    dataset = PhantomOpacityDetection(records, size, seed)
    images, boxes, patients = [], [], []
    for ref in dataset.records():
        sample = dataset.load(ref)
        images.append(resize_uint8(sample.image, size))
        boxes.append(torch.from_numpy(resize_boxes(sample.boxes, sample.image.shape, size)))
        patients.append(sample.patient_id)
    return torch.from_numpy(np.stack(images)), boxes, patients


def split_indices(patients: list[str], test_fraction: float, seed: int) -> tuple[list, list]:
    """Record indices (train, test), by patient."""
    split = patient_splits(patients, 0.0, test_fraction, seed)
    train = [i for i, p in enumerate(patients) if split[p] == "train"]
    return train, [i for i, p in enumerate(patients) if split[p] == "test"]


@torch.no_grad()
def encode(name: str, images: torch.Tensor, size: int, levels: int) -> list[torch.Tensor]:
    """The frozen encoder's pyramid [(N, C_i, h_i, w_i)], run once: ``name`` a timm model
    (random init, seed 0) or a folder ``ImageEncoder.save_pretrained`` wrote."""
    torch.manual_seed(0)
    if Path(name).is_dir():
        encoder = ImageEncoder.from_pretrained(name).eval()
    else:
        encoder = ImageEncoder(name, pretrained=False, img_size=size).eval()
    chunks = [encoder.pyramid(encoder.normalize(batch), levels) for batch in images.split(64)]
    return [torch.cat(level) for level in zip(*chunks, strict=True)]


def run(detector, pyramid, boxes, train, test, size, *, lr, seed, args) -> dict[str, float]:
    """Train on ``train``, score on ``test``: detection_map's numbers, train seconds, steps."""
    fit, predict = DETECTORS[detector]
    epochs = max(1, round(args.steps / math.ceil(len(train) / args.batch_size)))
    started = time.perf_counter()
    model = fit(
        [level[train] for level in pyramid],
        [boxes[i] for i in train],
        size,
        epochs=epochs,
        lr=lr,
        batch_size=args.batch_size,
        seed=seed,
        width=args.width,
    )
    seconds = time.perf_counter() - started
    predictions = predict(model, [level[test] for level in pyramid], size, batch_size=64)
    targets = [
        {"boxes": boxes[i], "labels": torch.zeros(len(boxes[i]), dtype=torch.long)} for i in test
    ]
    steps = epochs * math.ceil(len(train) / args.batch_size)
    return {**detection_map(predictions, targets), "seconds": seconds, "steps": steps}


def mean_std(values: list[float], digits: int = 3) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=400, help="phantom films (one a patient)")
    parser.add_argument("--size", type=int, default=96, help="film size, px")
    parser.add_argument("--test-fraction", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps, about")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--width", type=int, default=16, help="head channels (params head_width)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--encoders",
        nargs="+",
        default=list(ENCODERS),
        help="timm names (random init) or saved encoder folders (trained at --size)",
    )
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/detector_side_by_side.md"))
    args = parser.parse_args(argv)
    command = " ".join(["python -m bench.detector_side_by_side", *(argv or sys.argv[1:])])
    torch.set_num_threads(args.threads)
    began = time.perf_counter()

    images, boxes, patients = load_records(args.records, args.size, args.data_seed)
    train, test = split_indices(patients, args.test_fraction, args.data_seed)
    fit_part, val_part = split_indices([patients[i] for i in train], 0.2, args.data_seed)
    fit, val = [train[i] for i in fit_part], [train[i] for i in val_part]
    positives = {name: sum(len(boxes[i]) > 0 for i in part) for name, part in
                 (("train", train), ("test", test))}  # fmt: skip
    log(f"{len(images)} films in {time.perf_counter() - began:.0f} s; {positives} positive")

    rows, per_seed = [], []
    for encoder in args.encoders:
        started = time.perf_counter()
        pyramid = encode(encoder, images, args.size, args.levels)
        grids = [tuple(level.shape[1:]) for level in pyramid]
        log(f"{encoder}: pyramid {grids} in {time.perf_counter() - started:.0f} s")
        for detector in DETECTORS:
            val_maps = {
                lr: run(detector, pyramid, boxes, fit, val, args.size, lr=lr, seed=0, args=args)
                for lr in args.lrs
            }
            best = max(args.lrs, key=lambda lr: (val_maps[lr]["map_40_75"], val_maps[lr]["map_50"]))
            scores = ", ".join(f"{lr:g}: {m['map_40_75']:.3f}" for lr, m in val_maps.items())
            log(f"  {detector}: val map_40_75 {scores}; lr {best:g}")
            results = []
            for seed in args.seeds:
                result = run(
                    detector, pyramid, boxes, train, test, args.size, lr=best, seed=seed, args=args
                )
                results.append(result)
                per_seed.append((encoder, detector, seed, result))
                log(f"    seed {seed}: {result}")
            rows.append(
                "| "
                + " | ".join(
                    [
                        encoder,
                        detector,
                        f"{best:g}",
                        " / ".join(f"{val_maps[lr]['map_40_75']:.3f}" for lr in args.lrs),
                        mean_std([r["map_40_75"] for r in results]),
                        mean_std([r["map_50"] for r in results]),
                        mean_std([r["seconds"] for r in results], 1),
                        str(results[0]["steps"]),
                    ]
                )
                + " |"
            )

    wall = time.perf_counter() - began
    lrs = " / ".join(f"{lr:g}" for lr in args.lrs)
    init = "random-init" if all(not Path(e).is_dir() for e in args.encoders) else "see rows"
    report = "\n".join(
        [
            "# Detector side by side: hand-written head vs torchvision FCOS + FPN",
            "",
            f"Phantom images placed by real RSNA boxes (`PhantomOpacityDetection`, "
            f"{args.records} films at {args.size} px, data seed {args.data_seed}; "
            f"train {len(train)} films / {positives['train']} positive, "
            f"test {len(test)} / {positives['test']}, split by patient); "
            f"frozen encoders ({init}), "
            f"{args.levels}-level cached pyramid; CPU, "
            f"{args.threads} thread(s); width {args.width}, batch {args.batch_size}, AdamW. "
            f"lr chosen per row from {lrs} by validation map_40_75 (seed 0, 80/20 split of the "
            f"train patients); test numbers are mean ± std over seeds "
            f"{', '.join(map(str, args.seeds))}. Wall time {wall / 60:.1f} min.",
            "",
            f"Command: `{command}`",
            "",
            f"| encoder | detector | lr | val map_40_75 at {lrs} | test map_40_75 "
            "| test map_50 | train s | steps |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Per seed (test):",
            "",
            "| encoder | detector | seed | map_40_75 | map_50 | train s |",
            "|---|---|---|---|---|---|",
            *(
                f"| {e} | {d} | {s} | {r['map_40_75']:.3f} | {r['map_50']:.3f} "
                f"| {r['seconds']:.1f} |"
                for e, d, s, r in per_seed
            ),
            "",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    return report


if __name__ == "__main__":
    main()
