"""Stage ``similarity``: the report-similarity cache SIA reads (docs/method.md).

Frozen sentence-encoder embeddings of every cleaned report (Ray Data, batched actors),
exact block-wise top-k neighbours (memory O(N*k)), and statistics that let a user choose the
SIA threshold from data. Where pre-training freezes the first layers of this same encoder,
the states after those layers are kept too (``text_states/``): pre-training reads them
instead of recomputing them at every step of every variant.

Incremental: when the previous output was made with the same settings and code, a report
whose text and tokens are unchanged (``report_digests.txt``) keeps its embedding and states,
and only new or changed reports are embedded. When the previous reports are all still there,
unchanged, the top-k lists are merged with the new reports' (``add_neighbours``: the lists a
rebuild gives, for new x all products) instead of rebuilt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any, BinaryIO

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from components.platform.config import Params  # noqa: E402
from components.platform.lineage import code_version  # noqa: E402
from components.platform.runtime import ensure_ray  # noqa: E402
from components.platform.stage import stage_dir, stage_main  # noqa: E402
from components.platform.stage_storage import previous_output, stage_output  # noqa: E402
from components.platform.tracking import stage_run  # noqa: E402
from components.stages.pretrain_data import TOKEN_COLUMNS, label_semantics  # noqa: E402
from components.stages.reports import TOKENS_FILE, read_token_table  # noqa: E402
from sista_core.encoders import TextEncoder  # noqa: E402
from sista_core.encoders.text import collate_tokens  # noqa: E402
from sista_core.similarity import (  # noqa: E402
    add_neighbours,
    flag_quality,
    similarity_statistics,
    topk_neighbours,
)

TEXT_STATES = "text_states"  # folder: the pre-training text encoder's frozen-layer states
QUALITY_REPORTS = 20_000  # flag precision and recall: every pair of at most this many reports


class SentenceEmbedder:
    """Ray Data actor: loads the frozen encoder once, embeds batches of reports. Where the
    reports stage tokenised for this same model (``own_tokens`` False), its stored tokens are
    used, so the states below line up with what pre-training reads; otherwise (pre-training
    trains another text model) the cleaned text is tokenised with this encoder's own
    tokenizer: another model's token ids would be embedded as if they were this one's.

    With ``state_layers`` > 0 it also returns each report's states after that many layers:
    the same passes compute them on the way to the embedding, and pre-training then skips
    its frozen layers (a quarter of a training step on the default profile).
    """

    def __init__(
        self, encoder: str | None, max_length: int, state_layers: int, own_tokens: bool
    ) -> None:
        torch.set_num_threads(1)
        self.state_layers, self.own_tokens = state_layers, own_tokens
        self.encoder = TextEncoder(encoder, max_length=max_length, freeze_layers=state_layers)
        self.encoder.eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.own_tokens:
            tokens = self.encoder.tokenize([str(text) for text in batch["text"]])
        else:
            rows = range(len(batch["position"]))
            records = [{c: batch[c][i] for c in TOKEN_COLUMNS} for i in rows]
            tokens = collate_tokens(records, self.encoder.tokenizer.pad_token_id)
        with torch.inference_mode():
            if self.state_layers:
                tokens.frozen_states = self.encoder.frozen_states(tokens)
            pooled = self.encoder(tokens)["global"]
        embedded = {
            "position": batch["position"],
            "embedding": F.normalize(pooled, dim=-1).numpy().astype(np.float16),
        }
        if self.state_layers:
            lengths = tokens.attention_mask.sum(1).tolist()
            states = np.empty(len(lengths), dtype=object)
            states[:] = [s[:n].numpy() for s, n in zip(tokens.frozen_states, lengths, strict=True)]
            embedded["states"] = states
        return embedded


def shares_tokens(params: Params) -> bool:
    """Do pre-training and this stage use the same text model (so the reports stage's tokens,
    made with pre-training's tokenizer, are this encoder's tokens too)?"""
    return params.pretrain.text.name_or_path == params.similarity.encoder


def state_layers(params: Params) -> int:
    """How many frozen layers' states to keep for pre-training: its ``freeze_layers`` when it
    uses this stage's encoder and tokens, else 0 (nothing to share)."""
    text = params.pretrain.text
    return text.freeze_layers if shares_tokens(params) and text.freeze_layers != 0 else 0


