"""Downstream heads on the frozen image encoder's feature pyramid, and their metrics."""

from .detection import DetectionHead, predict_boxes, train_detector
from .metrics import detection_map, dice_score
from .segmentation import SegmentationDecoder, predict_masks, train_segmenter

__all__ = [
    "DetectionHead",
    "SegmentationDecoder",
    "detection_map",
    "dice_score",
    "predict_boxes",
    "predict_masks",
    "train_detector",
    "train_segmenter",
]
