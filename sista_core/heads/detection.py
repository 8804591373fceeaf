"""One-stage anchor-free detector head over a frozen encoder's feature pyramid (docs/method.md,
downstream protocol), single class, trained on cached features.

The pyramid is fused at its finest grid; every cell predicts an objectness logit and one
box as (dx, dy, log w, log h) relative to the cell (CenterNet/YOLO-style), so a cell can
predict a box smaller than itself, which a ViT's coarse patch grid needs. Positives follow
FCOS: cells whose centre lies in a box, plus the cell holding the box centre so that every
box has one; a cell in two boxes takes the smaller. Loss: focal (objectness) + GIoU (boxes).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.ops import generalized_box_iou_loss, nms, sigmoid_focal_loss

from .segmentation import conv_block, fit_minibatches, resize

BOX_SCALE_CLAMP = 8.0  # log-size bound: exp(8) ~ 3000 cells, far past any image, never inf
OBJECT_PRIOR = 0.01  # initial objectness: FCOS/RetinaNet's prior, so that focal loss on the
# many background cells does not swamp the first steps


class DetectionHead(nn.Module):
    """Pyramid [(B, C_i, h_i, w_i)] -> raw outputs (B, 5, h, w) at the finest level's grid:
    channel 0 the objectness logit, 1-4 (dx, dy, log w, log h) in cell units."""

    def __init__(self, in_channels: list[int], width: int = 64) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(conv_block(c, width, kernel_size=1) for c in in_channels)
        self.tower = nn.Sequential(conv_block(width, width), conv_block(width, width))
        self.outputs = nn.Conv2d(width, 5, kernel_size=3, padding=1)
        with torch.no_grad():
            self.outputs.bias[0] = -math.log((1 - OBJECT_PRIOR) / OBJECT_PRIOR)

    def forward(self, pyramid: list[torch.Tensor]) -> torch.Tensor:
        finest = max(pyramid, key=lambda level: level.shape[-2] * level.shape[-1])
        size = (finest.shape[-2], finest.shape[-1])
        laterals = [lateral(level) for lateral, level in zip(self.lateral, pyramid, strict=True)]
        return self.outputs(self.tower(sum(resize(level, size) for level in laterals)))


def cell_centres(
    grid: tuple[int, int], image_size: int, device: torch.device | None = None
) -> tuple[torch.Tensor, float, float]:
    """Pixel centres (h*w, 2) as (x, y) of a grid's cells, row-major, and the strides (x, y)."""
    h, w = grid
    stride_x, stride_y = image_size / w, image_size / h
    rows, columns = torch.arange(h, device=device), torch.arange(w, device=device)
    ys, xs = torch.meshgrid(rows, columns, indexing="ij")
    centres = torch.stack([(xs.flatten() + 0.5) * stride_x, (ys.flatten() + 0.5) * stride_y], 1)
    return centres, stride_x, stride_y


