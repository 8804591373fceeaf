"""Stage ``similarity``: the report-similarity cache SIA reads (METHOD.md).

Frozen sentence-encoder embeddings of every cleaned report (Ray Data, batched actors),
exact block-wise top-k neighbours (memory O(N*k)), and statistics that let a user choose the
SIA threshold from data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sista_core.encoders import TextEncoder  # noqa: E402
from sista_core.similarity import similarity_statistics, topk_neighbours  # noqa: E402

from .artifacts import atomic_output_dir  # noqa: E402
from .config import Params  # noqa: E402
from .runtime import ensure_ray  # noqa: E402
from .stage import stage_dir, stage_main  # noqa: E402
from .tracking import stage_run  # noqa: E402


class SentenceEmbedder:
    """Ray Data actor: loads the frozen encoder once, embeds batches of report texts."""

    def __init__(self, encoder: str | None, max_length: int) -> None:
        torch.set_num_threads(1)
        self.encoder = TextEncoder(encoder, max_length=max_length).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            pooled = self.encoder.encode([str(t) for t in batch["text"]])["global"]
        batch["embedding"] = F.normalize(pooled, dim=-1).numpy().astype(np.float16)
        return batch


def embed_reports(texts: list[str], params: Params) -> np.ndarray:
    """(N, D) float16 L2-normalised sentence embeddings, in input order."""
    config = params.similarity
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    dataset = ray.data.from_items([{"position": i, "text": t} for i, t in enumerate(texts)])
    embedded = dataset.map_batches(
        SentenceEmbedder,
        fn_constructor_args=(config.encoder, params.reports.max_length),
        batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(size=config.num_actors),
        num_cpus=1,
        batch_format="numpy",
    )
    batches = list(embedded.iter_batches(batch_size=None, batch_format="numpy"))
    order = np.concatenate([b["position"] for b in batches])
    vectors = np.concatenate([b["embedding"] for b in batches])
    return vectors[np.argsort(order)]


def plot_statistics(stats: dict[str, Any], threshold: float, path: Path) -> None:
    """Histogram of report-report similarity with the configured SIA threshold marked."""
    edges = np.array(stats["bin_edges"])
    counts = np.array(stats["histogram"], dtype=float)
    figure, axis = plt.subplots(figsize=(7, 3.5))
    axis.bar(edges[:-1], counts / counts.sum(), width=np.diff(edges), align="edge")
    axis.axvline(threshold, color="crimson", linestyle="--", label=f"sia.threshold = {threshold}")
    axis.set_xlabel("cosine similarity of two reports (frozen MiniLM)")
    axis.set_ylabel("fraction of report pairs")
    axis.set_yscale("log")
    axis.legend()
    axis.set_title(f"{stats['num_reports']} reports ({stats['method']})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(params: Params, args: argparse.Namespace | None = None) -> dict[str, Any]:
    config = params.similarity
    reports = pq.read_table(
        stage_dir(params, "reports") / "reports.parquet", columns=["record_id", "text"]
    ).to_pylist()
    ensure_ray(params)
    with (
        stage_run(params, "similarity", logged={"similarity": config.model_dump()}) as run_,
        atomic_output_dir(
            stage_dir(params, "similarity"), "similarity", {"mlflow_run_id": run_.info.run_id}
        ) as (out, extra),
    ):
        embeddings = embed_reports([r["text"] for r in reports], params)
        np.save(out / "embeddings.npy", embeddings)
        ids = [r["record_id"] for r in reports]
        (out / "record_ids.txt").write_text("\n".join(ids) + "\n")

        vectors = torch.from_numpy(embeddings)
        k = min(config.top_k, len(ids) - 1)
        indices, sims = topk_neighbours(vectors, k, block_size=config.block_size)
        pq.write_table(
            pa.table(
                {
                    "record_id": ids,
                    "neighbour_ids": [[ids[j] for j in row] for row in indices.tolist()],
                    "similarity": sims.numpy().tolist(),
                }
            ),
            out / "topk.parquet",
            compression="zstd",
        )
        global_batch = params.pretrain.optim.batch_size * params.pretrain.workers
        stats = similarity_statistics(
            vectors,
            thresholds=config.thresholds,
            batch_size=global_batch,
            seed=params.ingest.seed,
        )
        (out / "stats.json").write_text(json.dumps(stats, indent=2))
        plot_statistics(stats, params.pretrain.sia.threshold, out / "similarity_histogram.png")
        threshold_key = str(float(params.pretrain.sia.threshold))
        summary = {
            "reports": len(ids),
            "mean_similarity": round(stats["mean"], 4),
            "batch_false_negative_rate": stats["batch"]
            .get(threshold_key, {})
            .get("pair_fraction_mean"),
        }
        extra["summary"] = summary
        mlflow.log_metrics({k: float(v) for k, v in summary.items() if v is not None})
        mlflow.log_artifact(str(out / "similarity_histogram.png"))
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return stage_main("similarity", run, argv)


if __name__ == "__main__":
    main()
