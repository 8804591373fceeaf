"""The attenuation layers a phantom is painted into, and how they add up.

Keeping lung air separate from what fills it is what lets a consolidation or an effusion
"replace" air (and hide the vessels and the diaphragm behind it, the silhouette sign) rather
than just brighten the pixels; keeping markings separate lets a pneumothorax remove them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Film:
    """Per-layer attenuation on the canonical film, each (size, size) float32."""

    tissue: np.ndarray  # soft-tissue path: body, heart, mediastinum, abdomen, pleural fluid
    air: np.ndarray  # lung air along the ray; subtracted where not filled
    filling: np.ndarray  # fraction of that air replaced by fluid, cells or collapse, 0..1
    markings: np.ndarray  # vessels and interstitium, seen only against aerated lung
    bone: np.ndarray
    metal: np.ndarray  # devices and calcification, denser than bone

    @classmethod
    def blank(cls, size: int) -> Film:
        def zeros() -> np.ndarray:
            return np.zeros((size, size), dtype=np.float32)

        return cls(zeros(), zeros(), zeros(), zeros(), zeros(), zeros())

    def fill(self, region: np.ndarray, amount: float | np.ndarray) -> None:
        """Replace a fraction of the lung air in ``region`` (soft weights); fillings combine
        by maximum, as overlapping disease cannot displace more air than there is."""
        np.maximum(self.filling, np.clip(region * amount, 0.0, 1.0), out=self.filling)

    def fill_window(self, window: tuple[slice, slice], region: np.ndarray, amount: float) -> None:
        """``fill`` for a region painted only inside ``window`` (rows, cols)."""
        target = self.filling[window]
        np.maximum(target, np.clip(region * amount, 0.0, 1.0), out=target)

    def attenuation(self) -> np.ndarray:
        """Total attenuation along each ray, (size, size) float32."""
        aerated = 1.0 - self.filling
        total = self.tissue - self.air * aerated
        total += self.markings * aerated
        total += self.bone
        total += self.metal
        return total
