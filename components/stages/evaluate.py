"""Stage ``evaluate``: the downstream suite, fanned out with Ray Tune.

Trained tasks (classification: linear probe, AUROC or accuracy; segmentation: decoder, Dice;
detection: head, mAP) are cells of task x set x init x label fraction x seed, for the sets
``evaluate.tasks`` names. Each initialisation's frozen features are computed once (a Ray task
per init); every Tune trial then trains a head on cached features, so a cell costs seconds,
not a model start-up. The language tasks (zero-shot classification from prompts,
image-report retrieval) need no labels: one score per set and init with a text encoder.
Every set's table says whether its images are real or phantoms. ``ablation.json``: per
(task, set, label fraction), each init's difference to SISTA with a paired-bootstrap interval
over the test images (components/stages/paired_bootstrap.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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

from components.platform.config import LANGUAGE_TASKS, PRETRAIN_SET, TRAINED_TASKS, Params  # noqa: E402
from components.platform.runtime import ensure_ray, on_this_node, this_node_resource  # noqa: E402
from components.platform.shards import (  # noqa: E402
    read_shard_images,
    read_shard_masks,
    row_boxes,
    subset_file_name,
)
from components.platform.stage import stage_dir, stage_main  # noqa: E402
from components.platform.stage_storage import data_root, ray_storage, stage_output  # noqa: E402
from components.platform.tracking import stage_run  # noqa: E402
from components.stages.evaluation_cells import examples_path, features_path, load_encoder  # noqa: E402
from components.stages.evaluation_trial import evaluation_cell  # noqa: E402
from components.stages.paired_bootstrap import GATE_OUTPUTS, ablation, save_gate_outputs  # noqa: E402

# The metrics each task reports; the first is the one plotted against the label fraction
# (a single-label classification set reports accuracy instead of AUROC).
TASK_METRICS = {
    "classification": ("auroc",),
    "segmentation": ("dice",),
    "detection": ("map_40_75", "map_50"),
    "zero_shot": ("auroc",),
    "retrieval": tuple(
        f"{direction}_recall_at_{k}"
        for direction in ("image_to_text", "text_to_image")
        for k in (1, 5, 10)
    ),
}
METRIC_LABELS = {
    "auroc": "macro AUROC",
    "accuracy": "accuracy",
    "dice": "Dice on images with the finding",
    "map_40_75": "mAP@[0.4:0.75]",
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


def rows_read(work: Path, dataset: str, threshold_on_val: bool) -> list[int]:
    """Rows of a set that some cell reads: the test split, the training subsets, and the
    validation split where a segmentation cell picks its threshold there."""
    split = json.loads((work / f"{dataset}.split.json").read_text())
    rows = set(split["test"]).union(*split["subsets"].values())
    if threshold_on_val:
        rows |= set(split["val"])
    return sorted(rows)


@ray.remote(num_cpus=1)
def extract_features(init: str, params: Params, work: str, wanted: dict[str, dict]) -> str:
    """One initialisation's frozen features of every set it is scored on: the global vector
    (``wanted[set]["global"]``, for probes) and the feature pyramid (``["pyramid"]``, for
    segmentation and detection heads) of the rows ``["rows"]``; the other rows (a validation
    split no cell reads) stay zero, which saves their encoder passes."""
    torch.set_num_threads(1)
    encoder = load_encoder(init, encoder_spec(params)).eval()
    levels = params.evaluate.pyramid_levels
    for dataset, want in wanted.items():
        images = np.load(Path(work) / f"{dataset}.images.npy", mmap_mode="r")
        rows = np.asarray(want["rows"], np.int64)
        global_parts: list[torch.Tensor] = []
        pyramid_parts: list[list[torch.Tensor]] = []
        with torch.inference_mode():
            for start in range(0, len(rows), 128):
                chosen = np.asarray(images[rows[start : start + 128]])
                batch = encoder.normalize(torch.from_numpy(chosen))
                if want["global"]:
                    global_parts.append(encoder(batch)["global"].float())
                if want["pyramid"]:
                    pyramid_parts.append([level.half() for level in encoder.pyramid(batch, levels)])
        if want["global"]:
            np.save(
                features_path(Path(work), init, dataset, "global"),
                _scatter(len(images), rows, torch.cat(global_parts).numpy()),
            )
        if want["pyramid"]:
            encoded = [torch.cat(level).numpy() for level in zip(*pyramid_parts, strict=True)]
            np.savez(
                features_path(Path(work), init, dataset, "pyramid"),
                **{f"level_{i}": _scatter(len(images), rows, lv) for i, lv in enumerate(encoded)},
            )
    return init


def _scatter(count: int, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    full = np.zeros((count, *values.shape[1:]), values.dtype)
    full[rows] = values
    return full


@ray.remote(num_cpus=1)
def language_scores(init: str, params: Params, work: str) -> dict[str, dict[str, dict]]:
    """Zero-shot classification on each zero-shot set's test split (macro AUROC over its
    findings; accuracy too where every image has one finding, as CheXpert 5x200) and
    retrieval recall@k on the pre-training pairs held out (the source's official test split
    when it has one, else the validation split), for a pre-trained model with its text
    encoder. task -> set -> metric -> value."""
    from components.stages.pretrain import retrieval_recall
    from components.stages.pretrain_data import PretrainData
    from sista_core import SISTAModel
    from sista_core.probe import accuracy, macro_auroc
    from sista_core.zeroshot import zero_shot_logits

    torch.set_num_threads(1)
    tasks = params.evaluate.tasks
    model = SISTAModel.from_pretrained(stage_dir(params, "pretrain") / init / "model").eval()
    scores: dict[str, dict[str, dict]] = {}
    for dataset in tasks.get("zero_shot", ()):
        test = json.loads((Path(work) / f"{dataset}.split.json").read_text())["test"]
        images = torch.from_numpy(np.load(Path(work) / f"{dataset}.images.npy")[test])
        labels = torch.from_numpy(np.load(Path(work) / f"{dataset}.labels.npy")[test])
        logits = zero_shot_logits(model, images)
        auroc, _ = macro_auroc(logits, labels)
        found = {"auroc": auroc}
        if bool((labels.sum(1) == 1).all()):
            found["accuracy"] = accuracy(logits, labels)
        scores.setdefault("zero_shot", {})[dataset] = found
    if tasks.get("retrieval"):
        root = data_root(params.storage)
        held_out = retrieval_split(root)
        recall = retrieval_recall(model, PretrainData(root, held_out, params.pretrain.semantics))
        scores["retrieval"] = {
            PRETRAIN_SET: {
                f"image_to_text_recall_at_{k}": recall[f"val_recall_at_{k}"] for k in (1, 5, 10)
            }
            | {
                f"text_to_image_recall_at_{k}": recall[f"val_text_to_image_recall_at_{k}"]
                for k in (1, 5, 10)
            }
        }
    return scores


def retrieval_split(root: Path) -> str:
    """The pre-training split retrieval is scored on: ``test`` where the source has an
    official one (MIMIC-CXR), else ``val``."""
    splits = pq.read_table(
        Path(root) / "ingest" / "manifest.parquet",
        columns=["split"],
        filters=[("dataset", "=", PRETRAIN_SET)],
    ).column("split")
    return "test" if "test" in set(splits.to_pylist()) else "val"


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


def prepare_sets(params: Params, datasets: list[str], work: Path) -> dict[str, dict]:
    """Images, targets and the saved subsets of each downstream set, as files trials read:
    ``<set>.images.npy``, ``.labels.npy``, masks and boxes where the set has them, and
    ``<set>.split.json`` (test and val indices, and the training subsets ingest wrote, by
    ``fraction/seed``). Returns ingest's description of each set (``sets.json``)."""
    ingest_dir = stage_dir(params, "ingest")
    described = json.loads((ingest_dir / "sets.json").read_text())
    manifest = pq.read_table(ingest_dir / "manifest.parquet").to_pylist()
    config = params.ingest.downstream
    for dataset in datasets:
        rows = [r for r in manifest if r["dataset"] == dataset]
        if not rows:
            raise ValueError(
                f"evaluate needs the set {dataset!r}, but ingest wrote no record of it"
            )
        np.save(work / f"{dataset}.images.npy", read_shard_images(ingest_dir, rows))
        labels = np.array([r["labels"] for r in rows], np.float32)
        np.save(work / f"{dataset}.labels.npy", labels.reshape(len(rows), -1))
        if described[dataset]["with_targets"]:
            np.save(work / f"{dataset}.masks.npy", read_shard_masks(ingest_dir, rows))
            boxes = [row_boxes(r).tolist() for r in rows]
            detection = {"boxes": boxes, "image_size": params.ingest.image_size}
            (work / f"{dataset}.boxes.json").write_text(json.dumps(detection))
        position = {r["record_id"]: i for i, r in enumerate(rows)}
        subsets = {}
        for seed in config.seeds:
            for fraction in config.label_fractions:
                name = subset_file_name(fraction, seed, dataset)
                ids = (ingest_dir / "subsets" / name).read_text().split()
                subsets[f"{fraction:g}/{seed}"] = [position[i] for i in ids]
        split = {
            "record_ids": [r["record_id"] for r in rows],
            "test": [i for i, r in enumerate(rows) if r["split"] == "test"],
            "val": [i for i, r in enumerate(rows) if r["split"] == "val"],
            "subsets": subsets,
        }
        (work / f"{dataset}.split.json").write_text(json.dumps(split))
    return {name: described[name] for name in datasets}


