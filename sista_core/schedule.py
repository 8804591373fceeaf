"""Learning-rate schedule: linear warm-up then cosine decay (a small pure helper)."""

from __future__ import annotations

import math


def cosine_with_warmup(
    step: int, total_steps: int, warmup_steps: int, base_lr: float, min_ratio: float = 0.01
) -> float:
    """Learning rate at ``step`` (0-based): rises linearly over ``warmup_steps``, then follows
    a half cosine down to ``min_ratio * base_lr`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
