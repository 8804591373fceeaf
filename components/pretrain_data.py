"""Pre-training inputs joined once: image shards, stored tokens and report semantics.

Workers read the stages' declared outputs (ingest shards, the reports table, the similarity
cache) and batch them without decoding or tokenising anything.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from sista_core.findings import OBSERVATIONS

from .ingest import ShardImages

TOKEN_COLUMNS = ("input_ids", "word_index", "word_mask", "words_text")


@dataclass
class PretrainBatch:
    images: np.ndarray  # (B, H, W) uint8
    tokens: list[dict]  # per report, stored by the reports stage (collate_tokens)
    semantics: np.ndarray  # (B, ds) float32: s_i of docs/method.md
    record_ids: list[str]


def label_semantics(labels) -> np.ndarray:
    """The ``semantics: labels`` vectors: finding labels with positive 1, uncertain 0.5,
    negative and not mentioned 0."""
    labels = np.asarray(labels, np.float32)
    return np.where(labels == -1, 0.5, np.nan_to_num(labels, nan=0.0))


class PretrainData:
    """One split of the pre-training pairs: tokens and semantics in memory, images read per
    batch from the memory-mapped shards.

    ``frozen_text_layers``: the pre-training text encoder's frozen layers (its
    ``freeze_layers``). Where the similarity stage kept the states after exactly those
    layers of the same encoder, each token record carries its report's states (memory-
    mapped), and the encoder runs only its trainable layers on them.
    """

    def __init__(
        self,
        data_root: str | Path,
        split: str,
        semantics: str = "embedding",
        text_encoder: str | None = None,
        frozen_text_layers: int = 0,
    ):
        root = Path(data_root)
        manifest = pq.read_table(root / "ingest" / "manifest.parquet").to_pylist()
        rows = [r for r in manifest if r["dataset"] == "pretrain" and r["split"] == split]
        reports = {
            r["record_id"]: r
            for r in pq.read_table(root / "reports" / "reports.parquet").to_pylist()
        }
        rows = [r for r in rows if r["record_id"] in reports]
        self.record_ids = [r["record_id"] for r in rows]
        self.tokens = [{c: reports[i][c] for c in TOKEN_COLUMNS} for i in self.record_ids]
        self.texts = [reports[i]["text"] for i in self.record_ids]
        self.semantics = self._semantics(root, semantics, reports)
        self.images = ShardImages(root / "ingest", rows)
        self.has_text_states = self._attach_text_states(root, text_encoder, frozen_text_layers)

    def _attach_text_states(self, root: Path, encoder: str | None, layers: int) -> bool:
        folder = root / "similarity" / "text_states"
        if layers == 0 or not (folder / "states.npy").exists():
            return False
        meta = json.loads((folder / "states.json").read_text())
        if meta != {"frozen_layers": layers, "encoder": encoder}:
            return False  # made for another encoder or depth: recompute them per step
        ids = (root / "similarity" / "record_ids.txt").read_text().split()
        position = {record_id: i for i, record_id in enumerate(ids)}
        offsets = np.load(folder / "offsets.npy")
        states = np.load(folder / "states.npy", mmap_mode="r")
        for record_id, tokens in zip(self.record_ids, self.tokens, strict=True):
            i = position[record_id]
            tokens["frozen_states"] = states[offsets[i] : offsets[i + 1]]
            if len(tokens["frozen_states"]) != len(tokens["input_ids"]):
                raise ValueError(
                    f"{folder}: record {record_id} has {len(tokens['frozen_states'])} token "
                    f"states for {len(tokens['input_ids'])} tokens; re-run the similarity stage"
                )
        return True

    def _semantics(self, root: Path, kind: str, reports: dict[str, dict]) -> np.ndarray:
        if kind == "labels":
            vectors = label_semantics([reports[i]["labels"] for i in self.record_ids])
            assert vectors.shape[1] == len(OBSERVATIONS)
            return vectors
        ids = (root / "similarity" / "record_ids.txt").read_text().split()
        position = {record_id: i for i, record_id in enumerate(ids)}
        embeddings = np.load(root / "similarity" / "embeddings.npy")
        return embeddings[[position[i] for i in self.record_ids]].astype(np.float32)

    def __len__(self) -> int:
        return len(self.record_ids)

    def steps_per_epoch(self, batch_size: int, world_size: int) -> int:
        return len(self) // (batch_size * world_size)

    def batches(
        self, epoch: int, rank: int, world_size: int, batch_size: int, seed: int, skip: int = 0
    ) -> Iterator[PretrainBatch]:
        """This worker's batches of ``epoch``: one seeded shuffle shared by all workers, each
        global batch split into equal per-worker parts (the gather needs equal sizes), the
        last incomplete global batch dropped. ``skip`` resumes inside an epoch."""
        order = np.random.default_rng((seed, epoch)).permutation(len(self))
        global_batch = batch_size * world_size
        for step in range(skip, len(self) // global_batch):
            chosen = order[step * global_batch : (step + 1) * global_batch]
            mine = np.sort(chosen[rank * batch_size : (rank + 1) * batch_size])
            yield PretrainBatch(
                images=self.images[mine],
                tokens=[self.tokens[i] for i in mine],
                semantics=self.semantics[mine],
                record_ids=[self.record_ids[i] for i in mine],
            )