def metric_names(task: str, single_label: bool = False) -> tuple[str, ...]:
    """The metrics a trained cell reports, the plotted one first."""
    return ("accuracy",) if task == "classification" and single_label else TASK_METRICS[task]


def summarise(cells: list[dict[str, Any]], sets: dict[str, dict]) -> dict[str, dict]:
    """task -> set -> {"images": real | phantom, metric -> init -> fraction -> mean, std
    over seeds, n}."""
    table: dict[str, dict] = {}
    for task, dataset in dict.fromkeys((c["task"], c["set"]) for c in cells):
        ours = [c for c in cells if c["task"] == task and c["set"] == dataset]
        block = table.setdefault(task, {}).setdefault(dataset, {"images": sets[dataset]["images"]})
        for metric in metric_names(task, sets[dataset]["single_label"]):
            for init in sorted({c["init"] for c in ours}):
                for fraction in sorted({c["fraction"] for c in ours}):
                    scores = [
                        c[metric] for c in ours if c["init"] == init and c["fraction"] == fraction
                    ]
                    block.setdefault(metric, {}).setdefault(init, {})[f"{fraction:g}"] = {
                        "mean": float(np.mean(scores)),
                        "std": float(np.std(scores)),
                        "n": len(scores),
                    }
    return table


def set_title(task: str, dataset: str, images: str) -> str:
    return f"{task}: {dataset} ({images} images)"


