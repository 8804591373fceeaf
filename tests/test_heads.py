"""Downstream heads on the frozen encoder's pyramid: the metrics equal hand-computed values,
the pyramid has the shapes of its family, and briefly trained heads beat themselves
untrained on held-out phantom films."""

import numpy as np
import pytest
import torch

from sista_core.datasets.embedded_tasks import (
    PhantomOpacityDetection,
    PhantomPneumothoraxSegmentation,
)
from sista_core.encoders.image import ImageEncoder
from sista_core.heads import (
    SegmentationDecoder,
    detection_map,
    dice_score,
    predict_boxes,
    predict_masks,
    train_detector,
    train_segmenter,
)
from sista_core.heads.detection import assign_targets

SIZE = 64


def _boxes(*rows: tuple[float, float, float, float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def _target(*rows) -> dict[str, torch.Tensor]:
    boxes = _boxes(*rows)
    return {"boxes": boxes, "labels": torch.zeros(len(boxes), dtype=torch.long)}


def _prediction(*scored_rows) -> dict[str, torch.Tensor]:
    boxes = _boxes(*(row[:4] for row in scored_rows))
    scores = torch.tensor([row[4] for row in scored_rows], dtype=torch.float32)
    return {"boxes": boxes, "scores": scores, "labels": torch.zeros(len(boxes), dtype=torch.long)}


# --- metrics ---------------------------------------------------------------------------


def test_dice_is_the_mean_over_images_of_twice_the_overlap_over_the_sizes():
    pred, target = torch.zeros(4, 8, 8, dtype=torch.bool), torch.zeros(4, 8, 8, dtype=torch.bool)
    pred[0, :2], target[0, 1:4] = True, True  # 16 and 24 pixels, 8 shared: 2*8/40 = 0.4
    pred[1, :3], target[1, :3] = True, True  # identical: 1
    pred[2, :2], target[2, 4:] = True, True  # disjoint: 0
    # image 3: both empty, scored 1 by convention (nothing found where there is nothing)
    assert dice_score(pred[:1], target[:1]) == pytest.approx(0.4)
    assert dice_score(pred[1:2], target[1:2]) == 1.0
    assert dice_score(pred[2:3], target[2:3]) == 0.0
    assert dice_score(pred[3:], target[3:]) == 1.0
    assert dice_score(pred, target) == pytest.approx((0.4 + 1 + 0 + 1) / 4)


def test_dice_of_a_prediction_on_an_empty_target_is_zero():
    pred, target = torch.zeros(1, 8, 8, dtype=torch.bool), torch.zeros(1, 8, 8, dtype=torch.bool)
    pred[0, 0, 0] = True
    assert dice_score(pred, target) == 0.0
    assert dice_score(target, pred) == 0.0


def test_a_perfect_detection_scores_map_one():
    targets = [_target((10, 10, 30, 40)), _target((0, 0, 8, 8), (40, 40, 60, 60)), _target()]
    predictions = [
        _prediction((10, 10, 30, 40, 0.9)),
        _prediction((0, 0, 8, 8, 0.8), (40, 40, 60, 60, 0.7)),
        _prediction(),
    ]
    assert detection_map(predictions, targets) == {"map_40_75": 1.0, "map_50": 1.0}


@pytest.mark.parametrize(
    ("height", "iou", "expected_map_40_75"),
    [
        # IoU 0.6 exactly: pycocotools matches at IoU >= threshold, so 0.40 ... 0.60 count.
        (6.0, 0.6, 5 / 8),
        (6.2, 0.62, 5 / 8),
        (5.9, 0.59, 4 / 8),  # just under 0.60: only 0.40 ... 0.55
    ],
)
def test_map_40_75_counts_a_detection_at_the_thresholds_its_iou_reaches(
    height, iou, expected_map_40_75
):
    # Target 10 x 10, prediction 10 x height inside it: IoU = height / 10. One target, one
    # prediction: AP is 1 at a threshold the IoU reaches (precision 1 at recall 1), else 0
    # (a false positive, recall 0). map_40_75 averages the 8 thresholds 0.40, 0.45, ..., 0.75.
    result = detection_map([_prediction((0, 0, 10, height, 0.9))], [_target((0, 0, 10, 10))])
    assert height / 10 == pytest.approx(iou)
    assert result["map_40_75"] == pytest.approx(expected_map_40_75)
    assert result["map_50"] == 1.0


def test_detections_on_an_image_without_targets_are_false_positives():
    targets = [_target((0, 0, 10, 10)), _target()]
    # The false positive outranks the true one: precision 1/2 at recall 1, so AP = 0.5.
    predictions = [_prediction((0, 0, 10, 10, 0.5)), _prediction((20, 20, 30, 30, 0.9))]
    assert detection_map(predictions, targets)["map_50"] == pytest.approx(0.5)


# --- encoder pyramid -------------------------------------------------------------------


def test_vit_pyramid_levels_share_the_patch_grid():
    encoder = ImageEncoder("vit_tiny_patch16_224", img_size=SIZE).eval()
    with torch.no_grad():
        levels = encoder.pyramid(torch.zeros(2, 3, SIZE, SIZE))
    assert [tuple(level.shape) for level in levels] == [(2, 192, 4, 4)] * 4


def test_resnet_pyramid_halves_resolution_from_layer1_to_layer4():
    encoder = ImageEncoder("resnet18", img_size=SIZE).eval()
    with torch.no_grad():
        levels = encoder.pyramid(torch.zeros(2, 3, SIZE, SIZE))
        deepest = encoder.pyramid(torch.zeros(2, 3, SIZE, SIZE), levels=1)[0]
        patches = encoder(torch.zeros(2, 3, SIZE, SIZE))["patches"]
    assert [tuple(level.shape) for level in levels] == [
        (2, 64, 16, 16),
        (2, 128, 8, 8),
        (2, 256, 4, 4),
        (2, 512, 2, 2),
    ]
    # The deepest level is the map whose cells are forward()'s patches.
    assert torch.allclose(deepest.flatten(2).transpose(1, 2), patches)
    with pytest.raises(ValueError, match="5 stages"):
        encoder.pyramid(torch.zeros(1, 3, SIZE, SIZE), levels=6)


# --- heads -----------------------------------------------------------------------------


def test_every_box_gets_a_positive_cell_and_a_film_without_boxes_none():
    # 4 x 4 grid of 16 px cells (centres at 8, 24, 40, 56): the small box holds no centre,
    # so it gets the cell holding its own centre; the large box covers centres (24|40, 24|40).
    objectness, targets = assign_targets(_boxes((2, 2, 10, 10), (20, 20, 44, 44)), (4, 4), SIZE)
    assert objectness.view(4, 4).nonzero().tolist() == [[0, 0], [1, 1], [1, 2], [2, 1], [2, 2]]
    assert targets[0].tolist() == [2, 2, 10, 10] and targets[5].tolist() == [20, 20, 44, 44]
    objectness, _ = assign_targets(_boxes(), (4, 4), SIZE)
    assert objectness.sum() == 0


def test_segmentation_decoder_gives_one_logit_per_output_pixel():
    pyramid = [torch.zeros(2, 8, 16, 16), torch.zeros(2, 16, 8, 8), torch.zeros(2, 32, 4, 4)]
    decoder = SegmentationDecoder([8, 16, 32], out_size=SIZE, width=16)
    assert decoder(pyramid).shape == (2, 1, SIZE, SIZE)


def test_head_training_is_fixed_by_its_seed_and_leaves_the_global_rng_alone():
    pyramid = [torch.randn(8, 8, 8, 8), torch.randn(8, 16, 4, 4)]
    masks = torch.rand(8, 16, 16) > 0.7
    boxes = [_boxes((2, 2, 9, 12)), _boxes()] * 4
    settings = {"epochs": 2, "lr": 1e-2, "batch_size": 3, "width": 8}
    rng_before = torch.get_rng_state()
    segmenters = [train_segmenter(pyramid, masks, seed=s, **settings) for s in (5, 5, 6)]
    detectors = [train_detector(pyramid, boxes, 16, seed=s, **settings) for s in (5, 5, 6)]
    assert torch.equal(torch.get_rng_state(), rng_before)
    for first, again, other in (segmenters, detectors):
        assert torch.equal(first(pyramid), again(pyramid))
        assert not torch.equal(first(pyramid), other(pyramid))


def _phantom_features(task, count: int, positive_fraction: float):
    """Frozen random ResNet-18 pyramid [(N, C_i, h_i, w_i)] and the samples of ``count`` films."""
    dataset = task(count, SIZE, seed=0, positive_fraction=positive_fraction)
    samples = [dataset.load(ref) for ref in dataset.records()]
    torch.manual_seed(0)
    encoder = ImageEncoder("resnet18", img_size=SIZE).eval()
    images = torch.from_numpy(np.stack([sample.image for sample in samples]))
    with torch.no_grad():
        return encoder.pyramid(encoder.normalize(images)), samples


def _split(pyramid: list[torch.Tensor], train: int):
    return [level[:train] for level in pyramid], [level[train:] for level in pyramid]


@pytest.mark.slow
def test_a_trained_segmenter_beats_itself_untrained_on_held_out_films():
    # All films positive: with negatives, an empty prediction would score their share.
    pyramid, samples = _phantom_features(PhantomPneumothoraxSegmentation, 96, 1.0)
    masks = torch.from_numpy(np.stack([sample.mask for sample in samples]))
    train, test = _split(pyramid, 64)
    settings = {"lr": 3e-3, "batch_size": 16, "seed": 0}
    # epochs=0 is the same seeded initialisation, untrained.
    untrained = train_segmenter(train, masks[:64], epochs=0, **settings)
    trained = train_segmenter(train, masks[:64], epochs=30, **settings)
    untrained_dice = dice_score(predict_masks(untrained, test, batch_size=32), masks[64:])
    trained_dice = dice_score(predict_masks(trained, test, batch_size=32), masks[64:])
    print(f"held-out Dice: trained {trained_dice:.4f}, untrained {untrained_dice:.4f}")
    assert trained_dice > untrained_dice + 0.1


@pytest.mark.slow
def test_a_trained_detector_beats_itself_untrained_on_held_out_films():
    pyramid, samples = _phantom_features(PhantomOpacityDetection, 144, 0.5)
    boxes = [torch.from_numpy(sample.boxes) for sample in samples]
    targets = [{"boxes": b, "labels": torch.zeros(len(b), dtype=torch.long)} for b in boxes[96:]]
    train, test = _split(pyramid, 96)
    settings = {"lr": 3e-3, "batch_size": 16, "seed": 0, "width": 32}
    untrained = train_detector(train, boxes[:96], SIZE, epochs=0, **settings)
    trained = train_detector(train, boxes[:96], SIZE, epochs=30, **settings)
    # Threshold 0 keeps every cell, so the untrained head ranks boxes at chance instead of
    # returning none (its objectness prior sits under the default threshold).
    untrained_map = detection_map(predict_boxes(untrained, test, SIZE, 32, 0.0), targets)
    trained_predictions = predict_boxes(trained, test, SIZE, 32, 0.0)
    trained_map = detection_map(trained_predictions, targets)
    print(f"held-out mAP: trained {trained_map}, untrained {untrained_map}")
    assert trained_map["map_50"] > untrained_map["map_50"] + 0.05
    assert trained_map["map_40_75"] > untrained_map["map_40_75"]
    for prediction in trained_predictions:  # pixel coordinates of the 64 px film
        assert prediction["boxes"].min() >= 0 and prediction["boxes"].max() <= SIZE
        assert len(prediction["boxes"]) <= 100
