"""Stage ``publish``: the results table, and promotion of the candidate encoder.

The candidate (``sista-encoder@candidate``, registered by pretrain) takes the ``champion``
alias only when it beats the current champion on ``publish.metric``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import mlflow

from .config import Params, tracking_uri
from .stage import stage_dir, stage_main
from .stage_storage import stage_output
from .tracking import stage_run

SCORE_TAG = "score"


def metric_value(summary: dict[str, Any], metric: str, init: str = "sista") -> float:
    """``classification/auroc@0.01`` -> mean AUROC of ``init`` at 1 % labels."""
    task_metric, fraction = metric.split("@")
    task, name = task_metric.split("/")
    return float(summary[task][name][init][f"{float(fraction):g}"]["mean"])


def should_promote(candidate: float, champion: float | None, higher_is_better: bool) -> bool:
    """Promote when there is no champion yet or the candidate is strictly better."""
    if champion is None:
        return True
    return candidate > champion if higher_is_better else candidate < champion


# Entries of evaluate's metrics.json that are not task tables.
NOT_TASKS = ("images", "heatmap_localisation")


def results_markdown(summary: dict[str, Any], note: str) -> str:
    """Trained tasks: one table per metric, inits x label fractions (mean ± std over seeds).
    Language tasks (no labels): one table per task, inits x metrics."""
    lines = []
    for task, by_metric in summary.items():
        if task in NOT_TASKS:
            continue
        fractions = sorted(
            {f for by_init in by_metric.values() for v in by_init.values() for f in v}, key=float
        )
        if fractions == ["0"]:
            lines += _language_table(task, by_metric)
            continue
        for metric, by_init in by_metric.items():
            lines.append(f"### {task}: {metric} (test, mean ± std over seeds)\n")
            lines.append(
                "| init | " + " | ".join(f"{100 * float(f):g} % labels" for f in fractions) + " |"
            )
            lines.append("|---" * (len(fractions) + 1) + "|")
            for init, by_fraction in sorted(by_init.items()):
                cells = [
                    f"{by_fraction[f]['mean']:.3f} ± {by_fraction[f]['std']:.3f}" for f in fractions
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
    lines.append(f"Images: {note}.")
    return "\n".join(lines) + "\n"


def _natural_key(name: str) -> tuple[str, int]:
    """``recall_at_10`` after ``recall_at_5`` (the JSON keeps metrics sorted as text)."""
    stem = name.rstrip("0123456789")
    return stem, int(name[len(stem) :] or 0)


def _language_table(task: str, by_metric: dict[str, Any]) -> list[str]:
    # Recall@1, @5, @10 in that order (the JSON keeps them sorted as text).
    metrics = sorted(
        by_metric,
        key=lambda m: (m.rstrip("0123456789"), int("0" + m[len(m.rstrip("0123456789")) :])),
    )
    inits = sorted({init for by_init in by_metric.values() for init in by_init})
    lines = [f"### {task} (no labels; held-out data)\n", "| init | " + " | ".join(metrics) + " |"]
    lines.append("|---" * (len(metrics) + 1) + "|")
    for init in inits:
        values = [by_metric[m].get(init, {}).get("0", {}).get("mean") for m in metrics]
        lines.append(
            f"| {init} | " + " | ".join("—" if v is None else f"{v:.3f}" for v in values) + " |"
        )
    return [*lines, ""]


def promote_if_better(params: Params, score: float) -> dict[str, Any]:
    """Tag the candidate with its score; move ``champion`` to it when it is better."""
    client = mlflow.MlflowClient(tracking_uri(params))
    name = params.mlflow.registered_model
    candidate = client.get_model_version_by_alias(name, "candidate")
    client.set_model_version_tag(name, candidate.version, SCORE_TAG, str(score))
    try:
        champion = client.get_model_version_by_alias(name, "champion")
        champion_score = float(champion.tags.get(SCORE_TAG, "nan"))
        champion_score = None if champion_score != champion_score else champion_score
        champion_version = champion.version
    except mlflow.exceptions.MlflowException:
        champion_score, champion_version = None, None
    promote = should_promote(score, champion_score, params.publish.higher_is_better)
    if promote:
        client.set_registered_model_alias(name, "champion", candidate.version)
    return {
        "model": name,
        "metric": params.publish.metric,
        "candidate_version": candidate.version,
        "candidate_score": score,
        "champion_version_before": champion_version,
        "champion_score_before": champion_score,
        "promoted": promote,
    }


def run(params: Params, args: argparse.Namespace | None = None) -> dict[str, Any]:
    evaluation = json.loads((stage_dir(params, "evaluate") / "metrics.json").read_text())
    note = evaluation.get("images", "")
    with (
        stage_run(params, "publish", logged={"publish": params.publish.model_dump()}) as run_,
        stage_output(params, "publish", {"mlflow_run_id": run_.info.run_id}) as (out, extra),
    ):
        table = results_markdown(evaluation, note)
        score = metric_value(evaluation, params.publish.metric)
        decision = promote_if_better(params, score)
        Path(out / "results.md").write_text(table)
        Path(out / "results.json").write_text(
            json.dumps({"results": evaluation, "registry": decision}, indent=2, sort_keys=True)
        )
        mlflow.log_metric("candidate_score", score)
        mlflow.log_artifact(str(out / "results.md"))
        extra["registry"] = decision
    print(table)
    verdict = (
        f"promoted {decision['model']} v{decision['candidate_version']} to @champion"
        if decision["promoted"]
        else f"kept @champion v{decision['champion_version_before']}"
    )
    print(
        f"{params.publish.metric}: candidate {score:.4f} vs champion "
        f"{decision['champion_score_before']}: {verdict}"
    )
    return decision


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return stage_main("publish", run, argv)


if __name__ == "__main__":
    main()