class TextStatesWriter:
    """``text_states/``: ``states.npy`` (all tokens, Dt) float32 in record order, ``offsets.npy``
    (N + 1) and ``states.json`` saying which encoder and layers made them (layers 0: none
    kept). Each report's states are written at their place as they arrive, through the file
    (not a memory map), so the stage never holds them together."""

    def __init__(self, folder: Path, token_counts: list[int], layers: int, params: Params):
        folder.mkdir()
        self.folder, self.layers = folder, layers
        self.offsets = np.cumsum([0, *token_counts]) if layers else None
        self.data_start: int | None = None  # byte offset of the array in states.npy
        self.width = 0
        self.handle: BinaryIO | None = None  # states.npy, open from the first write
        meta = {"frozen_layers": layers, "encoder": params.similarity.encoder}
        (folder / "states.json").write_text(json.dumps(meta))
        if layers:
            np.save(folder / "offsets.npy", self.offsets)

    def write(self, position: int, states: np.ndarray) -> None:
        states = np.ascontiguousarray(states, np.float32)
        path = self.folder / "states.npy"
        if self.data_start is None:
            self.width = states.shape[1]
            header = np.lib.format.open_memmap(
                path, mode="w+", dtype=np.float32, shape=(int(self.offsets[-1]), self.width)
            )
            self.data_start = header.offset
            del header
            self.handle = open(path, "r+b")  # noqa: SIM115 (closed by close())
        start, stop = self.offsets[position], self.offsets[position + 1]
        if len(states) != stop - start:
            raise ValueError(f"report {position}: {len(states)} states for {stop - start} tokens")
        self.handle.seek(self.data_start + int(start) * self.width * 4)
        self.handle.write(states.tobytes())

    def __enter__(self) -> TextStatesWriter:
        return self

    def __exit__(self, *_: object) -> None:
        if self.handle is not None:
            self.handle.close()


def embed_reports(
    reports: pa.Table,
    lengths: np.ndarray,
    params: Params,
    out: Path,
    states: TextStatesWriter | None = None,
) -> np.ndarray:
    """``out`` (``embeddings.npy``): the (N, D) float16 L2-normalised sentence embeddings of
    the token table ``reports`` (``lengths``: each one's token count), in its order, returned
    memory-mapped; with
    ``state_layers(params)`` > 0 each report's (T_i, Dt) frozen-layer states go to ``states``
    as their batch arrives.

    Batches are cut from the reports sorted by length, so each pads to little more than its
    own texts: 1.7x the texts/s of file order (``bench.similarity``), same embeddings. Each
    batch is its own Arrow block in the object store: an actor holds one batch, whatever the
    number of reports, and the driver holds none as Python objects.
    """
    config = params.similarity
    layers = state_layers(params)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    by_length = np.argsort(lengths, kind="stable")
    own_tokens = not shares_tokens(params)
    source = reports.select(["text"] if own_tokens else list(TOKEN_COLUMNS))
    blocks = []
    for start in range(0, len(by_length), config.batch_size):
        rows = pa.array(by_length[start : start + config.batch_size])
        blocks.append(ray.put(source.take(rows).append_column("position", rows)))
    embedded = ray.data.from_arrow_refs(blocks).map_batches(
        SentenceEmbedder,
        fn_constructor_args=(config.encoder, params.reports.max_length, layers, own_tokens),
        batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(size=config.num_actors),
        num_cpus=1,
        batch_format="numpy",
    )
    vectors: np.ndarray | None = None
    for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
        if vectors is None:
            shape = (len(by_length), batch["embedding"].shape[1])
            vectors = np.lib.format.open_memmap(out, mode="w+", dtype=np.float16, shape=shape)
        vectors[batch["position"]] = batch["embedding"]
        if layers and states is not None:
            # A batch of equal lengths arrives as one (n, T, Dt) tensor, a ragged one as n arrays.
            for position, report_states in zip(batch["position"], batch["states"], strict=True):
                states.write(int(position), np.asarray(report_states))
    if vectors is None:
        raise ValueError("no reports to embed")
    vectors.flush()
    return vectors


