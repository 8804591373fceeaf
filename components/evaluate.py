"""Stage ``evaluate``: the downstream suite, fanned out with Ray Tune.

Trained tasks (classification: linear probe, AUROC; segmentation: decoder, Dice; detection:
one-stage head, mAP) are cells of task x init x label fraction x seed. Each initialisation's
frozen features are computed once (a Ray task per init); every Tune trial then trains a head
on cached features, so a cell costs seconds, not a model start-up. The language tasks
(zero-shot classification from prompts, image-report retrieval) need no labels: one score
per init that has a text encoder. Images are phantoms: results say so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import time
from collections.abc import Iterator
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
from matplotlib.patches import Rectangle  # noqa: E402
from ray import tune  # noqa: E402
from tqdm import tqdm  # noqa: E402

from sista_core.findings import CHEXPERT_COMPETITION  # noqa: E402

from .config import LANGUAGE_TASKS, TRAINED_TASKS, Params  # noqa: E402
from .evaluation_cells import TASK_DATASETS, features_path, load_encoder  # noqa: E402
from .evaluation_trial import evaluation_cell  # noqa: E402
from .ingest import read_shard_images, read_shard_masks, row_boxes, subset_file_name  # noqa: E402
from .runtime import ensure_ray, on_this_node, this_node_resource  # noqa: E402
from .stage import stage_dir, stage_main  # noqa: E402
from .stage_storage import data_root, ray_storage, stage_output  # noqa: E402
from .tracking import stage_run  # noqa: E402

THRESHOLD_TASKS = ("segmentation", "opacity_segmentation")  # choose a threshold on val
PHANTOM_NOTE = "phantom images (synthetic) placed by real CheXpert labels, SIIM masks, RSNA boxes"
# The metrics each task reports; the first is the one plotted against the label fraction.
TASK_METRICS = {
    "classification": ("auroc",),
    "segmentation": ("dice",),
    "opacity_segmentation": ("dice",),
    "detection": ("map_40_75", "map_50"),
    "zero_shot": ("auroc",),
    "retrieval": tuple(
        f"{direction}_recall_at_{k}"
        for direction in ("image_to_text", "text_to_image")
        for k in (1, 5, 10)
    ),
}
METRIC_LABELS = {
    "auroc": "macro AUROC (5 findings)",
    "dice": "Dice on images with the finding",
    "map_40_75": "mAP@[0.4:0.75] (opacity boxes)",
}
# Language tasks use no labels: their column in the tables is "0 % labels".
NO_LABELS = "0"


def encoder_spec(params: Params) -> dict[str, Any]:
    """What ``load_encoder`` needs to rebuild any initialisation, as plain values."""
    image = params.pretrain.image
    return {
        "pretrain_dir": str(stage_dir(params, "pretrain").resolve()),
        "name": image.name,
        "img_size": image.img_size,
        "seed": params.pretrain.seed,
    }


def rows_read(work: Path, dataset: str, trained: list[str]) -> np.ndarray:
    """Rows of a set that some cell reads: the test split, the training subsets, and the
    validation split where a segmentation cell picks its threshold there."""
    split = json.loads((work / f"{dataset}.split.json").read_text())
    rows = set(split["test"]).union(*split["subsets"].values())
    if any(TASK_DATASETS[t] == dataset and t in THRESHOLD_TASKS for t in trained):
        rows |= set(split["val"])
    return np.array(sorted(rows), dtype=np.int64)


@ray.remote(num_cpus=1)
def extract_features(init: str, params: Params, work: str, datasets: dict[str, list]) -> str:
    """One initialisation's frozen features of every downstream set it is scored on: the
    global vector for classification, the feature pyramid for segmentation and detection.
    ``datasets`` maps each set to the rows to encode; the others (a validation split no
    cell reads) stay zero, which saves their encoder passes."""
    torch.set_num_threads(1)
    encoder = load_encoder(init, encoder_spec(params)).eval()
    levels = params.evaluate.pyramid_levels
    for dataset, rows in datasets.items():
        images = np.load(Path(work) / f"{dataset}.images.npy", mmap_mode="r")
        outputs: list[list[torch.Tensor]] = []
        with torch.inference_mode():
            for start in range(0, len(rows), 128):
                chosen = np.asarray(images[rows[start : start + 128]])
                batch = encoder.normalize(torch.from_numpy(chosen))
                if dataset == "downstream":
                    outputs.append([encoder(batch)["global"].float()])
                else:
                    outputs.append([level.half() for level in encoder.pyramid(batch, levels)])
        encoded = [torch.cat(level).numpy() for level in zip(*outputs, strict=True)]
        stacked = [np.zeros((len(images), *level.shape[1:]), level.dtype) for level in encoded]
        for full, level in zip(stacked, encoded, strict=True):
            full[rows] = level
        path = features_path(Path(work), init, dataset)
        if dataset == "downstream":
            np.save(path, stacked[0])
        else:
            np.savez(path, **{f"level_{i}": level for i, level in enumerate(stacked)})
    return init


@ray.remote(num_cpus=1)
def language_scores(init: str, params: Params, work: str) -> dict[str, dict[str, float]]:
    """Zero-shot AUROC on the classification test split and retrieval recall@k on the
    held-out pre-training pairs, for a pre-trained model (text encoder included)."""
    from sista_core import SISTAModel
    from sista_core.probe import macro_auroc
    from sista_core.zeroshot import zero_shot_logits

    from .pretrain import retrieval_recall
    from .pretrain_data import PretrainData

    torch.set_num_threads(1)
    tasks = params.evaluate.tasks
    model = SISTAModel.from_pretrained(stage_dir(params, "pretrain") / init / "model").eval()
    scores: dict[str, dict[str, float]] = {}
    if "zero_shot" in tasks:
        test = json.loads((Path(work) / "downstream.split.json").read_text())["test"]
        images = torch.from_numpy(np.load(Path(work) / "downstream.images.npy")[test])
        labels = torch.from_numpy(np.load(Path(work) / "downstream.labels.npy")[test])
        auroc, _ = macro_auroc(zero_shot_logits(model, images), labels)
        scores["zero_shot"] = {"auroc": auroc}
    if "retrieval" in tasks:
        held_out = PretrainData(data_root(params.storage), "val", params.pretrain.semantics)
        recall = retrieval_recall(model, held_out)
        scores["retrieval"] = {
            f"image_to_text_recall_at_{k}": recall[f"val_recall_at_{k}"] for k in (1, 5, 10)
        } | {
            f"text_to_image_recall_at_{k}": recall[f"val_text_to_image_recall_at_{k}"]
            for k in (1, 5, 10)
        }
    return scores


@contextlib.contextmanager
def timed(phase: str, seconds: dict[str, float]) -> Iterator[None]:
    """Print and record how long a phase of the stage took (``phase_seconds`` in
    ``_stage.json``): where evaluate's minutes go, without a profiler."""
    started = time.perf_counter()
    yield
    seconds[phase] = round(time.perf_counter() - started, 1)
    print(f"[evaluate] {phase}: {seconds[phase]} s", flush=True)


