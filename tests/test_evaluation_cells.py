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


# --- the cells score the test rows: hand-made sets whose training rows score differently ---


def write_set(
    folder, name, split, features=None, labels=None, masks=None, boxes=None, pyramid=None
):
    """A set as ``prepare_sets`` lays it out, with features (or a pyramid) written by hand."""
    (folder / f"{name}.split.json").write_text(json.dumps(split))
    if features is not None:
        np.save(features_path(folder, "random", name, "global"), features.astype(np.float32))
    if labels is not None:
        np.save(folder / f"{name}.labels.npy", labels.astype(np.float32))
    if masks is not None:
        np.save(folder / f"{name}.masks.npy", masks)
    if boxes is not None:
        (folder / f"{name}.boxes.json").write_text(json.dumps({"boxes": boxes, "image_size": 32}))
    if pyramid is not None:
        np.savez(
            features_path(folder, "random", name, "pyramid"), level_0=pyramid.astype(np.float16)
        )


def test_the_classification_cell_scores_the_test_rows_alone(tmp_path):
    from sklearn.metrics import roc_auc_score

    # One feature; on the training rows both labels are exactly "feature > 0", so the probe
    # learns an increasing logit and its test AUROC is the feature's own AUROC on the test
    # rows. Scored on the training rows it would be 1.
    train_x = np.array([-4, -3, -2, -1, 1, 2, 3, 4], np.float32)
    test_x = np.array([-2, -1.5, -1, -0.5, 0.5, 1, 1.5, 2], np.float32)
    train_y = np.stack([train_x > 0, train_x > 0], 1)
    test_y = np.array([[0, 1], [1, 0], [0, 0], [0, 1], [1, 0], [0, 1], [1, 1], [1, 0]])
    split = {"test": list(range(8, 16)), "val": [], "subsets": {"1/0": list(range(8))}}
    features = np.concatenate([train_x, test_x])[:, None]
    write_set(tmp_path, "findings", split, features, np.concatenate([train_y, test_y]))
    cell = {**config("classification", False), "probe_epochs": 200, "probe_lr": 0.1}
    result = classification_cell(cell, tmp_path, split)
    expected = [roc_auc_score(test_y[:, c], test_x) for c in range(2)]
    assert max(expected) < 1  # the training rows would score 1 on both labels
    assert result["per_label"] == pytest.approx(expected)
    assert result["auroc"] == pytest.approx(np.mean(expected))


def test_the_single_label_cell_scores_the_test_rows_alone(tmp_path):
    # Two classes, "feature > 0" on the training rows; on the test rows 4 of 6 agree.
    train_x = np.array([-4, -3, -2, -1, 1, 2, 3, 4], np.float32)
    test_x = np.array([-2, -1, -0.5, 0.5, 1, 2], np.float32)
    test_class = np.array([0, 1, 0, 1, 0, 1])
    labels = np.eye(2)[np.concatenate([(train_x > 0).astype(int), test_class])]
    split = {"test": list(range(8, 14)), "val": [], "subsets": {"1/0": list(range(8))}}
    write_set(tmp_path, "classes", split, np.concatenate([train_x, test_x])[:, None], labels)
    cell = {**config("classification", False, "classes", True), "probe_epochs": 200}
    result = classification_cell({**cell, "probe_lr": 0.1}, tmp_path, split)
    assert result == {"accuracy": pytest.approx(4 / 6)}


def square(rows, columns):
    mask = np.zeros((8, 8), bool)
    mask[rows, columns] = True
    return mask