def embed_new_reports(
    reports: pa.Table,
    lengths: np.ndarray,
    params: Params,
    out: Path,
    states: TextStatesWriter,
    previous: PreviousSimilarity | None,
    kept: list[int | None],
    new: np.ndarray,
) -> np.ndarray:
    """:func:`embed_reports` for the reports at positions ``new`` only; the others (``kept``:
    their row in ``previous``) take their embedding and states from the previous output."""
    if previous is None or len(new) == len(kept):
        return embed_reports(reports, lengths, params, out, states)
    vectors = np.lib.format.open_memmap(
        out, mode="w+", dtype=np.float16, shape=(len(kept), previous.embeddings.shape[1])
    )
    positions = np.array([i for i, row in enumerate(kept) if row is not None], np.int64)
    rows = np.array([row for row in kept if row is not None], np.int64)
    vectors[positions] = previous.embeddings[rows]
    if previous.states is not None and state_layers(params):
        for position, row in zip(positions.tolist(), rows.tolist(), strict=True):
            states.write(position, previous.report_states(row))
    if len(new):
        partial = out.with_name("new_embeddings.npy")
        subset = reports.take(pa.array(new))
        added = embed_reports(subset, lengths[new], params, partial, _Positions(states, new))
        vectors[new] = added
        del added
        partial.unlink()
    vectors.flush()
    return vectors


def findings_key(labels: list[float]) -> tuple[int, ...]:
    """What a report's phantom is drawn from: the findings it states positive or uncertain.
    Two reports with the same key are false negatives of each other."""
    return tuple(i for i, value in enumerate(labels) if value in (1.0, -1.0))


def semantics_quality(
    embeddings: np.ndarray, labels: np.ndarray, thresholds: list[float], seed: int
) -> dict[str, dict]:
    """``flag_quality`` of each ``pretrain.semantics`` source against labeler-equal findings,
    over every pair of (at most 20,000 seeded) reports."""
    chosen = np.arange(len(labels))
    if len(chosen) > QUALITY_REPORTS:
        chosen = np.sort(np.random.default_rng(seed).choice(len(chosen), QUALITY_REPORTS, False))
    truth = [findings_key(labels[i]) for i in chosen]
    sources = {
        "embedding": torch.from_numpy(np.asarray(embeddings, np.float32)[chosen]),
        "labels": torch.from_numpy(label_semantics(np.asarray(labels)[chosen])),
    }
    return {name: flag_quality(vectors, truth, thresholds) for name, vectors in sources.items()}


def plot_statistics(stats: dict[str, Any], threshold: float, source: str, path: Path) -> None:
    """Histogram of report-report similarity with the configured SIA threshold marked, and
    the precision and recall of each semantics source's flags against equal findings."""
    edges = np.array(stats["bin_edges"])
    counts = np.array(stats["histogram"], dtype=float)
    figure, (axis, quality) = plt.subplots(1, 2, figsize=(12, 3.8))
    axis.bar(edges[:-1], counts / counts.sum(), width=np.diff(edges), align="edge")
    axis.axvline(threshold, color="crimson", linestyle="--", label=f"sia.threshold = {threshold}")
    encoder = "frozen MiniLM embeddings" if source == "embedding" else "labeler finding vectors"
    axis.set_xlabel(f"cosine similarity of two reports ({encoder})")
    axis.set_ylabel("fraction of report pairs")
    axis.set_yscale("log")
    axis.legend()
    axis.set_title(f"{stats['num_reports']} reports ({stats['method']})")
    for name, table in stats["flag_quality"].items():
        levels = sorted(float(k) for k in table if k != "equal_fraction")
        for metric, style in (("precision", "-"), ("recall", "--")):
            values = [table[str(level)][metric] for level in levels]
            quality.plot(levels, values, style, marker="o", label=f"{name} {metric}")
    quality.axvline(threshold, color="crimson", linestyle=":", label=f"δ, semantics={source}")
    quality.set_xlabel("threshold δ")
    quality.set_ylabel("against labeler-equal findings")
    quality.set_ylim(-0.02, 1.02)
    quality.legend(fontsize=7)
    quality.set_title("which pairs SIA flags: precision and recall")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report_digests(reports: pa.Table) -> list[str]:
    """Per report, a digest of what its embedding and states are computed from: its cleaned
    text and its token ids."""
    texts = reports.column("text").to_pylist()
    tokens = reports.column("input_ids").to_pylist()
    return [
        hashlib.blake2b(json.dumps([text, ids]).encode(), digest_size=12).hexdigest()
        for text, ids in zip(texts, tokens, strict=True)
    ]