class CellProgress(tune.Callback):
    """A progress bar over the grid's cells (Tune's own table is off: verbose=0)."""

    def __init__(self, total: int) -> None:
        self.bar = tqdm(total=total, desc="evaluation cells", unit="cell")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.bar.update()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.bar.update()


def prepare_sets(params: Params, datasets: list[str], work: Path) -> None:
    """Images, targets and the saved subsets of each downstream set, as files trials read:
    ``<set>.images.npy``, labels / masks / boxes, and ``<set>.split.json`` (test and val
    indices, and the training subsets ingest wrote, by ``fraction/seed``)."""
    ingest_dir = stage_dir(params, "ingest")
    manifest = pq.read_table(ingest_dir / "manifest.parquet").to_pylist()
    config = params.ingest.downstream
    for dataset in datasets:
        rows = [r for r in manifest if r["dataset"] == dataset]
        if not rows:
            raise ValueError(
                f"evaluate needs the {dataset!r} set, but ingest wrote none "
                f"(ingest.downstream.{dataset}_patients is 0?)"
            )
        np.save(work / f"{dataset}.images.npy", read_shard_images(ingest_dir, rows))
        if dataset == "downstream":
            labels = [[r[name] for name in CHEXPERT_COMPETITION] for r in rows]
            np.save(work / "downstream.labels.npy", np.array(labels, np.float32))
        elif dataset == "segmentation":
            np.save(work / "segmentation.masks.npy", read_shard_masks(ingest_dir, rows))
        else:
            np.save(work / "detection.masks.npy", read_shard_masks(ingest_dir, rows))
            boxes = [row_boxes(r).tolist() for r in rows]
            detection = {"boxes": boxes, "image_size": params.ingest.image_size}
            (work / "detection.boxes.json").write_text(json.dumps(detection))
        position = {r["record_id"]: i for i, r in enumerate(rows)}
        subsets = {}
        for seed in config.seeds:
            for fraction in config.label_fractions:
                name = subset_file_name(fraction, seed, dataset)
                ids = (ingest_dir / "subsets" / name).read_text().split()
                subsets[f"{fraction:g}/{seed}"] = [position[i] for i in ids]
        split = {
            "test": [i for i, r in enumerate(rows) if r["split"] == "test"],
            "val": [i for i, r in enumerate(rows) if r["split"] == "val"],
            "subsets": subsets,
        }
        (work / f"{dataset}.split.json").write_text(json.dumps(split))