def decode_boxes(outputs: torch.Tensor, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw head outputs (B, 5, h, w) -> objectness logits (B, h*w), boxes (B, h*w, 4) xyxy px."""
    h, w = outputs.shape[-2:]
    flat = outputs.flatten(2).transpose(1, 2)  # (B, h*w, 5)
    centres, stride_x, stride_y = cell_centres((h, w), image_size, outputs.device)
    stride = torch.tensor([stride_x, stride_y], device=outputs.device)
    box_centres = centres + flat[..., 1:3] * stride
    sizes = flat[..., 3:5].clamp(max=BOX_SCALE_CLAMP).exp() * stride
    boxes = torch.cat([box_centres - sizes / 2, box_centres + sizes / 2], dim=-1)
    return flat[..., 0], boxes


def assign_targets(
    boxes: torch.Tensor, grid: tuple[int, int], image_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground-truth boxes (n, 4) xyxy px -> objectness (h*w,) in {0, 1} and each cell's
    target box (h*w, 4) (meaningful where objectness is 1). No boxes: all background."""
    centres, stride_x, stride_y = cell_centres(grid, image_size, boxes.device)
    cells = len(centres)
    if len(boxes) == 0:
        return torch.zeros(cells, device=boxes.device), torch.zeros(cells, 4, device=boxes.device)
    x, y = centres[:, :1], centres[:, 1:]
    inside = (x >= boxes[:, 0]) & (x < boxes[:, 2]) & (y >= boxes[:, 1]) & (y < boxes[:, 3])
    box_centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    column = (box_centres[:, 0] / stride_x).long().clamp(0, grid[1] - 1)
    row = (box_centres[:, 1] / stride_y).long().clamp(0, grid[0] - 1)
    inside[row * grid[1] + column, torch.arange(len(boxes), device=boxes.device)] = True
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    smallest = torch.where(inside, areas, torch.inf).argmin(dim=1)  # (h*w,)
    return inside.any(dim=1).float(), boxes[smallest]


def detection_loss(
    outputs: torch.Tensor, boxes_list: list[torch.Tensor], image_size: int
) -> torch.Tensor:
    """Focal loss on every cell's objectness + GIoU loss on the positive cells' boxes, both
    normalised by the number of positives (FCOS), for outputs (B, 5, h, w) -> scalar."""
    logits, predicted = decode_boxes(outputs, image_size)
    grid = (outputs.shape[2], outputs.shape[3])
    targets = [assign_targets(boxes.to(outputs.device), grid, image_size) for boxes in boxes_list]
    objectness = torch.stack([t[0] for t in targets])
    target_boxes = torch.stack([t[1] for t in targets])
    positive = objectness > 0
    positives = max(int(positive.sum()), 1)
    loss = sigmoid_focal_loss(logits, objectness, reduction="sum") / positives
    if positive.any():
        giou = generalized_box_iou_loss(
            predicted[positive], target_boxes[positive], reduction="sum"
        )
        loss = loss + giou / positives
    return loss


def train_detector(
    pyramids: list[torch.Tensor],
    boxes_list: list[torch.Tensor],
    image_size: int,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    width: int = 64,
) -> DetectionHead:
    """Train a head on cached frozen features: ``pyramids`` [(N, C_i, h_i, w_i)], one (n_j, 4)
    xyxy pixel box tensor per image (n_j = 0 for a negative) of a square ``image_size``.
    Deterministic for a seed (initialisation and batch order); the global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = DetectionHead([p.shape[1] for p in pyramids], width).to(pyramids[0].device)
        optimizer = torch.optim.AdamW(head.parameters(), lr=lr)
        head.train()
        fit_minibatches(
            optimizer,
            len(boxes_list),
            lambda batch: detection_loss(
                head([p[batch] for p in pyramids]), [boxes_list[i] for i in batch], image_size
            ),
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
        )
    return head.eval()


@torch.no_grad()
def predict_boxes(
    head: DetectionHead,
    pyramids: list[torch.Tensor],
    image_size: int,
    batch_size: int,
    score_threshold: float = 0.05,
    iou_threshold: float = 0.5,
    max_detections: int = 100,
) -> list[dict[str, torch.Tensor]]:
    """Per image ``{"boxes": (k, 4) xyxy px clipped to the image, "scores": (k,),
    "labels": (k,) zeros}``: cells above ``score_threshold``, NMS at ``iou_threshold``,
    the ``max_detections`` best kept (COCO's default 100)."""
    head.eval()
    predictions = []
    for start in range(0, len(pyramids[0]), batch_size):
        outputs = head([p[start : start + batch_size] for p in pyramids])
        logits, boxes = decode_boxes(outputs, image_size)
        for image_logits, image_boxes in zip(logits, boxes, strict=True):
            scores = image_logits.sigmoid()
            keep = scores > score_threshold
            scores, image_boxes = scores[keep], image_boxes[keep].clamp(0, image_size)
            kept = nms(image_boxes, scores, iou_threshold)[:max_detections]
            predictions.append(
                {
                    "boxes": image_boxes[kept],
                    "scores": scores[kept],
                    "labels": torch.zeros(len(kept), dtype=torch.long, device=kept.device),
                }
            )
    return predictions
