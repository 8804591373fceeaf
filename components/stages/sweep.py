"""Job ``sweep``: Ray Tune over pre-training's loss weights, SIA threshold and temperatures.

Every trial pre-trains through the pipeline's own ``TorchTrainer`` (``pretrain.build_trainer``)
with the trial's settings and reports a cheap validation signal (``components.stages.sweep_signal``)
every ``sweep.report_every`` steps. Two phases:

1. the baseline: params.yaml's own values, trained to the end once per seed of
   ``sweep.current_seeds`` (never stopped): the signal's mean and its spread over seeds;
2. the search: ``sweep.trials`` sampled settings, ASHA stopping the ones that trail at its rungs;
3. the confirmation: when the best sampled trial that trained to the end beats the baseline's
   mean by more than ``sweep.noise_sds`` standard deviations over seeds, its settings are
   trained on the baseline's other seeds too (the best of many noisy trials looks better
   than it is).

The candidate replaces the defaults only if its mean over those seeds still beats the
baseline's mean by that margin; otherwise the current values are kept, with the reason.
The sweep is one MLflow parent run in the ``<prefix>-sweep`` experiment with one child run
per trial (its settings, loss curves and signal); the chosen settings are written as dotted
``params.yaml`` keys (``best_params.yaml``) for ``sista sweep --apply`` or ``dvc exp run -S``.
Not a DVC stage: ``dvc repro`` never starts a sweep.

    python -m pipeline.launch sweep          # or: sista sweep
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import statistics
from pathlib import Path
from typing import Any

import mlflow
import pyarrow.fs
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from components.platform.config import (
    Distribution,
    Params,
    PretrainSection,
    nested,
    tracking_uri,
)
from components.platform.runtime import ensure_ray
from components.platform.stage import stage_main
from components.platform.stage_storage import absolute, data_root, ray_storage, stage_output
from components.platform.tracking import stage_run
from components.stages.pretrain_data import PretrainData
from components.stages.sweep_best import BEST_FILE, best_file_text
from components.stages.sweep_signal import SIGNALS, ValidationSignal

TRIAL_TAG = "sweep.trial_id"
SEED_KEY = "pretrain.seed"


def sampler(distribution: Distribution) -> Any:
    """A Tune search-space sampler for one swept number."""
    if distribution.choice is not None:
        return tune.choice(list(distribution.choice))
    if distribution.uniform is not None:
        low, high = distribution.uniform
        if distribution.q:
            return tune.quniform(low, high, distribution.q)
        return tune.uniform(low, high)
    low, high = distribution.loguniform  # type: ignore[misc]
    if distribution.q:
        return tune.qloguniform(low, high, distribution.q)
    return tune.loguniform(low, high)


def current_values(params: Params) -> dict[str, float]:
    """params.yaml's own value of every swept key: the baseline trial."""
    values = {}
    for key in params.sweep.space:
        value: Any = params
        for name in key.split("."):
            value = getattr(value, name)
        values[key] = value
    return values


def trial_settings(config: dict[str, Any], keys: Any) -> dict[str, float]:
    """A trial's swept values, without the float noise of quantised sampling (0.95, not
    0.9500000000000001): what the trial trains with and what best_params.yaml says."""
    return {key: float(f"{config[key]:.10g}") for key in keys}


def trial_section(params: Params, overrides: dict[str, float]) -> PretrainSection:
    """The pretrain section a trial trains with: params.yaml's, the trial's values, and the
    sweep's resources and length."""
    changes = nested({key.removeprefix("pretrain."): value for key, value in overrides.items()})
    changes["cpus_per_worker"] = params.sweep.cpus_per_worker
    if params.sweep.epochs:
        changes.setdefault("optim", {})["epochs"] = params.sweep.epochs
    return params.pretrain.with_overrides(changes)


