"""Downstream segmentation and detection metrics (docs/method.md, downstream protocol), computed
by torchmetrics (detection through pycocotools), not by hand."""

from __future__ import annotations

import torch
from torchmetrics.detection import MeanAveragePrecision
from torchmetrics.functional.segmentation import dice_score as torchmetrics_dice

# MGCA's RSNA setting: COCO-style AP averaged over IoU 0.40, 0.45, ..., 0.75. Rounded so that
# 0.5 is exactly 0.5: pycocotools finds the AP@0.5 entry by equality.
RSNA_IOU_THRESHOLDS = [round(0.40 + 0.05 * step, 2) for step in range(8)]


def dice_score(pred_masks: torch.Tensor, target_masks: torch.Tensor) -> float:
    """Mean over images of 2|P ∩ T| / (|P| + |T|) for binary masks (N, H, W): the mean of
    :func:`per_image_dice`."""
    return float(per_image_dice(pred_masks, target_masks).mean())


def per_image_dice(pred_masks: torch.Tensor, target_masks: torch.Tensor) -> torch.Tensor:
    """Each image's 2|P ∩ T| / (|P| + |T|), (N,), for binary masks (N, H, W): what a
    bootstrap over test images averages on a resample.

    An image with an empty prediction and an empty target scores 1 (SIIM-ACR's convention:
    nothing found where there is nothing is right). torchmetrics leaves that case undefined
    (NaN, it has no zero-division option), so it is filled here; an empty target with a
    non-empty prediction, or the reverse, scores 0 as the formula says.
    """
    per_image = torchmetrics_dice(
        pred_masks.long()[:, None],
        target_masks.long()[:, None],
        num_classes=1,
        average="none",
        input_format="one-hot",
    )[:, 0]
    return per_image.nan_to_num(nan=1.0)


def detection_map(
    predictions: list[dict[str, torch.Tensor]], targets: list[dict[str, torch.Tensor]]
) -> dict[str, float]:
    """COCO-style mAP of per-image predictions ``{"boxes" (k, 4) xyxy, "scores" (k,),
    "labels" (k,)}`` against targets ``{"boxes" (n, 4), "labels" (n,)}``:
    ``map_40_75`` (mean over IoU 0.40-0.75, MGCA's RSNA metric) and ``map_50``. Images
    without targets still count: their predictions are false positives."""
    metric = MeanAveragePrecision(iou_thresholds=RSNA_IOU_THRESHOLDS, backend="pycocotools")
    metric.update(predictions, targets)
    result = metric.compute()
    return {"map_40_75": float(result["map"]), "map_50": float(result["map_50"])}
