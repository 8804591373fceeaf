"""U-Net-style segmentation decoder over a frozen encoder's feature pyramid (docs/method.md,
downstream protocol): trained on cached features, so the encoder runs once per image.

For a ViT, whose levels share one patch grid, the decoder is SETR's progressive upsampling
with skip fusion; for a CNN it is a U-Net decoder over the stages.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def conv_block(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    """Conv -> GroupNorm -> ReLU, size-preserving. GroupNorm, not BatchNorm: heads train on
    small batches, and a head's eval output should not depend on batch statistics."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.GroupNorm(min(8, out_channels), out_channels),
        nn.ReLU(inplace=True),
    )


def resize(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, C, h, w) to (B, C, *size); a no-op when already that size."""
    if tuple(features.shape[-2:]) == tuple(size):
        return features
    return F.interpolate(features, size=size, mode="bilinear", align_corners=False)


class SegmentationDecoder(nn.Module):
    """Pyramid [(B, C_i, h_i, w_i)], shallow to deep -> mask logits (B, 1, out_size, out_size).

    From the deepest level: upsample x2 (up to a quarter of ``out_size``), fuse (concatenate
    + conv) with the next shallower level resized to the current resolution, repeat; then
    logits, upsampled bilinearly to ``out_size``. Stopping at a quarter is SETR-PUP's and
    U-Net-on-ResNet's last decoder stage; the convolutions beyond it cost 4x per doubling
    for boundaries a bilinear upsampling of logits draws nearly as well.
    """

    def __init__(self, in_channels: list[int], out_size: int, width: int = 64) -> None:
        super().__init__()
        self.out_size = out_size
        self.max_side = max(1, out_size // 4)
        self.lateral = nn.ModuleList(conv_block(c, width, kernel_size=1) for c in in_channels)
        self.fuse = nn.ModuleList(conv_block(2 * width, width) for _ in in_channels[:-1])
        self.logits = nn.Conv2d(width, 1, kernel_size=1)

    def forward(self, pyramid: list[torch.Tensor]) -> torch.Tensor:
        x = self.lateral[-1](pyramid[-1])
        for level in range(len(pyramid) - 2, -1, -1):
            side = tuple(min(2 * s, max(s, self.max_side)) for s in x.shape[-2:])
            x = resize(x, side)
            skip = resize(self.lateral[level](pyramid[level]), tuple(x.shape[-2:]))
            x = self.fuse[level](torch.cat([x, skip], dim=1))
        return resize(self.logits(x), (self.out_size, self.out_size))


def dice_bce_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Soft Dice + BCE for logits (B, 1, H, W) against masks (B, H, W) -> scalar.

    Dice is per image with +1 smoothing, so an empty target asks for an empty prediction
    (its term is 1 - 1 / (sum(p) + 1)) instead of dividing by zero; BCE gives every pixel a
    gradient, which Dice alone lacks early on when predictions are near-uniform.
    """
    logits, target = logits[:, 0], masks.float()
    probs = logits.sigmoid()
    overlap = (probs * target).flatten(1).sum(1)
    total = probs.flatten(1).sum(1) + target.flatten(1).sum(1)
    dice = (2 * overlap + 1) / (total + 1)
    return (1 - dice).mean() + F.binary_cross_entropy_with_logits(logits, target)


def fit_minibatches(
    optimizer: torch.optim.Optimizer,
    count: int,
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    seed: int,
) -> None:
    """The heads' training loop: ``epochs`` passes over ``count`` samples in shuffled
    minibatches of ``batch_size`` indices, one ``optimizer`` step on ``batch_loss(indices)``
    each. The order comes from its own generator seeded with ``seed``, not the global RNG."""
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(count, generator=order).split(batch_size):
            loss = batch_loss(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def train_segmenter(
    pyramids: list[torch.Tensor],
    masks: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    width: int = 64,
) -> SegmentationDecoder:
    """Train a decoder on cached frozen features: ``pyramids`` [(N, C_i, h_i, w_i)], ``masks``
    bool (N, H, W) with H == W. Deterministic for a seed (initialisation and batch order);
    the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        channels = [p.shape[1] for p in pyramids]
        decoder = SegmentationDecoder(channels, masks.shape[-1], width).to(pyramids[0].device)
        optimizer = torch.optim.AdamW(decoder.parameters(), lr=lr)
        decoder.train()
        fit_minibatches(
            optimizer,
            len(masks),
            lambda batch: dice_bce_loss(decoder([p[batch] for p in pyramids]), masks[batch]),
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
        )
    return decoder.eval()


@torch.no_grad()
def predict_probabilities(
    decoder: SegmentationDecoder, pyramids: list[torch.Tensor], batch_size: int
) -> torch.Tensor:
    """Per-pixel probabilities (N, out_size, out_size): sigmoid of the decoder's logits."""
    decoder.eval()
    count = len(pyramids[0])
    probs = [
        decoder([p[start : start + batch_size] for p in pyramids])[:, 0].sigmoid()
        for start in range(0, count, batch_size)
    ]
    return torch.cat(probs)


def predict_masks(
    decoder: SegmentationDecoder,
    pyramids: list[torch.Tensor],
    batch_size: int,
    threshold: float = 0.5,
) -> torch.Tensor:
    """Binary masks (N, out_size, out_size), bool: sigmoid(logits) > ``threshold``."""
    return predict_probabilities(decoder, pyramids, batch_size) > threshold


# Thresholds a validation split chooses from (SIIM practice): a head trained briefly on a
# finding covering ~1 % of the image ranks pixels well long before any crosses 0.5.
THRESHOLDS = (0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.05)


def best_threshold(
    probabilities: torch.Tensor,
    masks: torch.Tensor,
    score: Callable[[torch.Tensor, torch.Tensor], float],
    candidates: tuple[float, ...] = THRESHOLDS,
) -> float:
    """The candidate threshold whose binarised ``probabilities`` (N, H, W) score best against
    ``masks`` (the first one among equals); 0.5 when there is nothing to score."""
    if len(masks) == 0:
        return 0.5
    return max(candidates, key=lambda threshold: score(probabilities > threshold, masks))
