"""torchvision's FCOS over a frozen encoder's cached feature pyramid, single class: the kept
library's detector in place of the hand-written head (`sista_core.heads.detection`), with
the same two functions, ``train_detector`` and ``predict_boxes``.

Why FCOS (not RetinaNet or Faster R-CNN): it is anchor-free, one point per feature cell, so
there are no anchor shapes or aspect ratios to fit to RSNA's boxes on 96 px films, and no
RoI sampling; it is one-stage (cheap on CPU, nothing but the head and FPN to train); and its
loss is the hand-written head's (focal + GIoU, FCOS centre sampling, plus centre-ness), so a
side-by-side run compares implementations, not detector families.

The encoder never runs here. `CachedPyramidBackbone` maps the cached levels through
``torchvision.ops.FeaturePyramidNetwork`` to an ``OrderedDict`` of maps; `PyramidFCOS`
then calls FCOS's own parts in the order ``FCOS.forward`` does (head, anchor generator,
``compute_loss`` / ``postprocess_detections``), leaving out only its image transform and
backbone call, which would resize and re-encode images. Only the FPN and the head train.

A ViT's levels share one patch grid; as in ViTDet's simple feature pyramid they are resized
(bilinear, no parameters) to strides x4, x2, x1, x0.5 of the grid (4, 8, 16, 32 px for
patch 16) before the FPN, so FCOS's levels have distinct strides. A CNN's levels (strides
4-32) are used as they are. Each level's FCOS "anchor" size is its stride (torchvision's
convention), which sets its centre-sampling radius and the box sizes it is responsible for.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial

import torch
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection._utils import BoxLinearCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import (
    FCOSClassificationHead,
    FCOSHead,
    FCOSRegressionHead,
)
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FeaturePyramidNetwork

from .segmentation import fit_minibatches, resize


def level_grids(grids: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The grid each cached level is resized to before the FPN: a pyramid whose levels share
    one grid (a ViT) becomes ViTDet's x2^(L-2) ... x0.5 of it (x4, x2, x1, x0.5 for four
    levels); one level, or levels of different grids (a CNN), stay as they are."""
    if len(grids) == 1 or len(set(grids)) > 1:
        return list(grids)
    h, w = grids[0]
    factors = [2.0 ** (len(grids) - 2 - level) for level in range(len(grids))]
    return [(max(1, int(h * f)), max(1, int(w * f))) for f in factors]