def training_steps(params: Params, section: PretrainSection) -> int:
    """Optimizer steps of one trial, as the training loop counts them."""
    pairs = PretrainData(data_root(params.storage), "train", section.semantics)
    per_epoch = pairs.steps_per_epoch(section.optim.batch_size, section.workers)
    return section.optim.epochs * min(per_epoch, section.optim.max_steps_per_epoch or per_epoch)


def validation_signal(params: Params) -> ValidationSignal:
    return ValidationSignal(
        data_root=str(data_root(params.storage)),
        kind=params.sweep.signal,
        dataset=params.evaluate.tasks["classification"][0]
        if params.evaluate.tasks.get("classification")
        else "",
        fractions=params.sweep.probe_fractions,
        seeds=params.ingest.downstream.seeds,
        semantics=params.pretrain.semantics,
        probe={
            "epochs": params.evaluate.probe_epochs,
            "lr": params.evaluate.probe_lr,
            "weight_decay": params.evaluate.probe_weight_decay,
        },
    )


def run_trial(config: dict[str, float], params: Params, parent: dict[str, str]) -> None:
    """The Tune function of one trial: a child MLflow run, then pre-training whose reports
    reach Tune (``TuneReportCallback``) so ASHA can stop it between rungs."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from components.stages.pretrain import build_trainer

    trial_id = tune.get_context().get_trial_id()
    overrides = trial_settings(config, params.sweep.space)
    if SEED_KEY in config:  # a baseline trial: the current values with another seed
        overrides[SEED_KEY] = int(config[SEED_KEY])
    section = trial_section(params, overrides)
    client = mlflow.MlflowClient(tracking_uri(params))
    child = client.create_run(
        parent["experiment_id"],
        run_name=f"trial-{trial_id}",
        tags={MLFLOW_PARENT_RUN_ID: parent["run_id"], TRIAL_TAG: trial_id},
    )
    client.log_batch(
        child.info.run_id,
        params=[mlflow.entities.Param(key, str(value)) for key, value in overrides.items()],
    )
    trainer = build_trainer(
        params,
        section,
        child.info.run_id,
        f"{parent['name']}-{trial_id}",
        callbacks=[TuneReportCallback()],
        report_every=params.sweep.report_every,
        scorer=validation_signal(params),
    )
    trainer.fit()


def trial_rows(
    results: tune.ResultGrid, keys: list[str], metric: str, total_steps: int, phase: str
) -> list[dict[str, Any]]:
    """One row per trial of one phase (``current`` or ``search``) in creation order:
    settings, seed, the signal at each report, how far it trained and why it stopped."""
    rows = []
    for result in results:
        history = result.metrics_dataframe
        reports = (
            []
            if history is None or metric not in history
            else [
                {"step": int(step), "signal": float(value)}
                for step, value in zip(history["step"], history[metric], strict=True)
                if value == value
            ]
        )
        steps = reports[-1]["step"] if reports else 0
        state = (
            "failed"
            if result.error
            else "completed"
            if steps >= total_steps
            else f"stopped at step {steps}"
        )
        rows.append(
            {
                "trial_id": result.metrics.get("trial_id") or trial_id_of(result.path),
                "phase": phase,
                "settings": trial_settings(result.config, keys),
                "seed": int(result.config[SEED_KEY]) if SEED_KEY in result.config else None,
                "reports": reports,
                "steps": steps,
                "state": state,
                "signal": reports[-1]["signal"] if reports else None,
                "error": str(result.error) if result.error else None,
            }
        )
    return sorted(rows, key=lambda row: row["trial_id"])


def trial_id_of(path: str) -> str:
    """A trial's id from its folder name (``run_trial_<id>_<n>_<settings>``), for a trial
    that failed before reporting anything."""
    match = re.search(r"_([0-9a-f]+_\d{5})_", Path(path).name)
    return match.group(1) if match else Path(path).name


def close_child_runs(params: Params, parent_run_id: str, rows: list[dict[str, Any]]) -> None:
    """Mark each trial's child run finished, stopped early (KILLED) or failed, and record its
    run id in the row. Runs of trials that ASHA stopped are closed here, by the driver."""
    client = mlflow.MlflowClient(tracking_uri(params))
    children = client.search_runs(
        [client.get_run(parent_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        max_results=1000,
    )
    by_trial = {run.data.tags.get(TRIAL_TAG): run for run in children}
    for row in rows:
        child = by_trial.get(row["trial_id"])
        if child is None:
            continue
        row["mlflow_run_id"] = child.info.run_id
        status = {"completed": "FINISHED", "failed": "FAILED"}.get(row["state"], "KILLED")
        client.set_tag(child.info.run_id, "sweep.state", row["state"])
        client.set_terminated(child.info.run_id, status)


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The completed trial with the highest final signal (a trial ASHA stopped early was
    scored on less training, so it is not comparable); None if none completed."""
    completed = [row for row in rows if row["state"] == "completed"]
    return max(completed, key=lambda row: row["signal"]) if completed else None


