"""Patient-level splits and nested label-fraction subsets, all seeded and saved as id lists."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def patient_splits(
    patient_ids: Sequence[str], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, str]:
    """patient id -> "train" | "val" | "test"; a patient's records never span two splits.

    Deterministic in (set of patients, fractions, seed): patients are sorted before shuffling.
    """
    patients = np.array(sorted(set(patient_ids)))
    order = np.random.default_rng(seed).permutation(len(patients))
    n_test = round(test_fraction * len(patients))
    n_val = round(val_fraction * len(patients))
    split = {}
    for rank, index in enumerate(order):
        name = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
        split[str(patients[index])] = name
    return split


def nested_subsets(
    train_patients: Sequence[str], fractions: Sequence[float], seed: int
) -> dict[float, list[str]]:
    """fraction -> sorted patient ids: the first ceil(f * n) patients of one seeded shuffle,
    so the 1 % subset is inside the 10 % subset, which is inside 100 %."""
    patients = np.array(sorted(set(train_patients)))
    order = patients[np.random.default_rng(seed).permutation(len(patients))]
    return {
        fraction: sorted(str(p) for p in order[: max(1, math.ceil(fraction * len(patients)))])
        for fraction in fractions
    }
