"""Stage ``publish``: the results table, the table of which differences to SISTA exceed noise
(``ablation.md``, from evaluate's paired bootstrap), and promotion of the candidate encoder.

The candidate (``sista-encoder@candidate``, registered by pretrain) takes the ``champion``
alias only when it beats the current champion on ``publish.metric``: strictly higher, or
strictly lower with ``publish.higher_is_better: false``; a tie keeps the champion. When the
comparison cannot be made (a champion without a readable ``score`` tag, or a registry that
fails to answer), nothing moves and the stage fails naming the model, version and tag.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow

from .config import Params, tracking_uri
from .stage import stage_dir, stage_main
from .stage_storage import stage_output
from .tracking import stage_run

SCORE_TAG = "score"
CANDIDATE, CHAMPION = "candidate", "champion"


def metric_value(summary: dict[str, Any], metric: str, init: str = "sista") -> float:
    """``classification/chexpert/auroc@0.01`` -> mean test AUROC of ``init`` on the set
    ``chexpert`` at 1 % labels (``@0`` for a task without labels)."""
    task_set_metric, fraction = metric.split("@")
    task, dataset, name = task_set_metric.split("/")
    try:
        return float(summary[task][dataset][name][init][f"{float(fraction):g}"]["mean"])
    except KeyError as error:
        raise KeyError(f"publish.metric {metric!r}: evaluate has no {error}") from None


def should_promote(candidate: float, champion: float | None, higher_is_better: bool) -> bool:
    """Promote when there is no champion yet or the candidate is strictly better; a score
    that is not a number (a metric evaluate could not compute) never promotes."""
    if not math.isfinite(candidate):
        return False
    if champion is None:
        return True
    return candidate > champion if higher_is_better else candidate < champion


# Entries of evaluate's metrics.json that are not task tables.
NOT_TASKS = ("heatmap_localisation",)
IMAGES_NOTE = {"real": "real images", "phantom": "PHANTOM images"}
PHANTOM_FOOTNOTE = (
    "PHANTOM images: synthetic radiographs rendered from real labels, masks or boxes "
    "(docs/data.md); they show that the pipeline and the method work, not chest X-ray results."
)
TASK_ORDER = ("classification", "segmentation", "detection", "zero_shot", "retrieval")


def results_markdown(summary: dict[str, Any]) -> str:
    """One block per (task, set), as MGCA's tables: inits x label fractions (1 % / 10 % /
    100 % columns, mean ± std over seeds); a task without labels: inits x metrics. Each
    block says whether its set's images are real or phantoms."""
    lines = []
    tasks = sorted((t for t in summary if t not in NOT_TASKS), key=_task_rank)
    for task in tasks:
        for dataset, block in summary[task].items():
            by_metric = {m: v for m, v in block.items() if m != "images"}
            title = f"### {task} · {dataset} ({IMAGES_NOTE[block['images']]})\n"
            fractions = sorted(
                {f for by_init in by_metric.values() for v in by_init.values() for f in v},
                key=float,
            )
            if fractions == ["0"]:
                lines += [title, *_language_table(by_metric)]
                continue
            for metric, by_init in by_metric.items():
                lines.append(f"{title.rstrip()}: {metric}, test, mean ± std over seeds\n")
                columns = " | ".join(f"{100 * float(f):g} %" for f in fractions)
                lines.append(f"| init | {columns} |")
                lines.append("|---" * (len(fractions) + 1) + "|")
                for init, by_fraction in sorted(by_init.items()):
                    cells = [
                        f"{by_fraction[f]['mean']:.3f} ± {by_fraction[f]['std']:.3f}"
                        for f in fractions
                    ]
                    lines.append(f"| {init} | " + " | ".join(cells) + " |")
                lines.append("")
    if "heatmap_localisation" in summary:
        found = summary["heatmap_localisation"]
        lines.append(
            f"STA heat maps (SISTA), {found['num_images']} phantoms with one focal finding: the "
            f"finding's name puts most of its attention inside the finding's mask on "
            f"{found['majority_rate']:.0%} of them (a uniform map: "
            f"{found['uniform_majority_rate']:.0%}), more than a uniform map would on "
            f"{found['rate']:.0%}; mean mass in the mask {found['mean_mass_in_mask']:.3f} vs "
            f"{found['mean_uniform_mass']:.3f} uniform.\n"
        )
        lines += pointing_game_table(found)
    if any(b.get("images") == "phantom" for t in tasks for b in summary[t].values()):
        lines.append(PHANTOM_FOOTNOTE + "\n")
    return "\n".join(lines) + "\n"


