"""SIA: semantic-aware instance alignment (docs/method.md, "SIA").

Global image/report contrastive loss in which reports that say the same thing as the
anchor's report (report similarity >= threshold) stop acting as negatives.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import gather_no_grad, gather_with_grad

SIAMode = Literal["eliminate", "positive", "soft", "none"]
SIA_MODES: tuple[str, ...] = ("eliminate", "positive", "soft", "none")


def full_precision(forward: Callable) -> Callable:
    """Run a loss in float32 whatever autocast is active: in bfloat16 the report similarity
    and the logits lose the third decimal, and the threshold test (R >= 0.9) flags pairs
    down to about 0.896."""

    @functools.wraps(forward)
    def in_float32(self, *tensors: torch.Tensor):
        device_type = tensors[0].device.type
        with torch.autocast(device_type, enabled=False):
            return forward(self, *(t.float() if t.is_floating_point() else t for t in tensors))

    return in_float32


def report_similarity(report_semantics: torch.Tensor) -> torch.Tensor:
    """Cosine similarity R (B, B) of fixed report vectors (B, ds); never trained."""
    s = F.normalize(report_semantics.detach().float(), dim=-1)
    return s @ s.T


def false_negative_mask(report_sim: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, B) bool: j is a false negative of i when R_ij >= threshold and j != i."""
    off_diagonal = ~torch.eye(report_sim.shape[0], dtype=torch.bool, device=report_sim.device)
    return (report_sim >= threshold) & off_diagonal


def _eliminated_infonce(logits: torch.Tensor, eliminated: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -log softmax(logits)[i, i] with eliminated entries removed."""
    targets = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits.masked_fill(eliminated, float("-inf")), targets)


def _multi_positive_infonce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the mean over positives p of -log softmax(logits)[i, p]."""
    log_prob = F.log_softmax(logits, dim=-1)
    per_row = -(log_prob * positives).sum(-1) / positives.sum(-1)
    return per_row.mean()


def _soft_target_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def sia_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    report_sim: torch.Tensor,
    *,
    temperature: float = 0.07,
    threshold: float = 0.9,
    mode: str = "eliminate",
    alpha: float = 0.5,
    sigma: float = 0.1,
) -> torch.Tensor:
    """Symmetric image-report contrastive loss that handles false negatives.

    img, txt: (B, d) global embeddings of paired images and reports (normalised here).
    report_sim: (B, B) report-report similarity R (from the similarity cache, not learned).
    mode: ``eliminate`` drops false negatives from the denominator, ``positive`` counts them
    as extra positives, ``soft`` mixes a similarity-derived target into the one-hot target
    (weight ``alpha``, sharpness ``sigma``), ``none`` is plain InfoNCE (ConVIRT/CLIP).
    A threshold above 1 flags nothing and also gives plain InfoNCE.
    """
    if mode not in SIA_MODES:
        raise ValueError(f"sia mode must be one of {SIA_MODES}, got {mode!r}")
    img = F.normalize(img.float(), dim=-1)
    txt = F.normalize(txt.float(), dim=-1)
    logits = img @ txt.T / temperature
    identity = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    if mode == "none" or threshold > 1:
        no_elimination = torch.zeros_like(identity)
        return 0.5 * (
            _eliminated_infonce(logits, no_elimination)
            + _eliminated_infonce(logits.T, no_elimination)
        )
    report_sim = report_sim.to(logits)
    if mode == "eliminate":
        false_negatives = false_negative_mask(report_sim, threshold)
        return 0.5 * (
            _eliminated_infonce(logits, false_negatives)
            + _eliminated_infonce(logits.T, false_negatives.T)
        )
    if mode == "positive":
        positives = (false_negative_mask(report_sim, threshold) | identity).to(logits)
        return 0.5 * (
            _multi_positive_infonce(logits, positives)
            + _multi_positive_infonce(logits.T, positives.T)
        )

    # soft: y_i = (1 - alpha) onehot(i) + alpha softmax_j(R_ij / sigma), each direction
    def soft_targets(sim: torch.Tensor) -> torch.Tensor:
        return (1 - alpha) * identity.to(logits) + alpha * F.softmax(sim / sigma, dim=-1)

    return 0.5 * (
        _soft_target_ce(logits, soft_targets(report_sim))
        + _soft_target_ce(logits.T, soft_targets(report_sim.T))
    )


