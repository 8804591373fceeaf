"""Which differences between initialisations exceed noise: a paired bootstrap over test images.

For each (task, set, label fraction) and each init other than the reference (``sista``), the
statistic is the mean over seeds of metric(init) - metric(reference), both scored on the same
test images. The bootstrap draws B resamples of those test images (with replacement, seeded)
and recomputes the statistic on each, with the *same* resample for both inits and for every
seed: what the two inits have in common (which images are easy) cancels, and the interval
measures how much the difference depends on which test images were drawn. A difference
"exceeds noise" when its 95 % percentile interval excludes 0. The seeds' own spread enters
through the mean over seeds, not through the resampling.

A resample is held as counts (how many times each test image was drawn), so every metric is a
weighted one over the original images, and all B resamples are scored in one pass per cell
(no Python loop over resamples):

- macro AUROC (multi-label classification): weighted Mann-Whitney per label, mean over the
  labels that have both classes in the resample (the same labels for both inits: the labels
  and the resample are shared);
- accuracy (single-label classification): weighted share of rows whose top logit is right;
- Dice (segmentation): weighted mean of the per-image Dice over the images the cell scores
  (those with the finding; the others are stored as NaN).

Detection (mAP) is left out: pycocotools takes about 0.7 s per mAP on 300 test images, so
B = 1000 resamples of 36 cells would take hours. Its rows say so.

Each evaluation cell saves what its metric needs on a resample (``cell_outputs_path``); the
evaluate stage calls :func:`ablation` on its work folder and writes ``ablation.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REFERENCE = "sista"
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0
INTERVAL_PERCENTILES = (2.5, 97.5)
NOT_BOOTSTRAPPED = {
    "detection": "mAP is not resampled: about 0.7 s per mAP (pycocotools) on 300 test "
    "images, hours for B resamples of every cell",
}


# --- resamples ---


def resample_indices(num_images: int, samples: int, seed: int) -> np.ndarray:
    """(samples, num_images) indices of test images drawn with replacement."""
    return np.random.default_rng(seed).integers(0, num_images, (samples, num_images))


def counts_of(indices: np.ndarray, num_images: int) -> np.ndarray:
    """(samples, num_images): how many times each image is in each resample, the weight it
    gets there. float32 holds these small counts and their sums exactly and halves the
    memory traffic of the AUROC's passes; the sums that can grow large are taken in float64."""
    samples = len(indices)
    offset = indices + num_images * np.arange(samples)[:, None]
    counts = np.bincount(offset.ravel(), minlength=samples * num_images)
    return counts.reshape(samples, num_images).astype(np.float32)


def bootstrap_weights(num_images: int, samples: int, seed: int) -> np.ndarray:
    """(1 + samples, num_images): row 0 weighs every test image once (the observed score),
    the other rows are the resamples."""
    observed = np.ones((1, num_images), np.float32)
    return np.vstack([observed, counts_of(resample_indices(num_images, samples, seed), num_images)])


# --- metrics on weighted test images (one value per row of ``weights``) ---