def _task_rank(task: str) -> int:
    return TASK_ORDER.index(task) if task in TASK_ORDER else len(TASK_ORDER)


def pointing_game_table(found: dict[str, Any]) -> list[str]:
    """Per finding, the share of phantoms whose word's highest-attention patch lies in the
    finding's mask: SISTA, the dense baseline where scored, and a uniformly random patch."""
    if "pointing_game" not in found:
        return []
    models = {"SISTA": found} | ({"dense": found["dense"]} if "dense" in found else {})
    lines = [
        "### pointing game (phantoms with one focal finding; the word's top patch in its mask)\n",
        "| finding | images | " + " | ".join(models) + " | uniform patch |",
        "|---" * (len(models) + 3) + "|",
    ]
    for finding in [*found["per_finding"], "all"]:
        rows = [m if finding == "all" else m["per_finding"][finding] for m in models.values()]
        scores = " | ".join(f"{row['pointing_game']:.2f}" for row in rows)
        count, chance = rows[0]["num_images"], rows[0]["uniform_pointing"]
        lines.append(f"| {finding} | {count} | {scores} | {chance:.2f} |")
    return [*lines, ""]


def _language_table(by_metric: dict[str, Any]) -> list[str]:
    # Recall@1, @5, @10 in that order (the JSON keeps them sorted as text).
    metrics = sorted(
        by_metric,
        key=lambda m: (m.rstrip("0123456789"), int("0" + m[len(m.rstrip("0123456789")) :])),
    )
    inits = sorted({init for by_init in by_metric.values() for init in by_init})
    lines = ["| init (no labels) | " + " | ".join(metrics) + " |"]
    lines.append("|---" * (len(metrics) + 1) + "|")
    for init in inits:
        values = [by_metric[m].get(init, {}).get("0", {}).get("mean") for m in metrics]
        lines.append(
            f"| {init} | " + " | ".join("—" if v is None else f"{v:.3f}" for v in values) + " |"
        )
    return [*lines, ""]


ABLATION_METRICS = {
    "auroc": "macro AUROC",
    "accuracy": "accuracy",
    "dice": "Dice, images with the finding",
}


def ablation_markdown(ablation: dict[str, Any]) -> str:
    """evaluate's ``ablation.json`` as one table: a row per (task, set, label fraction, init)
    with the init's mean difference to the reference over seeds, its 95 % paired-bootstrap
    interval, and whether the interval excludes 0."""
    reference, low, high = ablation["reference"], *ablation["interval_percentiles"]
    lines = [
        f"### Differences to {reference} beyond noise (paired bootstrap over test images)\n",
        f"init − {reference}: the mean over seeds of the two inits' difference in the metric on "
        f"the same test images; interval: the {low:g}–{high:g} percentiles of that mean over "
        f"{ablation['samples']} resamples of the test images (seed {ablation['seed']}), each "
        f"resample shared by both inits and every seed. ▲ / ▼ beyond noise: the interval "
        f"excludes 0 (the init scores above / below {reference}); within noise: it contains 0.\n",
        f"| task · set | metric | labels | init | init − {reference} | {high - low:g} % interval "
        "| beyond noise? |",
        "|---" * 7 + "|",
    ]
    for row in ablation["rows"]:
        where = f"{row['task']} · {row['set']} ({IMAGES_NOTE[row['images']]})"
        metric = ABLATION_METRICS.get(row["metric"], row["metric"])
        interval = f"[{_signed(row['low'])}, {_signed(row['high'])}]"
        lines.append(
            f"| {where} | {metric} | {100 * float(row['fraction']):g} % | {row['init']} "
            f"| {_signed(row['difference'])} | {interval} | {_noise_mark(row)} |"
        )
    if not ablation["rows"]:
        lines.append(f"| no init was compared with {reference} | | | | | | |")
    lines.append("")
    for left in ablation["left_out"]:
        lines.append(f"Not bootstrapped: {left['task']} · {left['set']} ({left['why']}).\n")
    if any(row["images"] == "phantom" for row in ablation["rows"]):
        lines.append(PHANTOM_FOOTNOTE + "\n")
    return "\n".join(lines) + "\n"


def _signed(value: float) -> str:
    return f"{value:+.3f}" if math.isfinite(value) else "undefined"


def _noise_mark(row: dict[str, Any]) -> str:
    if not (math.isfinite(row["low"]) and math.isfinite(row["high"])):
        return "undefined"
    if row["low"] > 0:
        return "▲ beyond noise"
    if row["high"] < 0:
        return "▼ beyond noise"
    return "within noise"