def test_the_segmentation_cell_scores_the_test_images_with_the_finding(tmp_path, monkeypatch):
    """A stand-in head whose probabilities are the cached "features" themselves, so the
    cell's row selection alone decides the score."""
    import components.evaluation_cells as cells

    monkeypatch.setattr(cells, "train_segmenter", lambda pyramid, masks, **options: "head")
    monkeypatch.setattr(
        cells, "predict_probabilities", lambda head, pyramid, batch_size: pyramid[0][:, 0]
    )
    block = square(slice(0, 4), slice(0, 4))  # 16 pixels
    top_half = square(slice(0, 2), slice(0, 4))  # 8 of them
    elsewhere = square(slice(4, 8), slice(4, 8))  # none of them
    empty = np.zeros((8, 8), bool)
    masks = np.stack([block] * 4 + [block, block, block, empty] + [block, block])
    predicted = np.stack([block] * 4 + [block, top_half, elsewhere, block] + [block, block])
    split = {"test": [4, 5, 6, 7], "val": [8, 9], "subsets": {"1/0": [0, 1, 2, 3]}}
    write_set(tmp_path, "findings", split, masks=masks, pyramid=predicted[:, None])
    dice = cells.segmentation_cell(config("segmentation", False), tmp_path, split)["dice"]
    # Test images 4-6 have the finding: Dice 1, 2*8/(16+8) and 0; image 7 has none (counted,
    # its non-empty prediction would score 0). The training images would score 1.
    assert dice == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_the_detection_cell_scores_the_test_images(tmp_path, monkeypatch):
    """A stand-in detector that returns the box and score cached as each image's "features":
    two test images found exactly (the higher scores), two with a box far from the truth."""
    import components.evaluation_cells as cells

    def predict(head, pyramid, size, batch_size):
        return [
            {
                "boxes": row[None, :4].float(),
                "scores": row[4:].float(),
                "labels": torch.zeros(1, dtype=torch.long),
            }
            for row in pyramid[0]
        ]

    monkeypatch.setattr(
        cells, "detector_functions", lambda name: (lambda *args, **options: "head", predict)
    )
    truth, far = [8.0, 8.0, 16.0, 16.0], [24.0, 24.0, 30.0, 30.0]
    cached = [[*truth, 0.9]] * 4 + [[*truth, 0.9], [*truth, 0.8], [*far, 0.3], [*far, 0.2]]
    split = {"test": [4, 5, 6, 7], "val": [], "subsets": {"1/0": [0, 1, 2, 3]}}
    write_set(tmp_path, "findings", split, boxes=[truth] * 8, pyramid=np.array(cached))
    found = cells.detection_cell(config("detection", False), tmp_path, split)
    # Precision 1 up to recall 1/2, nothing beyond, at every IoU threshold: COCO's 101-point
    # interpolated AP is 51/101 (recall 0, 0.01, ..., 0.50). The training rows would give 1.
    assert found == pytest.approx({"map_40_75": 51 / 101, "map_50": 51 / 101})


def test_a_tune_trial_runs_its_grid_cell_on_the_saved_subset_and_reports_its_size(
    tmp_path, monkeypatch
):
    """run_cell, the body of Tune's trainable: the grid's (task, set) merged into the trial's
    config, the set's split read from the work folder, the metrics reported with the size of
    the subset the cell trained on."""
    import components.evaluation_cells as cells

    split = {"test": [9], "val": [], "subsets": {"0.1/2": [0, 1, 2], "1/2": list(range(9))}}
    (tmp_path / "chest.split.json").write_text(json.dumps(split))
    calls, reports, threads = [], [], []

    def classification(config, work, read_split):
        calls.append((config, work, read_split))
        return {"auroc": 0.7}

    monkeypatch.setitem(cells.CELLS, "classification", classification)
    monkeypatch.setattr(cells.tune, "report", reports.append)
    monkeypatch.setattr(cells.torch, "set_num_threads", threads.append)
    trial = {"threads": 3, "features_dir": str(tmp_path), "fraction": 0.1, "seed": 2}
    cells.run_cell({**trial, "cell": {"task": "classification", "set": "chest"}})
    assert threads == [3] and reports == [{"auroc": 0.7, "train_size": 3}]
    [(config, work, read_split)] = calls
    assert config["task"] == "classification" and config["set"] == "chest"
    assert config["fraction"] == 0.1 and config["seed"] == 2
    assert work == tmp_path and read_split == split