def group_norm(width: int) -> partial[nn.GroupNorm]:
    """GroupNorm of about 8 channels a group, at most 32 groups (torchvision's FCOS: 32
    groups of 256), any width: the number of groups always divides it."""
    return partial(nn.GroupNorm, math.gcd(width, min(32, max(1, width // 8))))


class CachedPyramidBackbone(nn.Module):
    """Cached pyramid [(B, C_i, h_i, w_i)], shallow to deep -> ``OrderedDict`` "0".."L-1" of
    (B, width, H_i, W_i) FPN maps at ``level_grids`` of the input grids."""

    def __init__(self, in_channels: list[int], grids: list[tuple[int, int]], width: int) -> None:
        super().__init__()
        self.grids = level_grids(grids)
        self.fpn = FeaturePyramidNetwork(in_channels, width)
        self.out_channels = width  # FCOS reads it

    def forward(self, pyramid: list[torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        levels = zip(pyramid, self.grids, strict=True)
        return self.fpn(OrderedDict((str(i), resize(x, g)) for i, (x, g) in enumerate(levels)))


REGRESSION_BIAS = 1.0  # initial box distances, in strides: see _FCOSHead


class _FCOSHead(FCOSHead):
    """torchvision's FCOS head (its forward and loss) with two changes: a GroupNorm that fits
    any width (its default, 32 groups, needs a multiple of 32 channels), and box distances
    that start at one stride a side (bias ``REGRESSION_BIAS``, as the FCOS paper's exp(0))
    instead of 0. torchvision passes them through a ReLU; from 0, a distance that a first
    step pushes below 0 at every positive point never gets a gradient again, and the head
    then predicts zero-width boxes for good (seen on narrow heads over random features)."""

    def __init__(self, width: int, num_convs: int) -> None:
        nn.Module.__init__(self)
        norm = group_norm(width)
        self.box_coder = BoxLinearCoder(normalize_by_size=True)  # as FCOSHead's
        self.classification_head = FCOSClassificationHead(width, 1, 1, num_convs, norm_layer=norm)
        self.regression_head = FCOSRegressionHead(width, 1, num_convs, norm_layer=norm)
        nn.init.constant_(self.regression_head.bbox_reg.bias, REGRESSION_BIAS)


class PyramidFCOS(nn.Module):
    """FCOS (one foreground class) whose backbone is a `CachedPyramidBackbone`, for square
    ``image_size`` films; ``fcos`` is a plain ``torchvision.models.detection.FCOS``."""

    def __init__(
        self,
        in_channels: list[int],
        grids: list[tuple[int, int]],
        image_size: int,
        width: int = 64,
        num_convs: int = 4,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        backbone = CachedPyramidBackbone(in_channels, grids, width)
        # AnchorGenerator's own stride rule (image // grid), so sizes match the strides.
        strides = [max(1, image_size // h) for h, _ in backbone.grids]
        anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
        self.fcos = FCOS(
            backbone,
            num_classes=1,
            min_size=image_size,
            max_size=image_size,
            anchor_generator=anchors,
            head=_FCOSHead(width, num_convs),
        )

    def _run(self, pyramid: list[torch.Tensor]):
        """FCOS.forward after its transform: features, head outputs, anchors, level sizes."""
        features = list(self.fcos.backbone(pyramid).values())
        outputs = self.fcos.head(features)
        size, count = self.image_size, len(pyramid[0])
        images = ImageList(features[0].new_empty(count, 0, size, size), [(size, size)] * count)
        anchors = self.fcos.anchor_generator(images, features)
        return outputs, anchors, [x.shape[2] * x.shape[3] for x in features], images.image_sizes

    def forward(self, pyramid: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Raw head outputs: ``cls_logits`` (B, P, 1), ``bbox_regression`` (B, P, 4),
        ``bbox_ctrness`` (B, P, 1) over the P points of all levels."""
        return self.fcos.head(list(self.fcos.backbone(pyramid).values()))

    def loss(self, pyramid: list[torch.Tensor], boxes_list: list[torch.Tensor]) -> torch.Tensor:
        """FCOS's loss (classification + GIoU + centre-ness, each over the positives) for
        (n_j, 4) xyxy pixel boxes per film; boxes without area are dropped (FCOS rejects
        them, and no point lies inside one)."""
        outputs, anchors, per_level, _ = self._run(pyramid)
        targets = []
        for boxes in boxes_list:
            boxes = boxes.to(outputs["cls_logits"]).reshape(-1, 4)
            boxes = boxes[(boxes[:, 2:] > boxes[:, :2]).all(dim=1)]
            labels = torch.zeros(len(boxes), dtype=torch.long, device=boxes.device)
            targets.append({"boxes": boxes, "labels": labels})
        return sum(self.fcos.compute_loss(targets, outputs, anchors, per_level).values())

    @torch.no_grad()
    def detect(self, pyramid: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """FCOS's postprocessing: per-level top scores, boxes clipped to the film, NMS."""
        outputs, anchors, per_level, sizes = self._run(pyramid)
        split = {k: list(v.split(per_level, dim=1)) for k, v in outputs.items()}
        return self.fcos.postprocess_detections(
            split, [list(a.split(per_level)) for a in anchors], sizes
        )


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
) -> PyramidFCOS:
    """Train FCOS's FPN and head on cached frozen features: ``pyramids`` [(N, C_i, h_i, w_i)],
    one (n_j, 4) xyxy pixel box tensor per film (n_j = 0 for a negative) of a square
    ``image_size``; AdamW and the minibatch loop of the hand-written head. Deterministic
    for a seed (initialisation and batch order); the global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PyramidFCOS(
            [p.shape[1] for p in pyramids],
            [(p.shape[2], p.shape[3]) for p in pyramids],
            image_size,
            width,
        ).to(pyramids[0].device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        model.train()
        fit_minibatches(
            optimizer,
            len(boxes_list),
            lambda batch: model.loss([p[batch] for p in pyramids], [boxes_list[i] for i in batch]),
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
        )
    return model.eval()


@torch.no_grad()
def predict_boxes(
    model: PyramidFCOS,
    pyramids: list[torch.Tensor],
    image_size: int,
    batch_size: int,
    score_threshold: float = 0.05,
    iou_threshold: float = 0.5,
    max_detections: int = 100,
) -> list[dict[str, torch.Tensor]]:
    """Per film ``{"boxes": (k, 4) xyxy px clipped to the film, "scores": (k,), "labels":
    (k,) zeros}``, as the hand-written head returns: FCOS's score (sqrt of class x
    centre-ness probability) above ``score_threshold``, NMS at ``iou_threshold``, the
    ``max_detections`` best kept."""
    if image_size != model.image_size:
        raise ValueError(
            f"the detector was built for {model.image_size} px films, not {image_size}"
        )
    model.eval()
    fcos = model.fcos
    saved = fcos.score_thresh, fcos.nms_thresh, fcos.detections_per_img
    fcos.score_thresh, fcos.nms_thresh, fcos.detections_per_img = (
        score_threshold,
        iou_threshold,
        max_detections,
    )
    try:
        predictions = []
        for start in range(0, len(pyramids[0]), batch_size):
            predictions += model.detect([p[start : start + batch_size] for p in pyramids])
    finally:
        fcos.score_thresh, fcos.nms_thresh, fcos.detections_per_img = saved
    return predictions