def _off_diagonal(x: torch.Tensor) -> torch.Tensor:
    """(B, B) -> (B, B-1): each row without its diagonal entry."""
    n = x.shape[0]
    keep = ~torch.eye(n, dtype=torch.bool, device=x.device)
    return x[keep].view(n, n - 1)


def intra_loss(
    img: torch.Tensor,
    report_sim: torch.Tensor,
    *,
    temperature: float = 0.07,
    sigma: float = 0.1,
) -> torch.Tensor:
    """Intra-modal alignment: image-image similarity should follow report-report semantics.

    Mean over i of KL( softmax_{j!=i}(R_ij / sigma) || softmax_{j!=i}(cos(v_i, v_j) / T) ),
    T = ``temperature``.
    img: (B, d); report_sim: (B, B). Zero for B < 2 (no pairs to compare).
    """
    if img.shape[0] < 2:
        return img.sum() * 0.0
    img = F.normalize(img.float(), dim=-1)
    image_log_prob = F.log_softmax(_off_diagonal(img @ img.T) / temperature, dim=-1)
    report_log_prob = F.log_softmax(_off_diagonal(report_sim.to(img)) / sigma, dim=-1)
    return F.kl_div(image_log_prob, report_log_prob, log_target=True, reduction="batchmean")


class SIALoss(nn.Module):
    """``sia_loss`` over the global batch: gathers embeddings and report semantics from all
    workers when ``gather_distributed`` and torch.distributed is initialised."""

    def __init__(
        self,
        temperature: float = 0.07,
        threshold: float = 0.9,
        mode: str = "eliminate",
        alpha: float = 0.5,
        sigma: float = 0.1,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__()
        if mode not in SIA_MODES:
            raise ValueError(f"sia mode must be one of {SIA_MODES}, got {mode!r}")
        self.temperature, self.threshold, self.mode = temperature, threshold, mode
        self.alpha, self.sigma = alpha, sigma
        self.gather_distributed = gather_distributed

    @full_precision
    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, report_semantics: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Returns ``loss`` and ``fraction_eliminated`` (share of off-diagonal pairs flagged)."""
        if self.gather_distributed:
            img, txt = gather_with_grad(img), gather_with_grad(txt)
            report_semantics = gather_no_grad(report_semantics)
        report_sim = report_similarity(report_semantics)
        loss = sia_loss(
            img,
            txt,
            report_sim,
            temperature=self.temperature,
            threshold=self.threshold,
            mode=self.mode,
            alpha=self.alpha,
            sigma=self.sigma,
        )
        n = report_sim.shape[0]
        flagged = false_negative_mask(report_sim, self.threshold).sum()
        active = self.mode != "none" and self.threshold <= 1 and n > 1
        fraction = flagged / (n * (n - 1)) if active else torch.zeros((), device=img.device)
        return {"loss": loss, "fraction_eliminated": fraction.float()}


class IntraLoss(nn.Module):
    """``intra_loss`` over the global batch (gathered like ``SIALoss``)."""

    def __init__(
        self, temperature: float = 0.07, sigma: float = 0.1, gather_distributed: bool = True
    ) -> None:
        super().__init__()
        self.temperature, self.sigma = temperature, sigma
        self.gather_distributed = gather_distributed

    @full_precision
    def forward(self, img: torch.Tensor, report_semantics: torch.Tensor) -> torch.Tensor:
        if self.gather_distributed:
            img, report_semantics = gather_with_grad(img), gather_no_grad(report_semantics)
        return intra_loss(
            img,
            report_similarity(report_semantics),
            temperature=self.temperature,
            sigma=self.sigma,
        )
