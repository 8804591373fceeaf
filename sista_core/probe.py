"""Linear probe on frozen features (MGCA's classification protocol), small and pure."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Scale every split with the training subset's mean and std (no test statistics leak)."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return [(x - mean) / std for x in (train, *others)]


def train_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 200,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
    single_label: bool = False,
) -> torch.nn.Linear:
    """Multi-label logistic regression (features (N, D), labels (N, C) in {0, 1}), or with
    ``single_label`` a softmax regression over the C classes of one-hot ``labels``; full
    batch AdamW: deterministic for a seed, a few seconds on CPU."""
    generator = torch.Generator().manual_seed(seed)
    probe = torch.nn.Linear(features.shape[1], labels.shape[1])
    with torch.no_grad():
        probe.weight.normal_(0, 0.01, generator=generator)
        probe.bias.zero_()
    probe = probe.to(features.device)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    classes = labels.argmax(1)
    for _ in range(epochs):
        optimizer.zero_grad()
        logits = probe(features)
        if single_label:
            F.cross_entropy(logits, classes).backward()
        else:
            F.binary_cross_entropy_with_logits(logits, labels).backward()
        optimizer.step()
    return probe


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose highest logit is the one-hot ``labels``' class."""
    return float((logits.argmax(1) == labels.argmax(1)).float().mean())


def macro_auroc(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, list[float]]:
    """Mean AUROC over labels that have both classes in ``labels``, and each label's AUROC
    (NaN where undefined)."""
    per_label = []
    for column in range(labels.shape[1]):
        target = labels[:, column]
        if target.min() == target.max():
            per_label.append(float("nan"))
            continue
        per_label.append(float(binary_auroc(logits[:, column], target.long())))
    defined = [v for v in per_label if v == v]
    return (sum(defined) / len(defined) if defined else float("nan")), per_label
