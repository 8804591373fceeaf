"""The evaluation cells on a tiny work folder, as the evaluate stage lays it out: frozen
features and fine-tuned encoders, segmentation and detection, examples kept."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from components.stages.evaluation_cells import (
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
    gets starting actors replaced by reused ones (components/stages/evaluation_trial.py)."""
    import subprocess
    import sys

    code = "import sys, components.stages.evaluation_trial; print('torch' in sys.modules)"
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
    import components.stages.evaluation_cells as cells

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
    import components.stages.evaluation_cells as cells

    def predict(head, pyramid, size, batch_size):
        return [
            {
                "boxes": row[None, :4].float(),
                "scores": row[4:].float(),
                "labels": torch.zeros(1, dtype=torch.long),
            }
            for row in pyramid[0]
        ]

    asked = []

    def detector_functions(name):
        asked.append(name)
        return lambda *args, **options: "head", predict

    monkeypatch.setattr(cells, "detector_functions", detector_functions)
    truth, far = [8.0, 8.0, 16.0, 16.0], [24.0, 24.0, 30.0, 30.0]
    cached = [[*truth, 0.9]] * 4 + [[*truth, 0.9], [*truth, 0.8], [*far, 0.3], [*far, 0.2]]
    split = {"test": [4, 5, 6, 7], "val": [], "subsets": {"1/0": [0, 1, 2, 3]}}
    write_set(tmp_path, "findings", split, boxes=[truth] * 8, pyramid=np.array(cached))
    found = cells.detection_cell(
        {**config("detection", False), "detector": "fcos"}, tmp_path, split
    )
    assert asked == ["fcos"]  # the configured detector
    with np.load(cells.examples_path(tmp_path, "detection", "findings", "random")) as kept:
        assert kept["index"].tolist() == [4, 5, 6, 7]  # the first test images
    # Precision 1 up to recall 1/2, nothing beyond, at every IoU threshold: COCO's 101-point
    # interpolated AP is 51/101 (recall 0, 0.01, ..., 0.50). The training rows would give 1.
    assert found == pytest.approx({"map_40_75": 51 / 101, "map_50": 51 / 101})


def test_a_tune_trial_runs_its_grid_cell_on_the_saved_subset_and_reports_its_size(
    tmp_path, monkeypatch
):
    """run_cell, the body of Tune's trainable: the grid's (task, set) merged into the trial's
    config, the set's split read from the work folder, the metrics reported with the size of
    the subset the cell trained on."""
    import components.stages.evaluation_cells as cells

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


class ProbeCalled(Exception):
    pass


@pytest.mark.parametrize("single_label", [False, True])
def test_the_classification_cell_hands_its_settings_to_the_probe_on_its_device(
    tmp_path, monkeypatch, single_label
):
    """The probe gets the cell's epochs, learning rate, weight decay, seed and head type, and
    its inputs on the device the cell chose (meta here: a device that is not the CPU)."""
    import components.stages.evaluation_cells as cells

    split = {"test": [4, 5], "val": [], "subsets": {"0.5/3": [0, 1, 2, 3]}}
    labels = np.eye(2)[[0, 1, 0, 1, 0, 1]]
    write_set(tmp_path, "findings", split, np.arange(12, dtype=np.float32).reshape(6, 2), labels)
    seen = {}

    def probe_spy(train_x, train_y, **options):
        seen.update(options, devices={train_x.device.type, train_y.device.type})
        raise ProbeCalled

    monkeypatch.setattr(cells, "train_linear_probe", probe_spy)
    monkeypatch.setattr(cells, "cell_device", lambda config: torch.device("meta"))
    cell = {
        **config("classification", False, single_label=single_label),
        "fraction": 0.5,
        "seed": 3,
        "probe_epochs": 7,
        "probe_lr": 0.05,
        "probe_weight_decay": 0.001,
    }
    with pytest.raises(ProbeCalled):
        classification_cell(cell, tmp_path, split)
    assert seen == {
        "epochs": 7,
        "lr": 0.05,
        "weight_decay": 0.001,
        "seed": 3,
        "single_label": single_label,
        "devices": {"meta"},
    }


def test_a_cell_uses_the_gpu_only_when_evaluate_asks_and_ray_gave_one(monkeypatch):
    from components.stages.evaluation_cells import cell_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cell_device({"use_gpu": True}) == torch.device("cuda")
    assert cell_device({"use_gpu": False}) == cell_device({}) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cell_device({"use_gpu": True}) == torch.device("cpu")