def spread(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (None below two values) of one signal over seeds."""
    return {
        "signals": values,
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else None,
    }


def baseline(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The current values' signal over the seeds that trained to the end: at each report step
    and at the end. None without a completed baseline trial."""
    completed = [row for row in rows if row["phase"] == "current" and row["state"] == "completed"]
    if not completed:
        return None
    steps = sorted({report["step"] for row in completed for report in row["reports"]})
    by_step = []
    for step in steps:
        values = [r["signal"] for row in completed for r in row["reports"] if r["step"] == step]
        if len(values) == len(completed):
            by_step.append({"step": step, **spread(values)})
    return {
        "seeds": [row["seed"] for row in completed],
        "settings": completed[0]["settings"],
        "by_step": by_step,
        **spread([row["signal"] for row in completed]),
    }


def beats_on_one_seed(rows: list[dict[str, Any]], noise_sds: float) -> dict[str, Any] | None:
    """The best completed sampled trial if its one run beats the current values' mean by more
    than ``noise_sds`` standard deviations over seeds: a candidate to confirm on the other
    seeds (the best of many noisy trials looks better than it is)."""
    best = best_row([row for row in rows if row["phase"] == "search"])
    current = baseline(rows)
    if best is None or current is None or current["sd"] is None:
        return None
    return best if best["signal"] - current["mean"] > noise_sds * current["sd"] else None


def choose(rows: list[dict[str, Any]], noise_sds: float) -> dict[str, Any]:
    """What the sweep recommends: the best completed sampled trial if it beats the baseline's
    mean by more than ``noise_sds`` standard deviations over seeds (on its mean over the
    seeds it was confirmed on, when it was), else the current values. Without a baseline (no
    ``current_seeds``) the best completed trial wins outright. The result also holds the
    ``best`` sampled trial and the ``current`` values' spread it compared."""
    best = best_row([row for row in rows if row["phase"] == "search"])
    current = baseline(rows)

    def decision(kind: str, row: dict[str, Any], margin: float | None, reason: str) -> dict:
        compared = {"best": best, "current": current}
        return {"decision": kind, "row": row, "margin": margin, "reason": reason, **compared}

    if current is None:
        if best is None:
            raise RuntimeError("no sweep trial trained to the end; see the trials' errors")
        return decision("sampled", best, None, "no baseline")
    margin = noise_sds * current["sd"] if current["sd"] is not None else 0.0
    kept = {"trial_id": "current", "settings": current["settings"], "signal": current["mean"]}
    if best is None:
        return decision("current", kept, margin, "no sampled trial trained to the end")
    gain = best["signal"] - current["mean"]
    confirmed = [
        row["signal"]
        for row in rows
        if row["phase"] == "confirm"
        and row["state"] == "completed"
        and row["settings"] == best["settings"]
    ]
    if gain <= margin:
        reason = (
            f"the best sampled trial ({best['trial_id']}, {gain:+.4f}) is within the noise "
            f"({noise_sds:g} sd over {len(current['seeds'])} seeds = {margin:.4f})"
        )
        return decision("current", kept, margin, reason)
    if not confirmed:
        reason = f"trial {best['trial_id']} beats the current values by {gain:+.4f} > {margin:.4f}"
        return decision("sampled", best, margin, reason)
    mean = statistics.fmean([best["signal"], *confirmed])
    over = f"over {len(confirmed) + 1} seeds"
    if mean - current["mean"] > margin:
        reason = (
            f"trial {best['trial_id']} beats the current values by {mean - current['mean']:+.4f} "
            f"> {margin:.4f} {over} (confirmed)"
        )
        return decision("sampled", {**best, "signal": mean}, margin, reason)
    reason = (
        f"trial {best['trial_id']} beat the current values by {gain:+.4f} on one seed but by "
        f"{mean - current['mean']:+.4f} {over}, within the noise ({margin:.4f})"
    )
    return decision("current", kept, margin, reason)


def _sd(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def results_markdown(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """The baseline's spread over seeds at each report, then every trial with its signal at
    each report and its difference to the baseline's mean at the same step."""
    keys = list(rows[0]["settings"]) if rows else []
    short = [key.removeprefix("pretrain.") for key in keys]
    lines = [
        f"Sweep {summary['parent_run_id']} ({summary['date']}): signal {summary['metric']} "
        f"(validation), reports every {summary['report_every']} steps of "
        f"{summary['total_steps']}.",
        "",
        f"Chosen: {summary['decision']} values: {summary['reason']}.",
        "",
    ]
    current = summary.get("current")
    mean_at = {}
    if current:
        seeds = current["seeds"]
        lines += [
            f"Current values over pre-training seeds {', '.join(map(str, seeds))}:",
            "",
            "| step | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | sd |",
            "|---" * (len(seeds) + 3) + "|",
        ]
        for point in current["by_step"]:
            mean_at[point["step"]] = point["mean"]
            values = " | ".join(f"{v:.4f}" for v in point["signals"])
            lines.append(
                f"| {point['step']} | {values} | {point['mean']:.4f} | {_sd(point['sd'])} |"
            )
        lines.append("")
    lines += [
        "| trial | seed | " + " | ".join(short) + " | steps | signal at each report "
        "(vs current mean) | final | note |",
        "|---" * (len(keys) + 6) + "|",
    ]
    for row in rows:
        marks = []
        if row["phase"] == "current":
            marks.append("current params.yaml")
        if row["phase"] == "confirm":
            marks.append(f"confirms {summary['best_trial_id']} on another seed")
        if row["trial_id"] == summary["best_trial_id"]:
            marks.append("**best sampled**")
        history = ", ".join(
            f"{r['signal']:.3f}@{r['step']}"
            + (f" ({r['signal'] - mean_at[r['step']]:+.3f})" if r["step"] in mean_at else "")
            for r in row["reports"]
        )
        final = "—" if row["signal"] is None else f"{row['signal']:.4f}"
        values = " | ".join(f"{row['settings'][key]:g}" for key in keys)
        seed = "" if row["seed"] is None else str(row["seed"])
        lines.append(
            f"| {row['trial_id']} | {seed} | {values} | {row['steps']} ({row['state']}) "
            f"| {history} | {final} | {', '.join(marks)} |"
        )
    return "\n".join(lines) + "\n"


def plot_signal(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    """The signal by step: the current values' mean and its spread over seeds (a band of
    ``noise_sds`` standard deviations), each sampled trial as a line ending where ASHA
    stopped it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(10, 4.5))
    current = summary.get("current")
    if current:
        steps = [point["step"] for point in current["by_step"]]
        means = [point["mean"] for point in current["by_step"]]
        width = [summary["noise_sds"] * (point["sd"] or 0) for point in current["by_step"]]
        axis.fill_between(
            steps,
            [m - w for m, w in zip(means, width, strict=True)],
            [m + w for m, w in zip(means, width, strict=True)],
            color="grey",
            alpha=0.3,
            label=f"current values: mean ± {summary['noise_sds']:g} sd over seeds",
        )
        axis.plot(steps, means, color="black", linewidth=2)
    for row in rows:
        if row["phase"] != "search" or not row["reports"]:
            continue
        steps = [report["step"] for report in row["reports"]]
        signals = [report["signal"] for report in row["reports"]]
        best = row["trial_id"] == summary["best_trial_id"]
        axis.plot(
            steps,
            signals,
            marker="o",
            markersize=3,
            linewidth=2 if best else 1,
            label=f"trial {row['trial_id']}" + (" (best sampled)" if best else ""),
        )
    axis.set_xlabel("training step")
    axis.set_ylabel(summary["metric"] + " (validation)")
    axis.set_title("sista sweep: sampled trials against the current values' seed spread")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the lines
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def check_inputs(params: Params) -> None:
    root = data_root(params.storage)
    needed = ["ingest/manifest.parquet", "reports/tokens.arrow", "similarity/embeddings.npy"]
    missing = [path for path in needed if not (root / path).exists()]
    if missing:
        raise SystemExit(
            f"the sweep trains on the pipeline's outputs; missing {', '.join(missing)} under "
            f"{root}: run `dvc repro similarity` first"
        )


def remove_trial_checkpoints(params: Params, prefix: str) -> None:
    """Delete the Ray Train runs named ``prefix*`` under ``<storage>/checkpoints``, on a
    local disk or on S3 alike (the filesystem Ray Train wrote them with)."""
    where = ray_storage(params, "checkpoints")
    filesystem = where.get("storage_filesystem") or pyarrow.fs.LocalFileSystem()
    selector = pyarrow.fs.FileSelector(where["storage_path"], allow_not_found=True)
    for entry in filesystem.get_file_info(selector):
        if entry.type == pyarrow.fs.FileType.Directory and entry.base_name.startswith(prefix):
            filesystem.delete_dir(entry.path)


def anchored(params: Params) -> Params:
    """``params`` with the data folder and the MLflow store as absolute locations: trials
    run in their own working folders (a relative ``sqlite:///mlflow.db`` would be another
    store there)."""
    return params.model_copy(
        update={
            "storage": absolute(params.storage),
            "mlflow": params.mlflow.model_copy(update={"tracking_uri": tracking_uri(params)}),
        }
    )


def tune_phase(
    params: Params,
    parent: dict[str, str],
    name: str,
    param_space: dict[str, Any],
    **tune_config: Any,
) -> tune.ResultGrid:
    """One Ray Tune run of ``run_trial`` under the sweep's parent run."""
    config = params.sweep
    tuner = tune.Tuner(
        tune.with_resources(
            tune.with_parameters(run_trial, params=params, parent=parent),
            {"cpu": config.cpus_per_trial},
        ),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=SIGNALS[config.signal],
            mode="max",
            max_concurrent_trials=config.max_concurrent,
            **tune_config,
        ),
        run_config=tune.RunConfig(name=name, verbose=1, **ray_storage(params, "tune")),
    )
    return tuner.fit()


def run(params: Params, args: argparse.Namespace | None = None) -> dict[str, Any]:
    check_inputs(params)
    params = anchored(params)
    config = params.sweep
    metric = SIGNALS[config.signal]
    keys = list(config.space)
    current = current_values(params)
    total_steps = training_steps(params, trial_section(params, current))
    ensure_ray(params, dashboard=True)  # stopped trials' resources are freed via the State API
    date = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    with (
        stage_run(
            params,
            "sweep",
            run_name=f"sweep {date}",
            logged={"sweep": config.model_dump(), "pretrain": params.pretrain.model_dump()},
        ) as parent_run,
        stage_output(params, "sweep", {"mlflow_run_id": parent_run.info.run_id}) as (out, extra),
    ):
        parent = {
            "run_id": parent_run.info.run_id,
            "experiment_id": parent_run.info.experiment_id,
            "name": f"sweep-{parent_run.info.run_id[:8]}",
        }
        rows = []
        try:
            if config.current_seeds:  # the baseline: every seed to the end, none stopped
                results = tune_phase(
                    params,
                    parent,
                    f"{parent['name']}-current",
                    {**current, SEED_KEY: tune.grid_search(list(config.current_seeds))},
                    scheduler=FIFOScheduler(),
                )
                rows += trial_rows(results, keys, metric, total_steps, "current")
            results = tune_phase(
                params,
                parent,
                f"{parent['name']}-search",
                {key: sampler(config.space[key]) for key in keys},
                num_samples=config.trials,
                search_alg=BasicVariantGenerator(
                    max_concurrent=config.max_concurrent, random_state=config.seed
                ),
                scheduler=ASHAScheduler(
                    time_attr="step",
                    # One past the end: ASHA stops a trial that reaches max_t, and a trial
                    # stopped while its last report is being handled would not shut down
                    # cleanly.
                    max_t=total_steps + 1,
                    grace_period=min(config.report_every, total_steps),
                    reduction_factor=config.reduction_factor,
                ),
            )
            rows += trial_rows(results, keys, metric, total_steps, "search")
            candidate = beats_on_one_seed(rows, config.noise_sds)
            others = [seed for seed in config.current_seeds if seed != params.pretrain.seed]
            if candidate and others:  # the same seeds as the current values, none stopped
                results = tune_phase(
                    params,
                    parent,
                    f"{parent['name']}-confirm",
                    {**candidate["settings"], SEED_KEY: tune.grid_search(others)},
                    scheduler=FIFOScheduler(),
                )
                rows += trial_rows(results, keys, metric, total_steps, "confirm")
        finally:  # trial checkpoints are not kept: the chosen settings are re-run by the pipeline
            remove_trial_checkpoints(params, f"{parent['name']}-")
        close_child_runs(params, parent["run_id"], rows)
        chosen = choose(rows, config.noise_sds)
        best = chosen["best"]
        summary = {
            "parent_run_id": parent["run_id"],
            "date": date,
            "metric": metric,
            "report_every": config.report_every,
            "total_steps": total_steps,
            "current": chosen["current"],
            "best_trial_id": best["trial_id"] if best else None,
            "best_signal": best["signal"] if best else None,
            "noise_sds": config.noise_sds,
            "margin": chosen["margin"],
            "decision": chosen["decision"],
            "reason": chosen["reason"],
            "chosen_trial_id": chosen["row"]["trial_id"],
        }
        (out / "trials.json").write_text(json.dumps({"summary": summary, "trials": rows}, indent=1))
        (out / "results.md").write_text(results_markdown(rows, summary))
        (out / BEST_FILE).write_text(best_file_text(chosen["row"], summary))
        plot_signal(rows, summary, out / "signal.png")
        if best:
            mlflow.log_metric(f"best_{metric}", best["signal"])
        if summary["current"]:
            mlflow.log_metric(f"current_{metric}", summary["current"]["mean"])
            if summary["current"]["sd"] is not None:
                mlflow.log_metric(f"current_{metric}_sd", summary["current"]["sd"])
        mlflow.set_tag("sweep.decision", chosen["decision"])
        mlflow.log_params({f"chosen.{k}": v for k, v in chosen["row"]["settings"].items()})
        for name in ("trials.json", "results.md", BEST_FILE, "signal.png"):
            mlflow.log_artifact(str(out / name))
        extra["summary"] = summary
    print((data_root(params.storage) / "sweep" / "results.md").read_text())
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return stage_main("sweep", run, argv)


if __name__ == "__main__":
    main()