def embedding_settings(params: Params) -> dict[str, Any]:
    """What every embedding, state and similarity of the output depends on besides the reports."""
    return {
        "similarity": params.similarity.model_dump(mode="json"),
        "max_length": params.reports.max_length,
        "text": params.pretrain.text.model_dump(mode="json"),
        "state_layers": state_layers(params),
        "code": code_version(),
    }


class PreviousSimilarity:
    """The last completed output of this stage, when made with the same settings and code:
    its embeddings, states and top-k lists by (record id, digest)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        ids = (folder / "record_ids.txt").read_text().split()
        digests = (folder / "report_digests.txt").read_text().split()
        self.row = {pair: i for i, pair in enumerate(zip(ids, digests, strict=True))}
        self.embeddings = np.load(folder / "embeddings.npy", mmap_mode="r")
        self.offsets = self.states = None  # kept only where pre-training reads them
        if (folder / TEXT_STATES / "offsets.npy").exists():
            self.offsets = np.load(folder / TEXT_STATES / "offsets.npy")
            self.states = np.load(folder / TEXT_STATES / "states.npy", mmap_mode="r")

    @classmethod
    def of(cls, params: Params, settings: dict[str, Any]) -> PreviousSimilarity | None:
        """The previous output, when made with ``settings`` (:func:`embedding_settings`)."""
        previous = previous_output(params, "similarity")
        if previous is None or previous[1].get("settings") != settings:
            return None
        try:
            return cls(previous[0])
        except (OSError, ValueError):
            return None

    def report_states(self, row: int) -> np.ndarray:
        return self.states[self.offsets[row] : self.offsets[row + 1]]

    def topk(self, ids: pa.Array, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The old lists as (N, k) positions in ``ids``, the new order (-1 rows for the new
        reports; every old report must be among them, unchanged), or None for another k."""
        table = pq.read_table(self.folder / "topk.parquet")
        neighbours = table.column("neighbour_ids").combine_chunks()
        if len(neighbours) and len(neighbours[0]) != k:
            return None

        def positions(names: pa.Array) -> torch.Tensor:
            return torch.from_numpy(pc.index_in(names, value_set=ids).to_numpy().astype(np.int64))

        indices = torch.full((len(ids), k), -1, dtype=torch.long)
        sims = torch.full((len(ids), k), float("-inf"))
        rows = positions(table.column("record_id").combine_chunks())
        indices[rows] = positions(neighbours.flatten()).view(-1, k)
        sims[rows] = torch.from_numpy(
            table.column("similarity").combine_chunks().flatten().to_numpy().reshape(-1, k)
        ).float()
        return indices, sims


class _Positions:
    """A states writer seen through a subset's positions (its row i is the full row rows[i])."""

    def __init__(self, writer: TextStatesWriter, rows: np.ndarray) -> None:
        self.writer, self.rows = writer, rows

    def write(self, position: int, states: np.ndarray) -> None:
        self.writer.write(int(self.rows[position]), states)


def neighbour_table(ids: pa.Array, indices: torch.Tensor, sims: torch.Tensor) -> pa.Table:
    """``topk.parquet``: each report's id, its k neighbours' ids and their similarities,
    built as Arrow columns (not N*k Python objects)."""
    k = indices.shape[1]
    offsets = pa.array(np.arange(0, len(ids) * k + 1, k, dtype=np.int32))
    neighbours = ids.take(pa.array(indices.reshape(-1).numpy()))
    return pa.table(
        {
            "record_id": ids,
            "neighbour_ids": pa.ListArray.from_arrays(offsets, neighbours),
            "similarity": pa.ListArray.from_arrays(offsets, pa.array(sims.reshape(-1).numpy())),
        }
    )