def test_only_the_chosen_rows_of_each_level_move_to_the_device():
    from components.stages.evaluation_cells import rows_on

    levels = [torch.arange(12.0).reshape(4, 3), torch.arange(8.0).reshape(4, 2)]
    moved = rows_on(levels, [0, 2], torch.device("meta"))
    assert [(m.device.type, tuple(m.shape)) for m in moved] == [("meta", (2, 3)), ("meta", (2, 2))]
    kept = rows_on(levels, [3], torch.device("cpu"))
    assert kept[0].tolist() == [[9.0, 10.0, 11.0]] and kept[1].tolist() == [[6.0, 7.0]]


def test_a_rewritten_pyramid_is_read_again(tmp_path):
    """The cache of loaded pyramids is keyed by the file's time and size: a file rewritten
    with other values (same size), or to another size at the same time, is read anew."""
    import os

    from components.stages.evaluation_cells import load_pyramid

    path = tmp_path / "random.findings.pyramid.npz"
    np.savez(path, level_0=np.zeros((2, 3), np.float16))
    assert load_pyramid(path)[0].sum() == 0
    np.savez(path, level_0=np.ones((2, 3), np.float16))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert load_pyramid(path)[0].sum() == 6  # same size, a later time
    when = path.stat().st_mtime_ns
    np.savez(path, level_0=np.ones((4, 3), np.float16))
    os.utime(path, ns=(when, when))
    assert load_pyramid(path)[0].shape == (4, 3)  # the same time, another size


def test_the_detector_setting_picks_the_head():
    from components.stages.evaluation_cells import detector_functions
    from sista_core.heads import torchvision_detection
    from sista_core.heads.detection import predict_boxes, train_detector

    assert detector_functions("one_stage") == (train_detector, predict_boxes)
    assert detector_functions("fcos") == (
        torchvision_detection.train_detector,
        torchvision_detection.predict_boxes,
    )


def stand_in_head(monkeypatch):
    """A segmentation head whose probabilities are the cached "features" themselves; it
    checks that the cell predicts with the head it trained, in integer batches."""
    import components.stages.evaluation_cells as cells

    def predict(head, pyramid, batch_size):
        assert head == "head" and isinstance(batch_size, int) and batch_size > 0
        return pyramid[0][:, 0]

    monkeypatch.setattr(cells, "train_segmenter", lambda pyramid, masks, **options: "head")
    monkeypatch.setattr(cells, "predict_probabilities", predict)
    return cells


def test_without_validation_positives_the_threshold_is_one_half_and_exclusive(
    tmp_path, monkeypatch
):
    """No validation image has the finding: pixels above 0.5 are predicted, a pixel at exactly
    0.5 is not. The first test images and their predictions are kept as examples."""
    cells = stand_in_head(monkeypatch)
    block = square(slice(0, 4), slice(0, 4))
    probabilities = np.where(block, 0.7, 0.1).astype(np.float32)
    probabilities[6, 6] = 0.5  # outside the finding, exactly at the threshold
    masks = np.stack([block] * 8 + [np.zeros((8, 8), bool)])
    split = {"test": [4, 5, 6, 7], "val": [8], "subsets": {"1/0": [0, 1, 2, 3]}}
    write_set(
        tmp_path, "findings", split, masks=masks, pyramid=np.stack([probabilities] * 9)[:, None]
    )
    result = cells.segmentation_cell(config("segmentation", False), tmp_path, split)
    assert result == {"dice": pytest.approx(1.0), "threshold": 0.5}
    with np.load(cells.examples_path(tmp_path, "segmentation", "findings", "random")) as kept:
        assert kept["index"].tolist() == [4, 5, 6, 7]
        np.testing.assert_array_equal(kept["predicted"], np.stack([block] * 4))


def test_the_threshold_chosen_on_validation_positives_is_applied_to_test(tmp_path, monkeypatch):
    """The validation positives are found only below 0.5 (probability 0.3 in the mask): the
    threshold picked there, not 0.5, decides the test prediction."""
    cells = stand_in_head(monkeypatch)
    block = square(slice(0, 4), slice(0, 4))
    faint = np.where(block, 0.3, 0.05).astype(np.float32)
    masks = np.stack([block] * 10)
    split = {"test": [4, 5, 6, 7], "val": [8, 9], "subsets": {"1/0": [0, 1, 2, 3]}}
    write_set(tmp_path, "findings", split, masks=masks, pyramid=np.stack([faint] * 10)[:, None])
    result = cells.segmentation_cell(config("segmentation", False), tmp_path, split)
    # 0.3 is the first candidate (0.5, 0.4, 0.3, ...) that finds them (stored as float16: 0.30005).
    assert result == {"dice": pytest.approx(1.0), "threshold": 0.3}