def summarise(cells: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict]]]:
    """task -> metric -> init -> fraction -> mean, std over seeds, n."""
    table: dict[str, dict[str, dict[str, dict]]] = {}
    for task in sorted({c["task"] for c in cells}):
        ours = [c for c in cells if c["task"] == task]
        for metric in TASK_METRICS[task]:
            for init in sorted({c["init"] for c in ours}):
                for fraction in sorted({c["fraction"] for c in ours}):
                    scores = [
                        c[metric] for c in ours if c["init"] == init and c["fraction"] == fraction
                    ]
                    table.setdefault(task, {}).setdefault(metric, {}).setdefault(init, {})[
                        f"{fraction:g}"
                    ] = {
                        "mean": float(np.mean(scores)),
                        "std": float(np.std(scores)),
                        "n": len(scores),
                    }
    return table


def plot_fraction_curves(summary: dict, path: Path) -> None:
    """Score vs label fraction per initialisation, mean with a +- std band, one panel per
    trained task."""
    tasks = [t for t in TRAINED_TASKS if t in summary]
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        metric = TASK_METRICS[task][0]
        for init, by_fraction in summary[task][metric].items():
            fractions = sorted(by_fraction, key=float)
            x = [100 * float(f) for f in fractions]
            mean = np.array([by_fraction[f]["mean"] for f in fractions])
            std = np.array([by_fraction[f]["std"] for f in fractions])
            axis.plot(x, mean, marker="o", label=init)
            axis.fill_between(x, mean - std, mean + std, alpha=0.2)
        axis.set_xscale("log")
        axis.set_xlabel("% of training labels")
        axis.set_ylabel(f"{METRIC_LABELS[metric]}, test")
        axis.set_title(task)
        axis.legend(fontsize=8)
    figure.suptitle(f"Frozen encoder, mean ± std over seeds; {PHANTOM_NOTE}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_examples(work: Path, task: str, inits: list[str], path: Path) -> None:
    """The first test images with ground truth (green) and each init's prediction (red):
    masks as contours and fills, boxes as rectangles with their scores."""
    images = np.load(work / f"{TASK_DATASETS[task]}.images.npy", mmap_mode="r")
    kept = {i: np.load(work / f"examples.{task}.{i}.npz") for i in inits}
    index = next(iter(kept.values()))["index"]
    masks_task = task != "detection"
    dataset = TASK_DATASETS[task]
    truth_masks = np.load(work / f"{dataset}.masks.npy") if masks_task else None
    truth_boxes = (
        json.loads((work / "detection.boxes.json").read_text())["boxes"]
        if task == "detection"
        else None
    )
    figure, axes = plt.subplots(
        len(inits), len(index), figsize=(1.9 * len(index), 2.0 * len(inits)), squeeze=False
    )
    for row, init in enumerate(inits):
        for column, image_index in enumerate(index):
            axis = axes[row][column]
            axis.imshow(images[image_index], cmap="gray")
            axis.set_xticks([])
            axis.set_yticks([])
            if masks_task:
                truth = truth_masks[image_index]
                if truth.any():
                    axis.contour(truth, levels=[0.5], colors="lime", linewidths=0.8)
                predicted = np.ma.masked_where(~kept[init]["predicted"][column], truth)
                axis.imshow(predicted, cmap="autumn", alpha=0.45, vmin=0, vmax=1)
            else:
                for x0, y0, x1, y1 in np.asarray(truth_boxes[image_index]).reshape(-1, 4):
                    axis.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="lime"))
                boxes, scores = kept[init][f"boxes_{column}"], kept[init][f"scores_{column}"]
                for (x0, y0, x1, y1), score in list(zip(boxes, scores, strict=True))[:3]:
                    axis.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="red"))
                    axis.text(x0, y0, f"{score:.2f}", color="red", fontsize=6)
            if column == 0:
                axis.set_ylabel(init)
    figure.suptitle(f"{task}: ground truth green, prediction red; {PHANTOM_NOTE}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def cell_rows(results: tune.ResultGrid) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        if result.error:
            raise RuntimeError(f"evaluation cell {result.config} failed: {result.error}")
        config, metrics = result.config, result.metrics
        rows.append(
            {
                "task": config["task"],
                "init": config["init"],
                "fraction": config["fraction"],
                "seed": config["seed"],
                "train_size": metrics["train_size"],
                **{name: metrics[name] for name in TASK_METRICS[config["task"]]},
                **({"per_label": metrics["per_label"]} if "per_label" in metrics else {}),
            }
        )
    return sorted(rows, key=lambda c: (c["task"], c["init"], c["fraction"], c["seed"]))


def language_summary(scores: dict[str, dict[str, dict[str, float]]]) -> dict:
    """init -> task -> metric -> value, as task -> metric -> init -> {"0": one value}."""
    table: dict[str, dict[str, dict]] = {}
    for init, by_task in scores.items():
        for task, by_metric in by_task.items():
            for metric, value in by_metric.items():
                table.setdefault(task, {}).setdefault(metric, {})[init] = {
                    NO_LABELS: {"mean": value, "std": 0.0, "n": 1}
                }
    return table


def heat_map_figures(params: Params, out: Path) -> dict[str, Any]:
    """STA heat maps of the pre-trained SISTA model on phantoms with one focal finding, and
    how often the finding's name attends inside its ground-truth mask more than a uniform
    map would (the localisation rate)."""
    from sista_core import SISTAModel
    from sista_core.explain import FOCAL_FINDINGS, explain_png, focal_report, localisation_rate
    from sista_core.findings import Finding
    from sista_core.phantom import render

    model = SISTAModel.from_pretrained(stage_dir(params, "pretrain") / "sista" / "model").eval()
    size = model.image_encoder.config.img_size
    for number, observation in enumerate(("Pneumothorax", "Nodule", "Consolidation")):
        phantom = render([Finding(observation)], seed=10_000 + number, size=size)
        name = FOCAL_FINDINGS[observation].split()[-1]
        explain_png(
            model,
            phantom.image,
            focal_report(phantom.findings[0]),
            out / f"heatmap_{name}.png",
            words=[name],
        )
    return localisation_rate(model, params.evaluate.localisation_images, seed=20_000)


def run(params: Params, args: argparse.Namespace | None = None) -> dict[str, Any]:
    config = params.evaluate
    downstream = params.ingest.downstream
    trained = [t for t in TRAINED_TASKS if t in config.tasks]
    language = [t for t in LANGUAGE_TASKS if t in config.tasks]
    text_inits = [i for i in config.inits if i != "random"]  # random init has no text model
    datasets = list(dict.fromkeys(TASK_DATASETS[t] for t in trained))
    if "zero_shot" in language and "downstream" not in datasets:
        datasets.append("downstream")
    examples_cell = [max(downstream.label_fractions), downstream.seeds[0]]
    ensure_ray(params)
    with (
        stage_run(params, "evaluate", logged={"evaluate": config.model_dump()}) as run_,
        stage_output(params, "evaluate", {"mlflow_run_id": run_.info.run_id}) as (out, extra),
    ):
        work = out.resolve() / "work"  # absolute: Tune trials run in their own folders
        work.mkdir()
        seconds: dict[str, float] = {}
        with timed("sets", seconds):
            prepare_sets(params, datasets, work)
        # Trained tasks read only their own sets' features (a fine-tuned encoder makes its
        # own for segmentation and detection); zero-shot reads images itself.
        featured = list(
            dict.fromkeys(
                TASK_DATASETS[t] for t in trained if t == "classification" or not config.finetune
            )
        )
        featured_rows = {d: rows_read(work, d, trained).tolist() for d in featured}
        # The work folder is on this node's disk: its readers run here, on any cluster.
        local = extract_features.options(**on_this_node())
        with timed("features", seconds):
            ray.get([local.remote(i, params, str(work), featured_rows) for i in config.inits])
        # Before the cells, not beside them: Tune must find every slot free when it starts
        # its trial actors, or one actor runs every cell (components/evaluation_trial.py).
        scored = text_inits if language else []
        with timed("language tasks", seconds):
            remote = language_scores.options(**on_this_node())
            scores = ray.get([remote.remote(init, params, str(work)) for init in scored])
        num_cells = len(trained) * len(config.inits) * len(downstream.label_fractions)
        num_cells *= len(downstream.seeds)
        tuner = tune.Tuner(
            tune.with_resources(
                evaluation_cell, {"cpu": config.cpus_per_trial, **this_node_resource()}
            ),
            param_space={
                "task": tune.grid_search(trained),
                "init": tune.grid_search(list(config.inits)),
                "fraction": tune.grid_search(list(downstream.label_fractions)),
                "seed": tune.grid_search(list(downstream.seeds)),
                "features_dir": str(work),
                "examples_cell": examples_cell,
                "probe_epochs": config.probe_epochs,
                "probe_lr": config.probe_lr,
                "probe_weight_decay": config.probe_weight_decay,
                "head_steps": config.head_steps,
                "head_lr": config.head_lr,
                "head_batch_size": config.head_batch_size,
                "head_width": config.head_width,
                "pyramid_levels": config.pyramid_levels,
                "finetune": config.finetune,
                "encoder_lr": config.encoder_lr,
                "encoder": encoder_spec(params),
            },
            # Reused trial processes import torch once, not once per cell.
            tune_config=tune.TuneConfig(reuse_actors=True),
            run_config=tune.RunConfig(
                name="evaluate",
                **ray_storage(params, "tune"),
                verbose=0,
                callbacks=[CellProgress(num_cells)],
            ),
        )
        with timed("cells", seconds):
            cells = cell_rows(tuner.fit())
        summary = summarise(cells) | language_summary(dict(zip(scored, scores, strict=True)))
        metrics: dict[str, Any] = {**summary, "images": PHANTOM_NOTE}
        if "sista" in config.inits and config.localisation_images:
            with timed("heat maps", seconds):
                metrics["heatmap_localisation"] = heat_map_figures(params, out)
        (out / "cells.json").write_text(json.dumps(cells, indent=1))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        plot_fraction_curves(summary, out / "scores_vs_fraction.png")
        for task in ("segmentation", "opacity_segmentation", "detection"):
            if task in trained:
                plot_examples(work, task, list(config.inits), out / f"examples_{task}.png")
        # Kept: the global features (zero rows: not encoded, read by no cell) and the splits.
        features = out / "features"
        features.mkdir()
        for path in work.glob("*.downstream.npy"):
            path.rename(features / path.name.replace(".downstream", ""))
        for path in work.glob("*.split.json"):
            path.rename(features / path.name)
        shutil.rmtree(work)  # images and pyramids: large, and re-derivable from ingest
        mlflow.log_metrics(
            {
                f"{task}.{metric}.{init}.{fraction}": value["mean"]
                for task, by_metric in summary.items()
                for metric, by_init in by_metric.items()
                for init, by_fraction in by_init.items()
                for fraction, value in by_fraction.items()
            }
        )
        for png in sorted(out.glob("*.png")):
            mlflow.log_artifact(str(png))
        extra["summary"] = summary
        extra["phase_seconds"] = seconds
    return {
        task: {
            init: {f: round(v["mean"], 3) for f, v in by_fraction.items()}
            for init, by_fraction in by_metric[TASK_METRICS[task][0]].items()
        }
        for task, by_metric in summary.items()
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return stage_main("evaluate", run, argv)


if __name__ == "__main__":
    main()