def run(params: Params, args: argparse.Namespace | None = None) -> dict[str, Any]:
    config = params.similarity
    reports = read_token_table(stage_dir(params, "reports") / TOKENS_FILE)
    ensure_ray(params)
    with (
        stage_run(params, "similarity", logged={"similarity": config.model_dump()}) as run_,
        stage_output(params, "similarity", {"mlflow_run_id": run_.info.run_id}) as (out, extra),
    ):
        layers = state_layers(params)
        lengths = pc.list_value_length(reports.column("input_ids")).to_numpy()
        ids = reports.column("record_id").combine_chunks()
        digests = report_digests(reports)
        settings = embedding_settings(params)  # reads every source file once (code version)
        previous = PreviousSimilarity.of(params, settings)
        kept = [
            previous.row.get(pair) if previous else None
            for pair in zip(ids.to_pylist(), digests, strict=True)
        ]
        new = np.array([i for i, row in enumerate(kept) if row is None], np.int64)
        with TextStatesWriter(out / TEXT_STATES, lengths.tolist(), layers, params) as states:
            embeddings = embed_new_reports(
                reports, lengths, params, out / "embeddings.npy", states, previous, kept, new
            )
        with open(out / "record_ids.txt", "w") as listing:
            listing.writelines(f"{record_id}\n" for record_id in ids.to_pylist())
        (out / "report_digests.txt").write_text("".join(f"{d}\n" for d in digests))

        vectors = torch.from_numpy(np.asarray(embeddings))
        k = min(config.top_k, len(ids) - 1)
        # Merged only when every old report is still there, unchanged (reused).
        reused = len(kept) - len(new)
        appended = previous is not None and reused == len(previous.row)
        old_lists = previous.topk(ids, k) if appended else None
        if old_lists is not None and not len(new):
            indices, sims = old_lists
        elif old_lists is not None:
            indices, sims = add_neighbours(
                vectors, *old_lists, torch.from_numpy(new), block_size=config.block_size
            )
        else:
            indices, sims = topk_neighbours(vectors, k, block_size=config.block_size)
        extra["settings"] = settings
        extra["counts"] = {
            "embedded": len(new),
            "reused": reused,
            "topk": "computed" if old_lists is None else "merged" if len(new) else "reused",
        }
        neighbours = neighbour_table(ids, indices, sims)
        pq.write_table(neighbours, out / "topk.parquet", compression="zstd")
        threshold, source = params.pretrain.sia.threshold, params.pretrain.semantics
        levels = sorted({*config.thresholds, float(threshold)})
        labels = reports.column("labels").combine_chunks()
        labels = labels.flatten().to_numpy(zero_copy_only=False).reshape(len(labels), -1)
        # The distribution and in-batch rates of the semantics pre-training will compare.
        semantics = vectors if source == "embedding" else label_semantics(labels)
        global_batch = params.pretrain.optim.batch_size * params.pretrain.workers
        stats = similarity_statistics(
            F.normalize(torch.as_tensor(semantics, dtype=torch.float32), dim=1),
            thresholds=levels,
            batch_size=global_batch,
            seed=params.ingest.seed,
        )
        stats["semantics"] = source
        stats["flag_quality"] = semantics_quality(embeddings, labels, levels, params.ingest.seed)
        (out / "stats.json").write_text(json.dumps(stats, indent=2))
        plot_statistics(stats, threshold, source, out / "similarity_histogram.png")
        threshold_key = str(float(threshold))
        chosen = stats["flag_quality"][source][threshold_key]
        summary = {
            "reports": len(ids),
            "reports_embedded": len(new),
            "mean_similarity": round(stats["mean"], 4),
            "batch_false_negative_rate": stats["batch"]
            .get(threshold_key, {})
            .get("pair_fraction_mean"),
            "equal_findings_pair_fraction": stats["flag_quality"][source]["equal_fraction"],
            "flag_precision": chosen["precision"],
            "flag_recall": chosen["recall"],
            "flagged_pair_fraction": chosen["flagged_fraction"],
        }
        mlflow.log_params({"sia.threshold": threshold, "semantics": source})
        extra["summary"] = summary
        mlflow.log_metrics({k: float(v) for k, v in summary.items() if v is not None and v == v})
        mlflow.log_artifact(str(out / "similarity_histogram.png"))
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return stage_main("similarity", run, argv)


if __name__ == "__main__":
    main()
