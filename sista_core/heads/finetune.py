"""Fine-tuned variant of the downstream heads (docs/method.md, downstream protocol: "encoder frozen
or fine-tuned"; MGCA fine-tunes for segmentation): the encoder trains end to end with the
head, on images instead of cached features.

The head, its loss and the training loop are the frozen variant's (``segmentation.py``,
``detection.py``); only the features change, recomputed from the images at every step by a
copy of the encoder that the optimiser updates at its own learning rate. ``encoder_pyramids``
turns the fine-tuned encoder's outputs into the pyramids that ``predict_masks`` and
``predict_boxes`` score.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from ..encoders.image import ImageEncoder
from .detection import DetectionHead, detection_loss
from .segmentation import SegmentationDecoder, dice_bce_loss, fit_minibatches

Head = TypeVar("Head", bound=nn.Module)


def finetune_segmenter(
    encoder: ImageEncoder,
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    encoder_lr: float,
    batch_size: int,
    seed: int,
    levels: int = 4,
    width: int = 64,
) -> tuple[ImageEncoder, SegmentationDecoder]:
    """Train a copy of ``encoder`` and a decoder end to end on uint8 ``images`` (N, H, W) and
    bool ``masks`` (N, H, W), Dice + BCE: AdamW at ``lr`` for the decoder, ``encoder_lr`` for
    the encoder. Deterministic for a seed; the caller's encoder and the global RNG are left
    as they were. Returns both in eval mode."""
    return _finetune(
        encoder,
        images,
        lambda channels: SegmentationDecoder(channels, masks.shape[-1], width),
        lambda logits, batch: dice_bce_loss(logits, masks[batch].to(logits.device)),
        epochs=epochs,
        lr=lr,
        encoder_lr=encoder_lr,
        batch_size=batch_size,
        seed=seed,
        levels=levels,
    )


def finetune_detector(
    encoder: ImageEncoder,
    images: torch.Tensor,
    boxes_list: list[torch.Tensor],
    *,
    epochs: int,
    lr: float,
    encoder_lr: float,
    batch_size: int,
    seed: int,
    levels: int = 4,
    width: int = 64,
) -> tuple[ImageEncoder, DetectionHead]:
    """Train a copy of ``encoder`` and a detection head end to end on uint8 square ``images``
    (N, H, W) and one (n_j, 4) xyxy pixel box tensor per image (n_j = 0 for a negative),
    focal + GIoU loss; otherwise as ``finetune_segmenter``."""
    image_size = images.shape[-1]
    return _finetune(
        encoder,
        images,
        lambda channels: DetectionHead(channels, width),
        lambda outputs, batch: detection_loss(outputs, [boxes_list[i] for i in batch], image_size),
        epochs=epochs,
        lr=lr,
        encoder_lr=encoder_lr,
        batch_size=batch_size,
        seed=seed,
        levels=levels,
    )


@torch.inference_mode()
def encoder_pyramids(
    encoder: ImageEncoder, images: torch.Tensor, levels: int, batch_size: int
) -> list[torch.Tensor]:
    """The encoder's pyramid [(N, C_i, h_i, w_i)] of uint8 ``images`` (N, H, W) or
    (N, C, H, W), in eval mode and batches of ``batch_size``, on the encoder's device."""
    encoder.eval()
    device = _device(encoder)
    outputs = [
        encoder.pyramid(encoder.normalize(images[start : start + batch_size].to(device)), levels)
        for start in range(0, len(images), batch_size)
    ]
    return [torch.cat(level) for level in zip(*outputs, strict=True)]


def _finetune(
    encoder: ImageEncoder,
    images: torch.Tensor,
    build_head: Callable[[list[int]], Head],
    head_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    epochs: int,
    lr: float,
    encoder_lr: float,
    batch_size: int,
    seed: int,
    levels: int,
) -> tuple[ImageEncoder, Head]:
    """Build the head for the encoder's pyramid channels, then train both on ``head_loss(
    head outputs, batch indices)`` with the heads' loop, on a deep copy of the encoder."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = copy.deepcopy(encoder).requires_grad_(True)
        device = _device(encoder)
        encoder.eval()  # the channel probe must not touch BatchNorm's running statistics
        with torch.no_grad():
            probe = encoder.pyramid(encoder.normalize(images[:1].to(device)), levels)
        head = build_head([level.shape[1] for level in probe]).to(device)
        # Fused AdamW: one kernel over all tensors instead of a loop over them, about 7x
        # faster for ResNet-18's 11 M parameters on one CPU thread, where the step would
        # otherwise take a third of the training time.
        optimizer = torch.optim.AdamW(
            [
                {"params": head.parameters(), "lr": lr},
                {"params": encoder.parameters(), "lr": encoder_lr},
            ],
            fused=device.type in ("cpu", "cuda") or None,
        )

        def batch_loss(batch: torch.Tensor) -> torch.Tensor:
            pyramid = encoder.pyramid(encoder.normalize(images[batch].to(device)), levels)
            return head_loss(head(pyramid), batch)

        encoder.train()
        head.train()
        fit_minibatches(
            optimizer, len(images), batch_loss, epochs=epochs, batch_size=batch_size, seed=seed
        )
    return encoder.eval(), head.eval()


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