def plot_fraction_curves(summary: dict, path: Path) -> None:
    """Score vs label fraction per initialisation, mean with a +- std band, one panel per
    trained (task, set)."""
    panels = [(t, d, block) for t in TRAINED_TASKS for d, block in summary.get(t, {}).items()]
    columns = min(len(panels), 4)
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.8 * rows), squeeze=False)
    for axis in axes.flat[len(panels) :]:
        axis.set_visible(False)
    for axis, (task, dataset, block) in zip(axes.flat, panels, strict=False):
        metric = next(m for m in block if m != "images")
        for init, by_fraction in block[metric].items():
            fractions = sorted(by_fraction, key=float)
            x = [100 * float(f) for f in fractions]
            mean = np.array([by_fraction[f]["mean"] for f in fractions])
            std = np.array([by_fraction[f]["std"] for f in fractions])
            axis.plot(x, mean, marker="o", label=init)
            axis.fill_between(x, mean - std, mean + std, alpha=0.2)
        if not any(np.isfinite(line.get_ydata()).any() for line in axis.get_lines()):
            axis.text(0.5, 0.5, "undefined (no positive test image?)", ha="center", fontsize=8)
        else:
            axis.set_xscale("log")
        axis.set_xlabel("% of training labels")
        axis.set_ylabel(f"{METRIC_LABELS[metric]}, test")
        axis.set_title(set_title(task, dataset, block["images"]), fontsize=9)
        axis.legend(fontsize=8)
    figure.suptitle("Frozen encoder, mean ± std over seeds", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_examples(
    work: Path, task: str, dataset: str, images_kind: str, inits: list[str], path: Path
) -> None:
    """The first test images with ground truth (green) and each init's prediction (red):
    masks as contours and fills, boxes as rectangles with their scores."""
    images = np.load(work / f"{dataset}.images.npy", mmap_mode="r")
    kept = {i: np.load(examples_path(work, task, dataset, i)) for i in inits}
    index = next(iter(kept.values()))["index"]
    masks_task = task == "segmentation"
    truth_masks = np.load(work / f"{dataset}.masks.npy") if masks_task else None
    truth_boxes = (
        None if masks_task else json.loads((work / f"{dataset}.boxes.json").read_text())["boxes"]
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
    figure.suptitle(
        f"{set_title(task, dataset, images_kind)}: ground truth green, prediction red",
        fontsize=8,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def cell_rows(results: tune.ResultGrid) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        if result.error:
            raise RuntimeError(f"evaluation cell {result.config} failed: {result.error}")
        config, metrics = result.config, result.metrics
        cell = config["cell"]
        rows.append(
            {
                "task": cell["task"],
                "set": cell["set"],
                "init": config["init"],
                "fraction": config["fraction"],
                "seed": config["seed"],
                "train_size": metrics["train_size"],
                **{
                    name: metrics[name] for name in metric_names(cell["task"], cell["single_label"])
                },
                **({"per_label": metrics["per_label"]} if "per_label" in metrics else {}),
            }
        )
    return sorted(rows, key=lambda c: (c["task"], c["set"], c["init"], c["fraction"], c["seed"]))


def language_summary(scores: dict[str, dict], sets: dict[str, dict], pretrain_images: str) -> dict:
    """init -> task -> set -> metric -> value, as task -> set -> {"images", metric -> init
    -> {"0": one value}}."""
    table: dict[str, dict] = {}
    for init, by_task in scores.items():
        for task, by_set in by_task.items():
            for dataset, by_metric in by_set.items():
                images = pretrain_images if dataset == PRETRAIN_SET else sets[dataset]["images"]
                block = table.setdefault(task, {}).setdefault(dataset, {"images": images})
                for metric, value in by_metric.items():
                    block.setdefault(metric, {})[init] = {
                        NO_LABELS: {"mean": value, "std": 0.0, "n": 1}
                    }
    return table


# A trained task's short name in the tracked metrics (metrics/evaluate.json, metrics/full/).
TASK_CODES = {"classification": "cls", "segmentation": "seg", "detection": "det"}


def scores_at_smallest_fraction(
    summary: dict, inits: list[str] | None = None
) -> dict[str, dict[str, float]]:
    """Per trained (task, set), its first metric at the smallest label fraction (1 %), one value
    per init (``inits``' order): ``{"cls": {"sista": 0.61, "convirt": 0.58, ...}, ...}``, git
    tracked as ``metrics/full/evaluate.json``. A task is named by its code (cls, seg, det),
    followed by ``/<set>`` when it is scored on several sets, less the name start they share
    (``seg/opacity`` for ``phantom_opacity`` beside ``phantom_pneumothorax``). The full table
    is evaluate's metrics.json."""
    tracked: dict[str, dict[str, float]] = {}
    for task in TRAINED_TASKS:
        by_set = summary.get(task, {})
        shared = _shared_start(list(by_set))
        for dataset, block in by_set.items():
            metric = next(m for m in block if m != "images")
            code = TASK_CODES.get(task, task)
            by_init = block[metric]
            order = [i for i in inits if i in by_init] if inits else list(by_init)
            tracked[code if len(by_set) == 1 else f"{code}/{dataset[len(shared) :]}"] = {
                init: round(by_init[init][min(by_init[init], key=float)]["mean"], 4)
                for init in order
            }
    return tracked


def headline(scores: dict[str, dict[str, float]], init: str = "sista") -> dict[str, float]:
    """What ``dvc exp show`` lists per experiment (``metrics/evaluate.json``): one column per
    trained task, ``init``'s score at 1 % averaged over the task's sets (a single set: its
    score). Few and short on purpose: beside the Experiment and Created columns and a changed
    param, DVC's table has room for about five metrics in a 120-column terminal; every init
    per set is in ``scores`` (metrics/full/evaluate.json). Without ``init`` in the table: the
    first init scored."""
    by_task: dict[str, list[float]] = {}
    for name, by_init in scores.items():
        chosen = init if init in by_init else next(iter(by_init))
        by_task.setdefault(name.split("/")[0], []).append(by_init[chosen])
    return {code: round(sum(values) / len(values), 4) for code, values in by_task.items()}


def _shared_start(names: list[str]) -> str:
    """The start several names share, up to and with its last ``_``: ``phantom_`` for
    ``phantom_opacity`` and ``phantom_pneumothorax``; ``""`` for ``rsna`` and ``rsna_detection``."""
    if len(names) < 2:
        return ""
    common = os.path.commonprefix(names)
    return common[: common.rfind("_") + 1]


def heat_map_figures(params: Params, out: Path) -> dict[str, Any]:
    """STA heat maps of the pre-trained SISTA model on phantoms with one focal finding, and
    how often the finding's name attends inside its ground-truth mask more than a uniform
    map would (the localisation rate) and points into it (the pointing game); the same
    checks of the dense-token baseline when it is evaluated (``dense``)."""
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
    found = localisation_rate(model, params.evaluate.localisation_images, seed=20_000)
    if "dense" in params.evaluate.inits:
        dense = SISTAModel.from_pretrained(stage_dir(params, "pretrain") / "dense" / "model")
        found["dense"] = localisation_rate(
            dense.eval(), params.evaluate.localisation_images, seed=20_000
        )
    return found


def run(params: Params, args: argparse.Namespace | None = None) -> dict[str, Any]:
    config = params.evaluate
    downstream = params.ingest.downstream
    cells_of = config.cells()  # (task, set) of the trained tasks
    text_inits = [i for i in config.inits if i != "random"]  # random init has no text model
    language = [t for t in LANGUAGE_TASKS if config.tasks.get(t)]
    zero_shot = list(config.tasks.get("zero_shot", ()))
    datasets = list(dict.fromkeys([s for _, s in cells_of] + zero_shot))
    examples_cell = [max(downstream.label_fractions), downstream.seeds[0]]
    ensure_ray(params)
    with (
        stage_run(params, "evaluate", logged={"evaluate": config.model_dump()}) as run_,
        stage_output(params, "evaluate", {"mlflow_run_id": run_.info.run_id}) as (out, extra),
    ):
        work = out.resolve() / "work"  # absolute: Tune trials run in their own folders
        work.mkdir()
        figures = out / "figures"
        figures.mkdir()
        seconds: dict[str, float] = {}
        with timed("sets", seconds):
            sets = prepare_sets(params, datasets, work)
        # Probes read global features; heads on a frozen encoder read pyramids (a fine-tuned
        # encoder makes its own); zero-shot reads images itself.
        wanted: dict[str, dict] = {}
        for task, dataset in cells_of:
            if task != "classification" and config.finetune:
                continue
            want = wanted.setdefault(dataset, {"global": False, "pyramid": False})
            want["global" if task == "classification" else "pyramid"] = True
        for dataset, want in wanted.items():
            threshold = ("segmentation", dataset) in cells_of
            want["rows"] = rows_read(work, dataset, threshold_on_val=threshold)
        # The work folder is on this node's disk: its readers run here, on any cluster.
        local = extract_features.options(**on_this_node())
        with timed("features", seconds):
            ray.get([local.remote(i, params, str(work), wanted) for i in config.inits])
        # Before the cells, not beside them: Tune must find every slot free when it starts
        # its trial actors, or one actor runs every cell (components/stages/evaluation_trial.py).
        scored = text_inits if language else []
        with timed("language tasks", seconds):
            remote = language_scores.options(**on_this_node())
            scores = ray.get([remote.remote(init, params, str(work)) for init in scored])
        grid = [
            {"task": task, "set": dataset, "single_label": sets[dataset]["single_label"]}
            for task, dataset in cells_of
        ]
        num_cells = len(grid) * len(config.inits) * len(downstream.label_fractions)
        num_cells *= len(downstream.seeds)
        resources = {"cpu": config.cpus_per_trial, **this_node_resource()}
        if config.use_gpu:
            resources["gpu"] = config.gpus_per_trial
        tuner = tune.Tuner(
            tune.with_resources(evaluation_cell, resources),
            param_space={
                "cell": tune.grid_search(grid),
                "init": tune.grid_search(list(config.inits)),
                "fraction": tune.grid_search(list(downstream.label_fractions)),
                "seed": tune.grid_search(list(downstream.seeds)),
                "features_dir": str(work),
                "examples_cell": examples_cell,
                "threads": config.threads_per_trial,
                "use_gpu": config.use_gpu,
                "probe_epochs": config.probe_epochs,
                "probe_lr": config.probe_lr,
                "probe_weight_decay": config.probe_weight_decay,
                "head_steps": config.head_steps,
                "head_lr": config.head_lr,
                "head_batch_size": config.head_batch_size,
                "head_width": config.head_width,
                "pyramid_levels": config.pyramid_levels,
                "detector": config.detector,
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
        pretrain_images = "phantom" if params.ingest.source == "embedded" else "real"
        summary = summarise(cells, sets) | language_summary(
            dict(zip(scored, scores, strict=True)), sets, pretrain_images
        )
        metrics: dict[str, Any] = dict(summary)
        if "sista" in config.inits and config.localisation_images:
            with timed("heat maps", seconds):
                metrics["heatmap_localisation"] = heat_map_figures(params, figures)
        (out / "cells.json").write_text(json.dumps(cells, indent=1))
        # Which differences to SISTA exceed noise, from the cells' saved test outputs (in
        # the work folder, removed below); publish renders it as ablation.md.
        with timed("paired bootstrap", seconds):
            differences = ablation(cells, sets, work)
        (out / "ablation.json").write_text(json.dumps(differences, indent=1))
        if params.publish.gate == "bootstrap" and "sista" in config.inits:
            # Publish pairs these with the champion's, kept by the publish that promoted it.
            gate = params.publish_cell()
            save_gate_outputs(out / GATE_OUTPUTS, work, gate, downstream.seeds)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        # Exported by the launcher to metrics/ (evaluate.json, full/evaluate.json), which git
        # versions for DVC.
        scores = scores_at_smallest_fraction(summary, list(config.inits))
        (out / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
        (out / "headline.json").write_text(json.dumps(headline(scores), indent=1) + "\n")
        plot_fraction_curves(summary, figures / "scores_vs_fraction.png")
        for task, dataset in cells_of:
            if task != "classification":
                path = figures / f"examples_{task}_{dataset}.png"
                images = sets[dataset]["images"]
                plot_examples(work, task, dataset, images, list(config.inits), path)
        # Kept: the global features (zero rows: not encoded, read by no cell) and the splits.
        features = out / "features"
        features.mkdir()
        for path in [*work.glob("*.global.npy"), *work.glob("*.split.json")]:
            path.rename(features / path.name.replace(".global", ""))
        shutil.rmtree(work)  # images and pyramids: large, and re-derivable from ingest
        mlflow.log_metrics(
            {
                f"{task}.{dataset}.{metric}.{init}.{fraction}": value["mean"]
                for task, by_set in summary.items()
                for dataset, block in by_set.items()
                for metric, by_init in block.items()
                if metric != "images"
                for init, by_fraction in by_init.items()
                for fraction, value in by_fraction.items()
            }
        )
        for png in sorted(figures.glob("*.png")):
            mlflow.log_artifact(str(png))
        extra["summary"] = summary
        extra["phase_seconds"] = seconds
    return scores


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return stage_main("evaluate", run, argv)


if __name__ == "__main__":
    main()
