"""The downstream sets of ``ingest.downstream.sets``: which adapter reads each, its labels, and
its protocol's split (MGCA's preprocessing, docs/data.md "Downstream protocols").

A set's plan lists its records with their split before any pixel is read, so a protocol that
keeps a few records of a large table (CheXpert 5x200) decodes only those.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from components.platform.config import (
    CheXpertSetSection,
    CovidxSetSection,
    IngestSection,
    ObjectCxrSetSection,
    PhantomSetSection,
    RsnaSetSection,
    SetSection,
    SiimSetSection,
)
from sista_core.datasets import (
    CheXpert,
    Covidx,
    DatasetAdapter,
    ObjectCxr,
    RecordRef,
    RsnaPneumonia,
    Sample,
    SiimPneumothorax,
)
from sista_core.datasets.chexpert import five_by_200
from sista_core.datasets.embedded import PhantomDownstreamDataset
from sista_core.datasets.embedded_tasks import (
    PhantomOpacityDetection,
    PhantomPneumothoraxSegmentation,
)
from sista_core.datasets.object_cxr import FOREIGN_OBJECT
from sista_core.datasets.siim import PNEUMOTHORAX
from sista_core.datasets.splits import patient_splits
from sista_core.findings import CHEXPERT_COMPETITION

Split = Literal["train", "val", "test"]
# Each phantom set renders from its own seed offset (ingest.seed + offset).
PHANTOM_SEED_OFFSET = {
    "phantom_classification": 1,
    "phantom_pneumothorax": 2,
    "phantom_opacity": 3,
}
PHANTOM_ADAPTERS = {
    "phantom_classification": PhantomDownstreamDataset,
    "phantom_pneumothorax": PhantomPneumothoraxSegmentation,
    "phantom_opacity": PhantomOpacityDetection,
}
# Adapters whose records carry a mask and boxes (stored beside their images).
WITH_TARGETS = (
    "rsna_pneumonia",
    "siim_acr",
    "object_cxr",
    "phantom_pneumothorax",
    "phantom_opacity",
)


class OfficialSplits(DatasetAdapter):
    """Several tables of one dataset as one adapter: each part's records carry its official
    split (``meta["official_split"]``); ``load`` goes to the part that listed the record."""

    def __init__(self, parts: dict[str, DatasetAdapter]) -> None:
        self.parts = parts
        self.name = next(iter(parts.values())).name
        listed = {pattern for part in parts.values() for pattern in part.listing_files}
        self.listing_files = tuple(sorted(listed))

    def records(self) -> Iterator[RecordRef]:
        for split, adapter in self.parts.items():
            for ref in adapter.records():
                ref.meta["official_split"] = split
                yield ref

    def load(self, ref: RecordRef) -> Sample:
        return self.parts[ref.meta["official_split"]].load(ref)


@dataclass(frozen=True)
class SetLabels:
    """A set's label vector: ``names`` in order; CheXpert's uncertain labels (-1) by the
    per-finding ``uncertain`` policy, blanks as negatives (MGCA's preprocessing)."""

    names: tuple[str, ...]
    uncertain: tuple[tuple[str, str], ...] = ()
    single_label: bool = False  # one class per image (softmax probe, accuracy)

    def vector(self, sample: Sample) -> np.ndarray:
        policy = dict(self.uncertain)
        vector = np.zeros(len(self.names), np.float32)
        for i, name in enumerate(self.names):
            value = sample.labels.get(name, 0.0)
            if value == -1.0:
                value = 1.0 if policy.get(name) == "ones" else 0.0
            vector[i] = value
        return vector


@dataclass
class SetPlan:
    """One downstream set: its adapter, labels and how its records split (``assign``)."""

    name: str
    spec: SetSection
    adapter: DatasetAdapter
    labels: SetLabels
    excluded: dict[str, int] = field(default_factory=dict)  # left out by the protocol, why

    @property
    def images(self) -> Literal["real", "phantom"]:
        return "phantom" if isinstance(self.spec, PhantomSetSection) else "real"

    @property
    def with_targets(self) -> bool:
        return self.spec.adapter in WITH_TARGETS

    @property
    def file_backed(self) -> bool:
        """Reads files on this node's disk (phantoms render from packaged data anywhere)."""
        return self.images == "real"

    def assign(self, refs: list[RecordRef], seed: int) -> list[tuple[RecordRef, Split]]:
        """The usable records the protocol keeps, each with its split."""
        spec = self.spec
        if isinstance(spec, CheXpertSetSection):
            return self._chexpert(refs, spec, seed)
        official_test = [r for r in refs if r.meta.get("official_split") == "test"]
        rest = [r for r in refs if r.meta.get("official_split") != "test"]
        if official_test:  # COVIDx, Object-CXR: the official test list, val from train
            split = patient_splits([r.patient_id for r in rest], spec.val_fraction, 0.0, seed)
            pairs = [(r, split[r.patient_id]) for r in rest]
            return pairs + [(r, "test") for r in official_test]
        test_fraction = getattr(spec, "test_fraction", 0.0)
        split = patient_splits([r.patient_id for r in rest], spec.val_fraction, test_fraction, seed)
        pairs = [(r, split[r.patient_id]) for r in rest]
        if isinstance(spec, SiimSetSection) and spec.balance_train:
            pairs = self._balanced(pairs, seed)
        return pairs

    def _chexpert(
        self, refs: list[RecordRef], spec: CheXpertSetSection, seed: int
    ) -> list[tuple[RecordRef, Split]]:
        train = [r for r in refs if r.meta["official_split"] == "train"]
        held_out = five_by_200(train, CHEXPERT_COMPETITION, spec.per_finding, seed)
        if spec.protocol == "5x200":
            return [(r, "test") for chosen in held_out.values() for r in chosen]
        held = {r.record_id for chosen in held_out.values() for r in chosen}
        self.excluded["chexpert_5x200"] = len(held)
        train = [r for r in train if r.record_id not in held]
        # Validation: whole patients, in a seeded order, until val_images images.
        patients = sorted({r.patient_id for r in train})
        order = np.random.default_rng(seed).permutation(len(patients))
        per_patient: dict[str, int] = {}
        for ref in train:
            per_patient[ref.patient_id] = per_patient.get(ref.patient_id, 0) + 1
        val_patients, count = set(), 0
        for index in order:
            if count >= spec.val_images:
                break
            val_patients.add(patients[index])
            count += per_patient[patients[index]]
        pairs = [(r, "val" if r.patient_id in val_patients else "train") for r in train]
        return pairs + [(r, "test") for r in refs if r.meta["official_split"] == "test"]

    def _balanced(
        self, pairs: list[tuple[RecordRef, Split]], seed: int
    ) -> list[tuple[RecordRef, Split]]:
        """As many negative training images as positive ones (a seeded choice)."""
        train = [r for r, s in pairs if s == "train"]
        negatives = sorted((r for r in train if not r.meta["rle"]), key=lambda r: r.record_id)
        positives = len(train) - len(negatives)
        if len(negatives) <= positives:
            return pairs
        keep = np.random.default_rng(seed).choice(len(negatives), positives, replace=False)
        dropped = {negatives[i].record_id for i in set(range(len(negatives))) - set(keep)}
        self.excluded["balance_train"] = len(dropped)
        return [(r, s) for r, s in pairs if r.record_id not in dropped]


def plan_set(name: str, spec: SetSection, config: IngestSection) -> SetPlan:
    """The plan of set ``name``; its path is the local copy (``remote_sources.mirrored``)."""
    root = Path(spec.path) if spec.path else None
    if isinstance(spec, PhantomSetSection):
        kind = PHANTOM_ADAPTERS[spec.adapter]
        seed = config.seed + PHANTOM_SEED_OFFSET[spec.adapter]
        adapter = kind(spec.patients, config.image_size, seed)
        names = CHEXPERT_COMPETITION if spec.adapter == "phantom_classification" else ()
        return SetPlan(name, spec, adapter, SetLabels(names))
    if isinstance(spec, CheXpertSetSection):
        parts = {"train": CheXpert(root, "train")}
        if spec.protocol == "official":
            parts["test"] = CheXpert(root, "valid")
        labels = SetLabels(CHEXPERT_COMPETITION, tuple(sorted(spec.uncertain.items())))
        return SetPlan(name, spec, OfficialSplits(parts), labels)
    if isinstance(spec, RsnaSetSection):
        return SetPlan(name, spec, RsnaPneumonia(root), SetLabels(("Pneumonia",)))
    if isinstance(spec, SiimSetSection):
        return SetPlan(name, spec, SiimPneumothorax(root), SetLabels((PNEUMOTHORAX,)))
    if isinstance(spec, CovidxSetSection):
        parts = {
            "train": Covidx(root, "train", spec.classes),
            "test": Covidx(root, "test", spec.classes),
        }
        labels = SetLabels(spec.classes, single_label=True)
        return SetPlan(name, spec, OfficialSplits(parts), labels)
    if isinstance(spec, ObjectCxrSetSection):
        parts = {"train": ObjectCxr(root, "train"), "test": ObjectCxr(root, "dev")}
        return SetPlan(name, spec, OfficialSplits(parts), SetLabels((FOREIGN_OBJECT,)))
    raise ValueError(f"set {name!r}: unknown adapter {spec.adapter!r}")


def plan_sets(config: IngestSection) -> dict[str, SetPlan]:
    return {name: plan_set(name, spec, config) for name, spec in config.downstream.sets.items()}