def test_a_fine_tuned_segmenter_gets_the_cells_levels_and_picks_its_threshold_on_validation(
    work, monkeypatch
):
    import sista_core.heads.finetune as finetune

    folder, split = work
    cell = {**config("segmentation", True), "pyramid_levels": 3, "encoder_lr": 3e-4}
    trained = {}
    real = finetune.finetune_segmenter

    def spy(encoder, images, masks, **options):
        trained.update(options)
        return real(encoder, images, masks, **options)

    monkeypatch.setattr(finetune, "finetune_segmenter", spy)
    with_validation = {**split, "val": [6, 7]}  # both have the finding
    result = segmentation_cell(cell, folder, with_validation)
    assert trained["levels"] == 3 and trained["encoder_lr"] == 3e-4
    assert 0 <= result["dice"] <= 1 and 0 < result["threshold"] < 1


def test_boxes_are_read_four_numbers_at_a_time():
    from components.stages.evaluation_cells import boxes_of

    two_boxes = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    found = boxes_of([[9.0, 9.0, 10.0, 10.0], two_boxes, []], [1, 2])
    assert [tuple(b.shape) for b in found] == [(2, 4), (0, 4)]
    assert found[0].dtype == torch.float32 and found[0][1].tolist() == [5.0, 6.0, 7.0, 8.0]


def test_frozen_heads_train_and_predict_on_the_cells_device(tmp_path, monkeypatch):
    """Every tensor a frozen segmentation or detection head reads (pyramid rows, masks,
    boxes; training, validation and test) is on the device the cell chose: meta here, a
    device that is not the CPU."""
    import components.stages.evaluation_cells as cells

    devices = []

    def train(pyramid, targets, *size, **options):
        targets = targets if isinstance(targets, list) else [targets]
        devices.extend(t.device.type for t in [*pyramid, *targets])
        return "head"

    def predict_masks(head, pyramid, batch_size):
        devices.extend(level.device.type for level in pyramid)
        return torch.zeros(len(pyramid[0]), 8, 8)

    def predict_boxes(head, pyramid, size, batch_size):
        devices.extend(level.device.type for level in pyramid)
        empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0)}
        return [{**empty, "labels": torch.zeros(0, dtype=torch.long)}] * len(pyramid[0])

    monkeypatch.setattr(cells, "cell_device", lambda config: torch.device("meta"))
    monkeypatch.setattr(cells, "train_segmenter", train)
    monkeypatch.setattr(cells, "predict_probabilities", predict_masks)
    monkeypatch.setattr(cells, "detector_functions", lambda name: (train, predict_boxes))
    block = square(slice(0, 4), slice(0, 4))
    split = {"test": [4, 5], "val": [6], "subsets": {"1/0": [0, 1, 2, 3]}}
    write_set(
        tmp_path,
        "findings",
        split,
        masks=np.stack([block] * 7),
        boxes=[[0.0, 0.0, 4.0, 4.0]] * 7,
        pyramid=np.zeros((7, 1, 8, 8)),
    )
    cells.segmentation_cell(config("segmentation", False), tmp_path, split)
    # train: pyramid + masks; validation and test predictions: one level each
    assert devices == ["meta"] * 4
    devices.clear()
    cells.detection_cell(config("detection", False), tmp_path, split)
    assert devices == ["meta"] * (1 + 4 + 1)  # pyramid, the 4 training images' boxes, test


def test_a_head_trains_for_about_its_steps_whatever_the_subset_size():
    from components.stages.evaluation_cells import _epochs_for

    steps = {"head_steps": 10, "head_batch_size": 4}
    assert _epochs_for(steps, 9) == 3  # 3 batches an epoch (the last one short): 10 / 3
    assert _epochs_for(steps, 80) == 1  # 20 batches: one epoch already exceeds 10 steps
    assert _epochs_for({**steps, "head_steps": 1}, 9) == 1  # never fewer than one epoch
    assert _epochs_for({**steps, "head_steps": 100}, 3) == 100


def test_an_init_loads_its_pretrained_encoder_and_random_builds_the_named_one(tmp_path):
    from sista_core.encoders import ImageEncoder

    torch.manual_seed(1)
    trained = ImageEncoder("resnet18", pretrained=False, img_size=SIZE)
    trained.save_pretrained(tmp_path / "sista" / "model")
    spec = {"pretrain_dir": str(tmp_path), "name": "resnet18", "img_size": SIZE, "seed": 0}
    loaded = load_encoder("sista", spec)
    expected = trained.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())
    random = load_encoder("random", spec)
    assert random.num_features == 512  # resnet18's, the named architecture (resnet50: 2048)
    again = load_encoder("random", spec)  # seeded: the same random encoder each time
    pairs = zip(random.parameters(), again.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
