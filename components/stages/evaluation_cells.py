"""One evaluation cell (task x set x init x label fraction x seed), what Tune's trainable
(``evaluation_trial.evaluation_cell``) runs: a module with only the imports a cell needs, not
the whole evaluate stage's.

Every cell trains a head on features the evaluate stage cached for its initialisation (the
encoder is frozen), on the training subset that ingest saved, and scores it on the test
split: a linear probe (AUROC; accuracy for a single-label set), a segmentation decoder (Dice)
or a detection head (mAP). Probe and segmentation cells also save their per-test-image
outputs, which the stage's paired bootstrap rescores (components/stages/paired_bootstrap.py).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from ray import tune

from components.stages.paired_bootstrap import cell_outputs_path
from sista_core.heads.detection import predict_boxes, train_detector
from sista_core.heads.metrics import detection_map, dice_score, per_image_dice
from sista_core.heads.segmentation import best_threshold, predict_probabilities, train_segmenter
from sista_core.probe import accuracy, macro_auroc, standardise, train_linear_probe

if TYPE_CHECKING:  # timm, imported only where an encoder is built (fine-tuning, random init)
    from sista_core.encoders import ImageEncoder

# Test images whose predictions a cell keeps for the example figures.
EXAMPLES = 6


def load_encoder(init: str, encoder: dict[str, Any]) -> ImageEncoder:
    """A pre-trained run's image encoder (``encoder["pretrain_dir"]/<init>/model``), or for
    ``random`` a seeded random one of the configured architecture."""
    from sista_core.encoders import ImageEncoder

    if init == "random":
        torch.manual_seed(encoder["seed"])
        return ImageEncoder(encoder["name"], pretrained=False, img_size=encoder["img_size"])
    return ImageEncoder.from_pretrained(Path(encoder["pretrain_dir"]) / init / "model")


def features_path(work: Path, init: str, dataset: str, kind: str) -> Path:
    """``kind`` ``global``: the features (N, D) a probe reads; ``pyramid``: the feature
    pyramid (``level_<i>`` arrays, float16) segmentation and detection heads read."""
    return work / (
        f"{init}.{dataset}.global.npy" if kind == "global" else f"{init}.{dataset}.pyramid.npz"
    )


def load_pyramid(path: Path) -> list[torch.Tensor]:
    """The cached pyramid as float32 levels. A trial process runs many cells (Tune reuses
    it), mostly of the same set and init in a row: the last two pyramids stay loaded.
    Callers index the levels (a copy) and never write to them."""
    stat = path.stat()
    return _load_pyramid(path.resolve(), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=2)
def _load_pyramid(path: Path, mtime_ns: int, size: int) -> list[torch.Tensor]:
    with np.load(path) as levels:
        return [torch.from_numpy(levels[f"level_{i}"]).float() for i in range(len(levels.files))]


def boxes_of(
    flat: list[list[float]], indices: list[int], device: torch.device | None = None
) -> list[torch.Tensor]:
    return [
        torch.tensor(flat[i], dtype=torch.float32, device=device).reshape(-1, 4) for i in indices
    ]


def cell_device(config: dict[str, Any]) -> torch.device:
    """The GPU Ray gave the cell (``evaluate.use_gpu``), else the CPU."""
    if config.get("use_gpu") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def rows_on(
    levels: list[torch.Tensor], rows: list[int], device: torch.device
) -> list[torch.Tensor]:
    """The ``rows`` of every pyramid level, on ``device`` (only those rows move)."""
    return [level[rows].to(device) for level in levels]


def classification_cell(config: dict[str, Any], work: Path, split: dict) -> dict[str, Any]:
    dataset = config["set"]
    features = np.load(features_path(work, config["init"], dataset, "global"))
    device = cell_device(config)
    features = torch.from_numpy(features).to(device)
    labels = torch.from_numpy(np.load(work / f"{dataset}.labels.npy")).to(device)
    subset, test = split["subsets"][_subset_key(config)], split["test"]
    train_x, test_x = standardise(features[subset], features[test])
    probe = train_linear_probe(
        train_x,
        labels[subset],
        epochs=config["probe_epochs"],
        lr=config["probe_lr"],
        weight_decay=config["probe_weight_decay"],
        seed=config["seed"],
        single_label=config["single_label"],
    )
    with torch.no_grad():
        logits = probe(test_x)
    save_test_outputs(config, work, test, logits=logits.cpu().numpy())
    if config["single_label"]:
        return {"accuracy": accuracy(logits, labels[test])}
    auroc, per_label = macro_auroc(logits.cpu(), labels[test].cpu())
    return {"auroc": auroc, "per_label": per_label}


def segmentation_cell(config: dict[str, Any], work: Path, split: dict) -> dict[str, Any]:
    dataset = config["set"]  # its masks: pneumothorax masks, or the union of opacity boxes
    masks = torch.from_numpy(np.load(work / f"{dataset}.masks.npy"))
    subset, test = split["subsets"][_subset_key(config)], split["test"]
    head_options = _head_options(config, len(subset))
    if config["finetune"]:
        from sista_core.heads.finetune import encoder_pyramids, finetune_segmenter

        images = torch.from_numpy(np.load(work / f"{dataset}.images.npy"))
        encoder, decoder = finetune_segmenter(
            load_encoder(config["init"], config["encoder"]),
            images[subset],
            masks[subset],
            encoder_lr=config["encoder_lr"],
            levels=config["pyramid_levels"],
            **head_options,
        )
        test_pyramid = encoder_pyramids(encoder, images[test], config["pyramid_levels"], 64)
    else:
        device = cell_device(config)
        pyramid = load_pyramid(features_path(work, config["init"], dataset, "pyramid"))
        decoder = train_segmenter(
            rows_on(pyramid, subset, device), masks[subset].to(device), **head_options
        )
        test_pyramid = rows_on(pyramid, test, device)
    # The threshold is chosen on the validation split's positives, then applied to test.
    threshold, val_positive = 0.5, [i for i in split["val"] if masks[i].any()]
    if val_positive:
        val_pyramid = (
            encoder_pyramids(encoder, images[val_positive], config["pyramid_levels"], 64)
            if config["finetune"]
            else rows_on(pyramid, val_positive, device)
        )
        val_probabilities = predict_probabilities(decoder, val_pyramid, batch_size=64).cpu()
        threshold = best_threshold(val_probabilities, masks[val_positive], dice_score)
    predicted = predict_probabilities(decoder, test_pyramid, batch_size=64).cpu() > threshold
    if _keeps_examples(config):
        np.savez_compressed(
            _examples_path(config, work),
            index=np.array(test[:EXAMPLES]),
            predicted=predicted[:EXAMPLES].numpy(),
        )
    # Over the test images that have the finding: on the negatives an empty prediction
    # scores 1 (SIIM's convention), so a head that never fires would look good on all.
    positive = masks[test].flatten(1).any(1)
    dice = per_image_dice(predicted[positive], masks[test][positive])
    # NaN marks the test images the Dice leaves out, for the bootstrap's resamples.
    per_image = np.full(len(test), np.nan, np.float32)
    per_image[positive.numpy()] = dice.numpy()
    save_test_outputs(config, work, test, per_image_dice=per_image)
    return {"dice": float(dice.mean()), "threshold": threshold}


def detection_cell(config: dict[str, Any], work: Path, split: dict) -> dict[str, Any]:
    dataset = config["set"]
    detection = json.loads((work / f"{dataset}.boxes.json").read_text())
    boxes, size = detection["boxes"], detection["image_size"]
    subset, test = split["subsets"][_subset_key(config)], split["test"]
    head_options = _head_options(config, len(subset))
    if config["finetune"]:
        from sista_core.heads.finetune import encoder_pyramids, finetune_detector

        predict = predict_boxes
        images = torch.from_numpy(np.load(work / f"{dataset}.images.npy"))
        encoder, head = finetune_detector(
            load_encoder(config["init"], config["encoder"]),
            images[subset],
            boxes_of(boxes, subset),
            encoder_lr=config["encoder_lr"],
            levels=config["pyramid_levels"],
            **head_options,
        )
        test_pyramid = encoder_pyramids(encoder, images[test], config["pyramid_levels"], 64)
    else:
        device = cell_device(config)
        train, predict = detector_functions(config["detector"])
        pyramid = load_pyramid(features_path(work, config["init"], dataset, "pyramid"))
        train_boxes = boxes_of(boxes, subset, device)
        head = train(rows_on(pyramid, subset, device), train_boxes, size, **head_options)
        test_pyramid = rows_on(pyramid, test, device)
    predicted = predict(head, test_pyramid, size, batch_size=64)
    predicted = [{key: value.cpu() for key, value in p.items()} for p in predicted]
    targets = [
        {"boxes": b, "labels": torch.zeros(len(b), dtype=torch.long)} for b in boxes_of(boxes, test)
    ]
    if _keeps_examples(config):
        np.savez_compressed(
            _examples_path(config, work),
            index=np.array(test[:EXAMPLES]),
            **{
                f"{key}_{i}": p[key].numpy()
                for i, p in enumerate(predicted[:EXAMPLES])
                for key in ("boxes", "scores")
            },
        )
    return detection_map(predicted, targets)


def save_test_outputs(
    config: dict[str, Any], work: Path, test: list[int], **outputs: np.ndarray
) -> None:
    """What the cell's metric needs per test image (a row per image of ``test``), so that
    evaluate's paired bootstrap (components/stages/paired_bootstrap.py) rescores it on resamples
    of the test images; a few kB per cell, beside the other work files."""
    path = cell_outputs_path(
        work, config["task"], config["set"], config["init"], config["fraction"], config["seed"]
    )
    np.savez(path, test_index=np.asarray(test, np.int64), **outputs)


def detector_functions(name: str) -> tuple[Any, Any]:
    """``train(pyramid, boxes, image_size, **head options)`` and ``predict(head, pyramid,
    image_size, batch_size)`` of ``evaluate.detector``."""
    if name == "one_stage":
        return train_detector, predict_boxes
    from sista_core.heads import torchvision_detection

    return torchvision_detection.train_detector, torchvision_detection.predict_boxes


CELLS = {
    "classification": classification_cell,
    "segmentation": segmentation_cell,
    "detection": detection_cell,
}


def _subset_key(config: dict[str, Any]) -> str:
    return f"{config['fraction']:g}/{config['seed']}"


def _head_options(config: dict[str, Any], train_size: int) -> dict[str, Any]:
    """The training options every segmentation / detection head takes."""
    return {
        "epochs": _epochs_for(config, train_size),
        "lr": config["head_lr"],
        "batch_size": config["head_batch_size"],
        "seed": config["seed"],
        "width": config["head_width"],
    }


def _epochs_for(config: dict[str, Any], train_size: int) -> int:
    """Epochs giving about ``head_steps`` optimiser steps whatever the subset's size: a 1 %
    subset of a few images gets as many updates as the full set, not a hundredth."""
    batches = -(-train_size // config["head_batch_size"])
    return max(1, round(config["head_steps"] / batches))


def _keeps_examples(config: dict[str, Any]) -> bool:
    """The cells whose first test predictions are kept: the largest fraction, first seed."""
    return (config["fraction"], config["seed"]) == tuple(config["examples_cell"])


def _examples_path(config: dict[str, Any], work: Path) -> Path:
    return examples_path(work, config["task"], config["set"], config["init"])


def examples_path(work: Path, task: str, dataset: str, init: str) -> Path:
    return work / f"examples.{task}.{dataset}.{init}.npz"


def run_cell(config: dict[str, Any]) -> None:
    """One cell: trains the task's head on the saved subset; reports its test metrics.
    Tune's trainable is ``evaluation_trial.evaluation_cell``, which imports this module."""
    torch.set_num_threads(config["threads"])
    config = {**config, **config["cell"]}  # the (task, set) of the grid
    work = Path(config["features_dir"])
    split = json.loads((work / f"{config['set']}.split.json").read_text())
    metrics = CELLS[config["task"]](config, work, split)
    subset = split["subsets"][_subset_key(config)]
    tune.report({**metrics, "train_size": len(subset)})
