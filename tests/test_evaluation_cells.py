"""The evaluation cells on a tiny work folder, as the evaluate stage lays it out: frozen
features and fine-tuned encoders, segmentation and detection, examples kept."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from components.evaluation_cells import (
    classification_cell,
    detection_cell,
    features_path,
    load_encoder,
    segmentation_cell,
)

SIZE = 32
ENCODER = {"pretrain_dir": "unused", "name": "vit_tiny_patch16_224", "img_size": SIZE, "seed": 0}


@pytest.fixture
def work(tmp_path):
    """One set of 12 images (8 train: subsets 0.5 and 1 of seed 0; 4 test) with multi-label
    and one-class labels, masks and boxes, as ``prepare_sets`` writes a set."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (12, SIZE, SIZE), dtype=np.uint8)
    masks = np.zeros((12, SIZE, SIZE), bool)
    masks[:, 8:20, 10:22] = True
    boxes = [[10.0, 8.0, 22.0, 20.0]] * 12
    split = {
        "test": [8, 9, 10, 11],
        "val": [],
        "subsets": {"0.5/0": [0, 1, 2, 3], "1/0": list(range(8))},
    }
    for dataset in ("findings", "classes"):
        np.save(tmp_path / f"{dataset}.images.npy", images)
        (tmp_path / f"{dataset}.split.json").write_text(json.dumps(split))
    np.save(tmp_path / "findings.labels.npy", rng.integers(0, 2, (12, 5)).astype(np.float32))
    np.save(tmp_path / "classes.labels.npy", np.eye(3, dtype=np.float32)[np.arange(12) % 3])
    np.save(tmp_path / "findings.masks.npy", masks)
    (tmp_path / "findings.boxes.json").write_text(json.dumps({"boxes": boxes, "image_size": SIZE}))
    encoder = load_encoder("random", ENCODER).eval()
    with torch.no_grad():
        pixels = encoder.normalize(torch.from_numpy(images))
        features = encoder(pixels)["global"].numpy()
        levels = encoder.pyramid(pixels, 2)
    for dataset in ("findings", "classes"):
        np.save(features_path(tmp_path, "random", dataset, "global"), features)
    np.savez(
        features_path(tmp_path, "random", "findings", "pyramid"),
        **{f"level_{i}": level.half().numpy() for i, level in enumerate(levels)},
    )
    return tmp_path, split


def config(task: str, finetune: bool, dataset: str = "findings", single_label=False) -> dict:
    return {
        "task": task,
        "set": dataset,
        "single_label": single_label,
        "init": "random",
        "fraction": 1.0,
        "seed": 0,
        "examples_cell": [1.0, 0],
        "threads": 1,
        "probe_epochs": 5,
        "probe_lr": 0.01,
        "probe_weight_decay": 0.0,
        "head_steps": 4,
        "head_lr": 1e-3,
        "head_batch_size": 4,
        "head_width": 8,
        "pyramid_levels": 2,
        "detector": "one_stage",
        "finetune": finetune,
        "encoder_lr": 1e-4,
        "encoder": ENCODER,
    }


def test_classification_cell_scores_the_test_split(work):
    folder, split = work
    result = classification_cell(config("classification", False), folder, split)
    assert 0.0 <= result["auroc"] <= 1.0 and len(result["per_label"]) == 5


def test_a_single_label_set_gets_a_softmax_probe_scored_by_accuracy(work):
    folder, split = work
    cell = config("classification", False, "classes", single_label=True)
    result = classification_cell({**cell, "probe_epochs": 200}, folder, split)
    assert set(result) == {"accuracy"} and result["accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0)


@pytest.mark.parametrize("finetune", [False, True])
def test_segmentation_and_detection_cells_run_frozen_and_fine_tuned(work, finetune):
    folder, split = work
    dice = segmentation_cell(config("segmentation", finetune), folder, split)["dice"]
    assert 0.0 <= dice <= 1.0
    kept = np.load(folder / "examples.segmentation.findings.random.npz")
    assert kept["predicted"].shape == (4, SIZE, SIZE)
    found = detection_cell(config("detection", finetune), folder, split)
    assert set(found) == {"map_40_75", "map_50"}
    assert all(0.0 <= value <= 1.0 for value in found.values())
    assert "boxes_0" in np.load(folder / "examples.detection.findings.random.npz").files


def test_best_threshold_picks_the_validation_optimum():
    from sista_core.heads.metrics import dice_score
    from sista_core.heads.segmentation import best_threshold

    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[:, :2, :2] = True
    probabilities = torch.full((2, 4, 4), 0.02)
    probabilities[:, :2, :2] = 0.12  # ranks the pixels right, never reaches 0.5
    assert best_threshold(probabilities, masks, dice_score) == 0.1
    assert best_threshold(probabilities[:0], masks[:0], dice_score) == 0.5


def test_the_tune_trainable_module_starts_without_torch():
    """Tune starts each trial actor by importing the trainable's module; a heavy import there
    gets starting actors replaced by reused ones (components/evaluation_trial.py)."""
    import subprocess
    import sys

    code = "import sys, components.evaluation_trial; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
