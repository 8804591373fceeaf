"""The cheap validation signal a sweep's early-stopping scheduler compares trials on.

``probe_auroc``: linear probes on the frozen image encoder's global features, trained on the
label subsets that ingest saved (each configured fraction, every seed) and scored on the
**validation** split of the first classification set of ``evaluate.tasks`` (macro AUROC over
its labels; accuracy for a single-label set), the evaluate stage's classification protocol
without its test split. ``retrieval``:
image-to-report recall@5 on the held-out pre-training pairs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from components.platform.shards import read_shard_images, subset_file_name
from sista_core import SISTAModel
from sista_core.probe import accuracy, macro_auroc, standardise, train_linear_probe

SIGNALS = {"probe_auroc": "val_probe_auroc", "retrieval": "val_recall_at_5"}


@dataclass
class ValidationSignal:
    """Called on rank 0 with the model being trained; returns the signal (``metric``) and
    its parts. Holds paths only until its first call, so it pickles to the workers small."""

    data_root: str
    kind: str = "probe_auroc"
    dataset: str = ""  # the classification set the probes train on
    fractions: tuple[float, ...] = (0.01, 0.1)
    seeds: tuple[int, ...] = (0, 1, 2)
    semantics: str = "embedding"
    probe: dict[str, Any] = field(default_factory=dict)  # epochs, lr, weight_decay
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def metric(self) -> str:
        return SIGNALS[self.kind]

    def __call__(self, model: SISTAModel) -> dict[str, float]:
        model.eval()
        try:
            with torch.inference_mode():
                if self.kind == "retrieval":
                    return self._retrieval(model)
                features = self._features(model)
            return self._probe_scores(features)
        finally:
            model.train()

    def _retrieval(self, model: SISTAModel) -> dict[str, float]:
        from components.stages.pretrain import retrieval_recall  # the stage's own held-out recall
        from components.stages.pretrain_data import PretrainData

        if "pairs" not in self._cache:
            self._cache["pairs"] = PretrainData(self.data_root, "val", self.semantics)
        recall = retrieval_recall(model, self._cache["pairs"])
        return {self.metric: recall["val_recall_at_5"]}

    def _sets(self) -> dict[str, Any]:
        """The images any probe sees (every subset and the validation split), read once."""
        if "images" not in self._cache:
            ingest = Path(self.data_root) / "ingest"
            rows = [
                r
                for r in pq.read_table(ingest / "manifest.parquet").to_pylist()
                if r["dataset"] == self.dataset
            ]
            if not rows:
                raise ValueError(
                    f"sweep signal probe_auroc: no records of the set {self.dataset!r} "
                    "(evaluate.tasks.classification names the set it probes)"
                )
            position = {r["record_id"]: i for i, r in enumerate(rows)}
            subsets = {
                (fraction, seed): [
                    position[i]
                    for i in (ingest / "subsets" / subset_file_name(fraction, seed, self.dataset))
                    .read_text()
                    .split()
                ]
                for fraction in self.fractions
                for seed in self.seeds
            }
            val = [i for i, r in enumerate(rows) if r["split"] == "val"]
            used = sorted({*val, *(i for subset in subsets.values() for i in subset)})
            local = {index: n for n, index in enumerate(used)}
            labels = [rows[i]["labels"] for i in used]
            single_label = json.loads((ingest / "sets.json").read_text())[self.dataset][
                "single_label"
            ]
            self._cache.update(
                single_label=single_label,
                images=read_shard_images(ingest, [rows[i] for i in used]),
                labels=torch.tensor(labels, dtype=torch.float32),
                val=[local[i] for i in val],
                subsets={key: [local[i] for i in idx] for key, idx in subsets.items()},
            )
        return self._cache

    def _features(self, model: SISTAModel, batch_size: int = 128) -> torch.Tensor:
        images = self._sets()["images"]
        encoder = model.image_encoder
        parts = [
            encoder(encoder.normalize(torch.from_numpy(images[start : start + batch_size])))[
                "global"
            ].float()
            for start in range(0, len(images), batch_size)
        ]
        return torch.cat(parts)

    def _probe_scores(self, features: torch.Tensor) -> dict[str, float]:
        sets = self._sets()
        labels, val = sets["labels"], sets["val"]
        by_fraction: dict[float, list[float]] = {}
        for (fraction, seed), subset in sets["subsets"].items():
            train_x, val_x = standardise(features[subset], features[val])
            single_label = sets["single_label"]
            probe = train_linear_probe(
                train_x, labels[subset], seed=seed, single_label=single_label, **self.probe
            )
            with torch.no_grad():
                logits = probe(val_x)
            score = (
                accuracy(logits, labels[val])
                if single_label
                else macro_auroc(logits, labels[val])[0]
            )
            by_fraction.setdefault(fraction, []).append(score)
        scores = {}
        for fraction, values in by_fraction.items():
            scores[f"val_probe_auroc_at_{fraction:g}"] = float(np.mean(values))
            scores[f"val_probe_auroc_at_{fraction:g}_std"] = float(np.std(values))  # over seeds
        scores[self.metric] = float(np.mean([v for f in by_fraction.values() for v in f]))
        return scores