def resampled_auroc(scores: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of ``scores`` (n,) for binary ``targets`` (n,) under each row of ``weights``
    (R, n): the weighted share of (positive, negative) pairs ranked right, ties counting
    one half (as sklearn's roc_auc_score). NaN where a row weighs only one class."""
    order = np.argsort(scores, kind="stable")
    ranked, positive = scores[order], targets[order].astype(bool)
    weight = weights[:, order]
    # Images with equal scores form a group: a (positive, negative) pair inside one is a tie.
    opens_group = np.r_[True, ranked[1:] != ranked[:-1]]
    group_start = np.flatnonzero(opens_group)
    group_end = np.r_[group_start[1:], len(ranked)]
    groups = (np.cumsum(opens_group) - 1)[positive]
    # negatives_before[:, k]: the weight of the negatives among the k lowest scores.
    negatives_before = np.zeros((len(weight), len(ranked) + 1), weight.dtype)
    np.cumsum(np.where(positive, 0, weight), axis=1, out=negatives_before[:, 1:])
    below = negatives_before[:, group_start[groups]]
    below_or_tied = negatives_before[:, group_end[groups]]
    # A positive is ranked right against the negatives below it, half right against ties.
    positive_weight = weight[:, positive]
    twice_right = (positive_weight * (below + below_or_tied)).sum(1, dtype=np.float64)
    pairs = positive_weight.sum(1, dtype=np.float64) * negatives_before[:, -1]
    return _ratio(0.5 * twice_right, pairs)


def resampled_macro_auroc(
    logits: np.ndarray, labels: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """Mean AUROC over the labels (columns) with both classes in each row of ``weights``;
    NaN where no label has. Which labels count depends on the labels and the resample
    only, so it is the same for every init. On all-ones weights: the cell's
    ``macro_auroc`` (which ranks sigmoid(logits) in float32, so it ties logits beyond about
    ±16 that are ranked here)."""
    per_label = np.stack(
        [resampled_auroc(logits[:, c], labels[:, c], weights) for c in range(labels.shape[1])]
    )
    return _nan_mean(per_label)


def resampled_accuracy(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted share of rows whose highest logit is the one-hot label's class."""
    right = (logits.argmax(1) == labels.argmax(1)).astype(np.float64)
    return _ratio(weights @ right, weights.sum(1, dtype=np.float64))


def resampled_mean(per_image: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean of the per-image scores that are not NaN (a Dice over the images with
    the finding); NaN where a row weighs none of them."""
    scored = np.isfinite(per_image)
    chosen = weights[:, scored]
    return _ratio(chosen @ per_image[scored].astype(np.float64), chosen.sum(1, dtype=np.float64))


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.full(np.shape(numerator), np.nan)
    return np.divide(numerator, denominator, out=out, where=denominator > 0)


def _nan_mean(values: np.ndarray) -> np.ndarray:
    """Mean over axis 0 of the finite values; NaN where none is (without numpy's warning)."""
    finite = np.isfinite(values)
    return _ratio(np.where(finite, values, 0.0).sum(0), finite.sum(0).astype(np.float64))


# --- the paired difference ---


@dataclass(frozen=True)
class Difference:
    """metric(init) - metric(reference), mean over seeds: observed on the test split, and the
    percentile interval over the resamples whose statistic is defined."""

    mean: float
    low: float
    high: float
    resamples: int

    @property
    def beyond_noise(self) -> bool:
        return bool(self.low > 0 or self.high < 0)


def difference_interval(
    init_scores: np.ndarray,
    reference_scores: np.ndarray,
    percentiles: tuple[float, float] = INTERVAL_PERCENTILES,
) -> Difference:
    """``init_scores`` and ``reference_scores``: (seeds, 1 + B), row i the same seed for both,
    column 0 observed, column j the same resample j for both and for every seed."""
    if init_scores.shape != reference_scores.shape:
        raise ValueError(
            f"paired scores differ in shape: {init_scores.shape} vs {reference_scores.shape}"
        )
    statistic = (init_scores - reference_scores).mean(0)
    resampled = statistic[1:][np.isfinite(statistic[1:])]
    if not len(resampled):
        return Difference(float(statistic[0]), np.nan, np.nan, 0)
    low, high = np.percentile(resampled, percentiles)
    return Difference(float(statistic[0]), float(low), float(high), len(resampled))


def paired_bootstrap(
    metric: Callable[[np.ndarray, np.ndarray], np.ndarray],
    init_outputs: Sequence[np.ndarray],
    reference_outputs: Sequence[np.ndarray],
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Difference:
    """Two inits' test outputs (one array per seed, same seed order, rows = the same test
    images): ``metric(outputs, weights)`` scored on the test split and on ``samples``
    resamples shared by both inits and all seeds; the mean-over-seeds difference with its
    interval."""
    weights = bootstrap_weights(len(reference_outputs[0]), samples, seed)

    def scores(per_seed: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack([metric(outputs, weights) for outputs in per_seed])

    return difference_interval(scores(init_outputs), scores(reference_outputs))


# --- what the cells save, and the evaluate stage's table ---


def cell_outputs_path(
    work: Path, task: str, dataset: str, init: str, fraction: float, seed: int
) -> Path:
    """A cell's per-test-image outputs: ``test_index`` and ``logits`` (classification) or
    ``per_image_dice`` (segmentation, NaN on the images the Dice leaves out)."""
    return work / f"test_outputs.{task}.{dataset}.{init}.{fraction:g}.{seed}.npz"


def bootstrapped_metric(task: str, single_label: bool) -> str | None:
    """The metric resampled for a trained task (the first it reports); None: not resampled."""
    if task in NOT_BOOTSTRAPPED:
        return None
    if task == "classification":
        return "accuracy" if single_label else "auroc"
    return {"segmentation": "dice"}[task]


def ablation(
    cells: list[dict[str, Any]],
    sets: dict[str, dict],
    work: Path,
    reference: str = REFERENCE,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, Any]:
    """One row per (task, set, fraction, init other than ``reference``): the paired
    difference to ``reference`` over seeds with its interval. ``cells``: evaluate's cell
    rows; ``sets``: ``images`` and ``single_label`` of each set; ``work``: the folder of the
    cells' saved test outputs and of the sets' ``split.json`` and ``labels.npy``."""
    rows: list[dict[str, Any]] = []
    left_out: list[dict[str, str]] = []
    for task, dataset in dict.fromkeys((c["task"], c["set"]) for c in cells):
        ours = [c for c in cells if c["task"] == task and c["set"] == dataset]
        if reference not in {c["init"] for c in ours}:
            continue
        metric = bootstrapped_metric(task, sets[dataset]["single_label"])
        if metric is None:
            left_out.append({"task": task, "set": dataset, "why": NOT_BOOTSTRAPPED[task]})
            continue
        block = {"task": task, "set": dataset, "images": sets[dataset]["images"], "metric": metric}
        rows += [
            {**block, **row} for row in _set_rows(ours, work, metric, reference, samples, seed)
        ]
    return {
        "reference": reference,
        "samples": samples,
        "seed": seed,
        "interval_percentiles": list(INTERVAL_PERCENTILES),
        "rows": rows,
        "left_out": left_out,
    }


def _set_rows(
    cells: list[dict[str, Any]],
    work: Path,
    metric: str,
    reference: str,
    samples: int,
    seed: int,
) -> list[dict[str, Any]]:
    """The rows of one (task, set): its test split resampled once, for every fraction."""
    task, dataset = cells[0]["task"], cells[0]["set"]
    test = json.loads((work / f"{dataset}.split.json").read_text())["test"]
    labels = np.load(work / f"{dataset}.labels.npy")[test] if task == "classification" else None
    score = _cell_metric(metric, labels, bootstrap_weights(len(test), samples, seed))
    rows = []
    for fraction in sorted({c["fraction"] for c in cells}):
        scores = _scores_by_init([c for c in cells if c["fraction"] == fraction], work, test, score)
        seeds = sorted(scores[reference])
        for init in sorted(set(scores) - {reference}):
            if sorted(scores[init]) != seeds:
                raise ValueError(
                    f"{task} {dataset} at {fraction:g}: {init} has seeds {sorted(scores[init])}, "
                    f"{reference} {seeds}: the difference must pair the same seeds"
                )
            found = difference_interval(
                np.stack([scores[init][s] for s in seeds]),
                np.stack([scores[reference][s] for s in seeds]),
            )
            rows.append(
                {
                    "fraction": f"{fraction:g}",
                    "init": init,
                    "seeds": len(seeds),
                    "test_images": len(test),
                    "difference": found.mean,
                    "low": found.low,
                    "high": found.high,
                    "resamples": found.resamples,
                    "beyond_noise": found.beyond_noise,
                }
            )
    return rows


def _scores_by_init(
    cells: list[dict[str, Any]], work: Path, test: list[int], score: Callable[[Any], np.ndarray]
) -> dict[str, dict[int, np.ndarray]]:
    """init -> seed -> the cell's metric on the test split and every resample (1 + B,)."""
    scores: dict[str, dict[int, np.ndarray]] = {}
    for cell in cells:
        path = cell_outputs_path(
            work, cell["task"], cell["set"], cell["init"], cell["fraction"], cell["seed"]
        )
        with checked_outputs(path, test) as outputs:
            scores.setdefault(cell["init"], {})[cell["seed"]] = score(outputs)
    return scores


@contextmanager
def checked_outputs(path: Path, test: list[int]) -> Iterator[Any]:
    """A cell's saved outputs, checked to be of the split's test images in order: the pairing
    rests on it."""
    with np.load(path) as outputs:
        if outputs["test_index"].tolist() != test:
            raise ValueError(f"{path.name}: outputs of other images than the test split")
        yield outputs


def _cell_metric(
    metric: str, labels: np.ndarray | None, weights: np.ndarray
) -> Callable[[Any], np.ndarray]:
    """A cell's saved outputs -> its metric on the test split and on every resample."""
    if metric == "auroc":
        return lambda outputs: resampled_macro_auroc(outputs["logits"], labels, weights)
    if metric == "accuracy":
        return lambda outputs: resampled_accuracy(outputs["logits"], labels, weights)
    return lambda outputs: resampled_mean(outputs["per_image_dice"], weights)


# --- the promotion gate: this run's SISTA against the registered champion ---

GATE_OUTPUTS = "gate_outputs.npz"


def save_gate_outputs(
    path: Path,
    work: Path,
    gate: tuple[str, str, str, float],
    seeds: Sequence[int],
) -> None:
    """SISTA's per-test-image outputs on the gate's cell (``gate``: task, set, metric, label
    fraction), one array per seed, with the test images' record ids and labels: what a later
    publish pairs with its own candidate's outputs."""
    task, dataset, metric, fraction = gate
    split = json.loads((work / f"{dataset}.split.json").read_text())
    test = split["test"]
    arrays: dict[str, np.ndarray] = {
        "metric": np.array(metric),
        "test_ids": np.array([split["record_ids"][i] for i in test]),
        "seeds": np.asarray(seeds, np.int64),
    }
    if task == "classification":
        arrays["labels"] = np.load(work / f"{dataset}.labels.npy")[test]
    for seed in seeds:
        with checked_outputs(
            cell_outputs_path(work, task, dataset, REFERENCE, fraction, seed), test
        ) as cell:
            for name in cell.files:
                if name != "test_index":
                    arrays[f"{name}.{seed}"] = cell[name]
    np.savez_compressed(path, **arrays)


class NotComparable(ValueError):
    """The candidate's and the champion's gate outputs cannot be paired."""


def gate_difference(
    candidate_path: Path,
    champion_path: Path,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[Difference, dict[str, Any]]:
    """metric(candidate) - metric(champion), mean over the seeds both have, with its paired
    bootstrap interval over the test images (the same resamples for both). Both are scored
    against the candidate's labels (the current data). Raises NotComparable when the two
    were scored on another metric, other test images or no common seed."""
    with np.load(candidate_path) as candidate, np.load(champion_path) as champion:
        metric = str(candidate["metric"])
        if str(champion["metric"]) != metric:
            raise NotComparable(
                f"the champion's outputs are for {champion['metric']}, not {metric}"
            )
        ids = candidate["test_ids"].tolist()
        champion_ids = champion["test_ids"].tolist()
        if sorted(ids) != sorted(champion_ids):
            missing = len(set(ids) ^ set(champion_ids))
            raise NotComparable(
                f"the champion was scored on other test images ({missing} of "
                f"{len(ids)} / {len(champion_ids)} differ)"
            )
        position = {record: i for i, record in enumerate(champion_ids)}
        order = np.array([position[record] for record in ids], np.int64)
        seeds = sorted(set(candidate["seeds"].tolist()) & set(champion["seeds"].tolist()))
        if not seeds:
            raise NotComparable("the candidate and the champion share no seed")
        labels = candidate["labels"] if "labels" in candidate.files else None
        name = "per_image_dice" if metric == "dice" else "logits"
        ours = [candidate[f"{name}.{s}"] for s in seeds]
        theirs = [champion[f"{name}.{s}"][order] for s in seeds]
    weights = bootstrap_weights(len(ids), samples, seed)
    score = _cell_metric(metric, labels, weights)
    found = difference_interval(
        np.stack([score({name: outputs}) for outputs in ours]),
        np.stack([score({name: outputs}) for outputs in theirs]),
    )
    return found, {"metric": metric, "test_images": len(ids), "seeds": seeds, "samples": samples}