class PromotionRefused(RuntimeError):
    """The candidate cannot be compared with the champion: no alias moves."""


@contextmanager
def _registry_call(name: str, doing: str) -> Iterator[None]:
    """Turn any failure of the registry into PromotionRefused naming the model and the step:
    an error must never read as "no champion yet" and promote the candidate."""
    try:
        yield
    except PromotionRefused:
        raise
    except Exception as error:
        raise PromotionRefused(
            f"registered model {name!r}: the registry failed while {doing} "
            f"({type(error).__name__}: {error}); @{CHAMPION} was not moved"
        ) from error


def current_champion(client: mlflow.MlflowClient, name: str) -> tuple[Any, float | None]:
    """The version holding ``@champion`` and its ``score`` tag; (None, None) when no version
    holds the alias (the first publish). A champion whose tag is missing or not a finite
    number cannot be compared with: PromotionRefused."""
    version = client.get_registered_model(name).aliases.get(CHAMPION)
    if version is None:
        return None, None
    tag = client.get_model_version(name, str(version)).tags.get(SCORE_TAG)
    try:
        score = float(tag)
    except (TypeError, ValueError):
        score = math.nan
    if not math.isfinite(score):
        raise PromotionRefused(
            f"registered model {name!r} version {version} holds @{CHAMPION} but its tag "
            f"{SCORE_TAG!r} is {tag!r}, not a score, so the candidate cannot be compared with "
            f"it; @{CHAMPION} was not moved. Tag version {version} with its publish.metric "
            f"score (or move @{CHAMPION} by hand) and run publish again."
        )
    return version, score


def promote_if_better(params: Params, score: float) -> dict[str, Any]:
    """Tag the candidate with its score; move ``champion`` to it when it is strictly better.
    Raises PromotionRefused, moving nothing, when the champion's score cannot be read."""
    client = mlflow.MlflowClient(tracking_uri(params))
    name = params.mlflow.registered_model
    with _registry_call(name, f"reading @{CANDIDATE} and @{CHAMPION}"):
        candidate = client.get_model_version_by_alias(name, CANDIDATE)
        client.set_model_version_tag(name, candidate.version, SCORE_TAG, str(score))
        champion_version, champion_score = current_champion(client, name)
    promote = should_promote(score, champion_score, params.publish.higher_is_better)
    if promote:
        with _registry_call(name, f"moving @{CHAMPION} to version {candidate.version}"):
            client.set_registered_model_alias(name, CHAMPION, candidate.version)
    return {
        "model": name,
        "metric": params.publish_metric(),
        "candidate_version": candidate.version,
        "candidate_score": score,
        "champion_version_before": champion_version,
        "champion_score_before": champion_score,
        "promoted": promote,
    }


def run(params: Params, args: argparse.Namespace | None = None) -> dict[str, Any]:
    evaluation = json.loads((stage_dir(params, "evaluate") / "metrics.json").read_text())
    ablation = json.loads((stage_dir(params, "evaluate") / "ablation.json").read_text())
    with (
        stage_run(params, "publish", logged={"publish": params.publish.model_dump()}) as run_,
        stage_output(params, "publish", {"mlflow_run_id": run_.info.run_id}) as (out, extra),
    ):
        table = results_markdown(evaluation)
        score = metric_value(evaluation, params.publish_metric())
        decision = promote_if_better(params, score)
        Path(out / "results.md").write_text(table)
        Path(out / "ablation.md").write_text(ablation_markdown(ablation))
        # The candidate's score alone (the full table is evaluate's; the per-experiment
        # metrics, metrics/evaluate.json and metrics/full/evaluate.json).
        Path(out / "results.json").write_text(json.dumps({"candidate_score": score}, indent=1))
        Path(out / "registry.json").write_text(json.dumps(decision, indent=2, sort_keys=True))
        mlflow.log_metric("candidate_score", score)
        mlflow.log_artifact(str(out / "results.md"))
        mlflow.log_artifact(str(out / "ablation.md"))
        extra["registry"] = decision
    print(table)
    verdict = (
        f"promoted {decision['model']} v{decision['candidate_version']} to @champion"
        if decision["promoted"]
        else f"kept @champion v{decision['champion_version_before']}"
    )
    print(
        f"{params.publish_metric()}: candidate {score:.4f} vs champion "
        f"{decision['champion_score_before']}: {verdict}"
    )
    return decision


def main(argv: list[str] | None = None) -> dict[str, Any]:
    try:
        return stage_main("publish", run, argv)
    except PromotionRefused as error:
        print(f"publish: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
