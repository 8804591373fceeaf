"""Stage ``publish``: the results table, the table of which differences to SISTA exceed noise
(``ablation.md``, from evaluate's paired bootstrap), and promotion of the candidate encoder.

The candidate (``sista-encoder@candidate``, registered by pretrain) takes the ``champion``
alias only when it beats the current champion on ``publish.metric`` (higher, or lower with
``publish.higher_is_better: false``). With ``publish.gate: bootstrap`` (the default) it must
beat it beyond noise: SISTA's per-test-image outputs on that cell (evaluate's
``gate_outputs.npz``, kept in the version's run) are paired with the champion's on the same
test images, and the 95 % paired-bootstrap interval of the difference must exclude 0 on the
better side; with ``strict``, any strict improvement of the ``score`` tag promotes. A tie
keeps the champion; the first candidate becomes champion. When the comparison cannot be made
(a champion without a readable ``score`` tag or gate outputs, other test images, a registry
that fails to answer), nothing moves and the stage fails naming the model, version and why.
The rule and its figures are tagged on the candidate (``gate.*``).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow

from components.platform.config import Params, tracking_uri
from components.platform.lineage import TAG_PREFIX as LINEAGE
from components.platform.stage import stage_dir, stage_main
from components.platform.stage_storage import stage_output
from components.platform.tracking import stage_run
from components.stages.paired_bootstrap import (
    GATE_OUTPUTS,
    Difference,
    NotComparable,
    gate_difference,
)

SCORE_TAG = "score"
GATE_ARTIFACTS = "gate"  # the candidate's gate outputs, in its pre-training run's artifacts
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


def beats_beyond_noise(difference: Difference, higher_is_better: bool) -> bool:
    """The bootstrap gate's rule: the interval of candidate - champion excludes 0 on the
    better side. An undefined interval (NaN) never promotes."""
    return difference.low > 0 if higher_is_better else difference.high < 0


def compare_with_champion(
    client: mlflow.MlflowClient, name: str, champion: Any, outputs: Path, folder: Path
) -> tuple[Difference, dict[str, Any]]:
    """The candidate's gate outputs against those the champion's publish logged: the paired
    difference with its interval. PromotionRefused when the champion's cannot be read or
    paired (another metric, other test images, no common seed)."""
    with _registry_call(name, f"reading the gate outputs of version {champion}"):
        run_id = client.get_model_version(name, str(champion)).run_id
    try:
        path = client.download_artifacts(run_id, f"{GATE_ARTIFACTS}/{GATE_OUTPUTS}", str(folder))
        return gate_difference(outputs, Path(path))
    except (NotComparable, OSError, mlflow.exceptions.MlflowException) as error:
        raise PromotionRefused(
            f"registered model {name!r} version {champion} holds @{CHAMPION}, but the candidate "
            f"cannot be compared with it beyond noise: {error}; @{CHAMPION} was not moved. "
            f"Move @{CHAMPION} by hand, or set publish.gate: strict to compare the score tags."
        ) from error


def _log_gate_outputs(client: mlflow.MlflowClient, run_id: str, outputs: Path) -> None:
    with tempfile.TemporaryDirectory() as folder:
        named = Path(folder) / GATE_OUTPUTS
        shutil.copyfile(outputs, named)
        client.log_artifact(run_id, str(named), GATE_ARTIFACTS)


def promote_if_better(params: Params, score: float, outputs: Path | None = None) -> dict[str, Any]:
    """Tag the candidate with its score; move ``champion`` to it when it is better: beyond
    the paired-bootstrap noise on the same test images (``publish.gate: bootstrap``, reading
    ``outputs``, evaluate's gate outputs) or strictly (``strict``). The first candidate
    becomes champion. Raises PromotionRefused, moving nothing, when the champion cannot be
    compared with; the rule and its figures are tagged on the candidate (``gate.*``)."""
    client = mlflow.MlflowClient(tracking_uri(params))
    name = params.mlflow.registered_model
    bootstrap = params.publish.gate == "bootstrap"
    if bootstrap and (outputs is None or not outputs.is_file()):
        raise PromotionRefused(
            f"publish.gate bootstrap needs evaluate's {GATE_OUTPUTS}, not found at {outputs}; "
            f"run evaluate again. @{CHAMPION} was not moved"
        )
    with _registry_call(name, f"reading @{CANDIDATE} and @{CHAMPION}"):
        candidate = client.get_model_version_by_alias(name, CANDIDATE)
        client.set_model_version_tag(name, candidate.version, SCORE_TAG, str(score))
        if bootstrap:  # kept with the version: the next candidate is paired with these
            _log_gate_outputs(client, candidate.run_id, outputs)
        champion_version, champion_score = current_champion(client, name)
    higher_is_better = params.publish.higher_is_better
    decision: dict[str, Any] = {
        "model": name,
        "metric": params.publish_metric(),
        "gate": params.publish.gate,
        "candidate_version": candidate.version,
        "candidate_score": score,
        "champion_version_before": champion_version,
        "champion_score_before": champion_score,
        "lineage": {k: v for k, v in candidate.tags.items() if k.startswith(LINEAGE)},
    }
    if bootstrap and champion_version is not None and math.isfinite(score):
        with tempfile.TemporaryDirectory() as folder:
            difference, paired = compare_with_champion(
                client, name, champion_version, outputs, Path(folder)
            )
        promote = beats_beyond_noise(difference, higher_is_better)
        side = "above" if higher_is_better else "below"
        decision["rule"] = (
            f"candidate - champion v{champion_version} on {paired['metric']}, mean over seeds "
            f"{paired['seeds']}: its 95 % paired-bootstrap interval over {paired['test_images']} "
            f"test images ({paired['samples']} resamples) must lie {side} 0"
        )
        decision |= {"difference": difference.mean, "interval": [difference.low, difference.high]}
    else:
        promote = should_promote(score, champion_score, higher_is_better)
        if not math.isfinite(score):
            decision["rule"] = "a candidate score that is not a number never promotes"
        elif champion_version is None:
            decision["rule"] = "first champion"
        else:
            decision["rule"] = f"strictly {'higher' if higher_is_better else 'lower'} {SCORE_TAG}"
    decision["promoted"] = promote
    with _registry_call(name, f"tagging version {candidate.version} with the gate's decision"):
        for key in ("rule", "difference", "interval", "promoted"):
            if key in decision:
                client.set_model_version_tag(
                    name, candidate.version, f"gate.{key}", str(decision[key])
                )
    if promote:
        with _registry_call(name, f"moving @{CHAMPION} to version {candidate.version}"):
            client.set_registered_model_alias(name, CHAMPION, candidate.version)
    return decision


def run(params: Params, args: argparse.Namespace | None = None) -> dict[str, Any]:
    evaluation = json.loads((stage_dir(params, "evaluate") / "metrics.json").read_text())
    ablation = json.loads((stage_dir(params, "evaluate") / "ablation.json").read_text())
    with (
        stage_run(params, "publish", logged={"publish": params.publish.model_dump()}) as run_,
        stage_output(params, "publish", {"mlflow_run_id": run_.info.run_id}) as (out, extra),
    ):
        table = results_markdown(evaluation)
        score = metric_value(evaluation, params.publish_metric())
        decision = promote_if_better(params, score, stage_dir(params, "evaluate") / GATE_OUTPUTS)
        mlflow.set_tags(decision["lineage"])  # the scheduled run compares its inputs with these
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
        f"{decision['champion_score_before']}: {verdict} (rule: {decision['rule']})"
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
