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
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from components.platform.shards import ShardImages
from components.stages.reports import TOKEN_COLUMNS, TOKENS_FILE, read_token_table
from sista_core.findings import OBSERVATIONS


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


class TokenRecords:
    """The stored tokens of some reports: ``rows`` of the reports stage's memory-mapped
    token table. ``[i]`` builds record i's dict for ``collate_tokens``, with its frozen text
    states when attached; nothing else is held, so a worker's memory grows with the batch,
    not with the number of reports."""

    def __init__(self, table: pa.Table, rows: np.ndarray) -> None:
        self.columns = {name: table.column(name) for name in TOKEN_COLUMNS}
        self.rows = rows
        self.states: np.ndarray | None = None  # (all tokens, hidden), memory-mapped
        self.state_spans: np.ndarray | None = None  # (records, 2): each record's rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int | slice) -> dict | list[dict]:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        row = int(self.rows[index])
        record = {name: column[row].as_py() for name, column in self.columns.items()}
        if self.states is not None:
            start, stop = self.state_spans[index]
            record["frozen_states"] = self.states[start:stop]
        return record


class SemanticRows:
    """Rows of a memory-mapped (N, d) array in a split's order, read as float32 on demand."""

    def __init__(self, array: np.ndarray, rows: np.ndarray) -> None:
        self.array, self.rows = array, rows
        self.shape = (len(rows), array.shape[1])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index) -> np.ndarray:
        rows = np.atleast_1d(self.rows[index])
        order = np.argsort(rows, kind="stable")  # a forward read through the file
        values = np.empty((len(rows), self.shape[1]), np.float32)
        values[order] = self.array[rows[order]]
        return values if np.ndim(self.rows[index]) else values[0]


class PretrainData:
    """One split of the pre-training pairs: images, tokens and report semantics read per
    batch (memory-mapped shards and embeddings, Arrow token columns), so a worker's memory
    does not grow with the number of pairs.

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
        rows = pq.read_table(
            root / "ingest" / "manifest.parquet",
            columns=["record_id", "shard", "index"],
            filters=[("dataset", "=", "pretrain"), ("split", "=", split)],
        )
        reports = read_token_table(root / "reports" / TOKENS_FILE)
        position = {record_id: i for i, record_id in enumerate(reports["record_id"].to_pylist())}
        kept = [r for r in rows.to_pylist() if r["record_id"] in position]
        self.record_ids = [r["record_id"] for r in kept]
        self._rows_in_similarity: np.ndarray | None = None
        report_rows = np.array([position[i] for i in self.record_ids], np.int64)
        self.tokens = TokenRecords(reports, report_rows)
        self.semantics = self._semantics(root, semantics, reports, report_rows)
        self.images = ShardImages(root / "ingest", kept)
        self.has_text_states = self._attach_text_states(root, text_encoder, frozen_text_layers)

    def _similarity_rows(self, root: Path) -> np.ndarray:
        """Each record's row in the similarity stage's arrays (read once, for the
        embeddings and the text states alike)."""
        if self._rows_in_similarity is None:
            ids = (root / "similarity" / "record_ids.txt").read_text().split()
            position = {record_id: i for i, record_id in enumerate(ids)}
            self._rows_in_similarity = np.array([position[i] for i in self.record_ids], np.int64)
        return self._rows_in_similarity

    def _attach_text_states(self, root: Path, encoder: str | None, layers: int) -> bool:
        folder = root / "similarity" / "text_states"
        if layers == 0 or not (folder / "states.npy").exists():
            return False
        meta = json.loads((folder / "states.json").read_text())
        if meta != {"frozen_layers": layers, "encoder": encoder}:
            return False  # made for another encoder or depth: recompute them per step
        rows = self._similarity_rows(root)
        offsets = np.load(folder / "offsets.npy")
        spans = np.stack([offsets[rows], offsets[rows + 1]], axis=1)
        lengths = pc.list_value_length(self.tokens.columns["input_ids"]).to_numpy()
        lengths = lengths[self.tokens.rows]
        wrong = np.flatnonzero(spans[:, 1] - spans[:, 0] != lengths)
        if len(wrong):
            i = int(wrong[0])
            raise ValueError(
                f"{folder}: record {self.record_ids[i]} has {spans[i, 1] - spans[i, 0]} token "
                f"states for {lengths[i]} tokens; re-run the similarity stage"
            )
        self.tokens.states = np.load(folder / "states.npy", mmap_mode="r")
        self.tokens.state_spans = spans
        return True

    def _semantics(
        self, root: Path, kind: str, reports: pa.Table, rows: np.ndarray
    ) -> np.ndarray | SemanticRows:
        if kind == "labels":  # 14 numbers a report: small enough to hold
            labels = reports["labels"].take(pa.array(rows)).to_pylist()
            return label_semantics(labels).reshape(-1, len(OBSERVATIONS))
        embeddings = np.load(root / "similarity" / "embeddings.npy", mmap_mode="r")
        return SemanticRows(embeddings, self._similarity_rows(root))

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
