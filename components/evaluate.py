"""Stage ``evaluate``: downstream linear probes fanned out with Ray Tune.

Cells are init x label fraction x seed. Each initialisation's frozen features are computed
once (a Ray task per init); every Tune trial then trains a probe on cached features, so a
cell costs seconds, not a model start-up. Images are phantoms: results say so.
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
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from ray import tune  # noqa: E402

from sista_core.encoders import ImageEncoder  # noqa: E402
from sista_core.findings import CHEXPERT_COMPETITION  # noqa: E402

from .artifacts import atomic_output_dir  # noqa: E402
from .config import Params  # noqa: E402
from .ingest import read_shard_images, subset_file_name  # noqa: E402
from .probe_trial import probe_cell  # noqa: E402
from .runtime import ensure_ray  # noqa: E402
from .stage import stage_dir, stage_main  # noqa: E402
from .tracking import stage_run  # noqa: E402

PHANTOM_NOTE = "phantom images (synthetic), real CheXpert label statistics"


def load_encoder(init: str, params: Params) -> ImageEncoder:
    """A pre-trained run's image encoder, or a seeded random one (``random``)."""
    if init == "random":
        torch.manual_seed(params.pretrain.seed)
        image = params.pretrain.image
        return ImageEncoder(image.name, pretrained=False, img_size=image.img_size)
    return ImageEncoder.from_pretrained(stage_dir(params, "pretrain") / init / "model")


@ray.remote(num_cpus=1)
def extract_features(init: str, params: Params, images_path: str, out_path: str) -> str:
    """Frozen global features of every downstream image for one initialisation."""
    torch.set_num_threads(1)
    encoder = load_encoder(init, params).eval()
    images = np.load(images_path, mmap_mode="r")
    features = []
    with torch.inference_mode():
        for start in range(0, len(images), 128):
            batch = torch.from_numpy(np.array(images[start : start + 128]))
            features.append(encoder(encoder.normalize(batch))["global"].float())
    np.save(out_path, torch.cat(features).numpy())
    return out_path


def downstream_arrays(params: Params, out: Path) -> tuple[Path, Path, Path]:
    """Images, labels and the saved subsets of the downstream set, as files trials read."""
    ingest_dir = stage_dir(params, "ingest")
    rows = [
        r
        for r in pq.read_table(ingest_dir / "manifest.parquet").to_pylist()
        if r["dataset"] == "downstream"
    ]
    images = read_shard_images(ingest_dir, rows)
    labels = np.array([[r[name] for name in CHEXPERT_COMPETITION] for r in rows], np.float32)
    position = {r["record_id"]: i for i, r in enumerate(rows)}
    config = params.ingest.downstream
    subsets = {}
    for seed in config.seeds:
        for fraction in config.label_fractions:
            ids = (ingest_dir / "subsets" / subset_file_name(fraction, seed)).read_text().split()
            subsets[f"{fraction:g}/{seed}"] = [position[i] for i in ids]
    split = {
        "test": [i for i, r in enumerate(rows) if r["split"] == "test"],
        "val": [i for i, r in enumerate(rows) if r["split"] == "val"],
        "subsets": subsets,
    }
    paths = (out / "images.npy", out / "labels.npy", out / "split.json")
    np.save(paths[0], images)
    np.save(paths[1], labels)
    paths[2].write_text(json.dumps(split))
    return paths


def summarise(cells: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """init -> fraction -> mean, std over seeds, n."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for init in sorted({c["init"] for c in cells}):
        for fraction in sorted({c["fraction"] for c in cells}):
            scores = [c["auroc"] for c in cells if c["init"] == init and c["fraction"] == fraction]
            table.setdefault(init, {})[f"{fraction:g}"] = {
                "mean": float(np.mean(scores)),
                "std": float(np.std(scores)),
                "n": len(scores),
            }
    return table


def plot_fraction_curves(summary: dict, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(6, 4))
    for init, by_fraction in summary.items():
        fractions = sorted(by_fraction, key=float)
        x = [100 * float(f) for f in fractions]
        mean = np.array([by_fraction[f]["mean"] for f in fractions])
        std = np.array([by_fraction[f]["std"] for f in fractions])
        axis.plot(x, mean, marker="o", label=init)
        axis.fill_between(x, mean - std, mean + std, alpha=0.2)
    axis.set_xscale("log")
    axis.set_xlabel("% of training labels")
    axis.set_ylabel("macro AUROC (5 findings), test")
    axis.set_title(f"Linear probe; {PHANTOM_NOTE}", fontsize=8)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(params: Params, args: argparse.Namespace | None = None) -> dict[str, Any]:
    config = params.evaluate
    ensure_ray(params)
    with (
        stage_run(params, "evaluate", logged={"evaluate": config.model_dump()}) as run_,
        atomic_output_dir(
            stage_dir(params, "evaluate"), "evaluate", {"mlflow_run_id": run_.info.run_id}
        ) as (out, extra),
    ):
        work = out.resolve() / "features"  # absolute: Tune trials run in their own folders
        work.mkdir()
        images_path, labels_path, split_path = downstream_arrays(params, work)
        ray.get(
            [
                extract_features.remote(init, params, str(images_path), str(work / f"{init}.npy"))
                for init in config.inits
            ]
        )
        tuner = tune.Tuner(
            tune.with_resources(probe_cell, {"cpu": config.cpus_per_trial}),
            param_space={
                "init": tune.grid_search(list(config.inits)),
                "fraction": tune.grid_search(list(params.ingest.downstream.label_fractions)),
                "seed": tune.grid_search(list(params.ingest.downstream.seeds)),
                "features_dir": str(work),
                "labels_path": str(labels_path),
                "split_path": str(split_path),
                "epochs": config.probe_epochs,
                "lr": config.probe_lr,
                "weight_decay": config.probe_weight_decay,
            },
            # Reused trial processes import torch once, not once per cell.
            tune_config=tune.TuneConfig(reuse_actors=True),
            run_config=tune.RunConfig(
                name="evaluate",
                storage_path=str(Path(params.storage.uri).resolve() / "tune"),
                verbose=0,
            ),
        )
        results = tuner.fit()
        cells = []
        for result in results:
            if result.error:
                raise RuntimeError(f"evaluation cell {result.config} failed: {result.error}")
            cells.append(
                {
                    "task": "classification",
                    "init": result.config["init"],
                    "fraction": result.config["fraction"],
                    "seed": result.config["seed"],
                    "auroc": result.metrics["auroc"],
                    "per_label": result.metrics["per_label"],
                    "train_size": result.metrics["train_size"],
                }
            )
        cells.sort(key=lambda c: (c["init"], c["fraction"], c["seed"]))
        summary = summarise(cells)
        (out / "cells.json").write_text(json.dumps(cells, indent=1))
        metrics = {"classification": {"auroc": summary}, "images": PHANTOM_NOTE}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        plot_fraction_curves(summary, out / "auroc_vs_fraction.png")
        for path in (images_path, labels_path):
            path.unlink()  # large and re-derivable from ingest; keep features and splits
        mlflow.log_metrics(
            {
                f"auroc.{init}.{fraction}": value["mean"]
                for init, by_fraction in summary.items()
                for fraction, value in by_fraction.items()
            }
        )
        mlflow.log_artifact(str(out / "auroc_vs_fraction.png"))
        extra["summary"] = summary
    return {init: {f: round(v["mean"], 3) for f, v in s.items()} for init, s in summary.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return stage_main("evaluate", run, argv)


if __name__ == "__main__":
    main()
