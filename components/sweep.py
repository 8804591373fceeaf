"""Job ``sweep``: Ray Tune over pre-training's loss weights, SIA threshold and temperatures.

Every trial pre-trains through the pipeline's own ``TorchTrainer`` (``pretrain.build_trainer``)
with the trial's settings, reports a cheap validation signal (``components.sweep_signal``)
every ``sweep.report_every`` steps, and ASHA stops the trials that trail at its rungs. The
sweep is one MLflow parent run in the ``<prefix>-sweep`` experiment with one child run per
trial (its settings, loss curves and signal). The best trial that trained to the end is
written as dotted ``params.yaml`` keys (``best_params.yaml``) for ``sista sweep --apply`` or
``dvc exp run -S``. Not a DVC stage: ``dvc repro`` never starts a sweep.

    python -m pipeline.launch sweep          # or: sista sweep
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import mlflow
import pyarrow.fs
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from .config import (
    Distribution,
    Params,
    PretrainSection,
    nested,
    tracking_uri,
)
from .pretrain_data import PretrainData
from .runtime import ensure_ray
from .stage import stage_main
from .stage_storage import absolute, data_root, ray_storage, stage_output
from .sweep_best import BEST_FILE, best_file_text
from .sweep_signal import SIGNALS, ValidationSignal
from .tracking import stage_run

TRIAL_TAG = "sweep.trial_id"


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

    from .pretrain import build_trainer

    trial_id = tune.get_context().get_trial_id()
    overrides = trial_settings(config, params.sweep.space)
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
    results: tune.ResultGrid, keys: list[str], metric: str, total_steps: int
) -> list[dict[str, Any]]:
    """One row per trial in creation order: settings, the signal at each report, how far it
    trained and why it stopped."""
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
                "settings": trial_settings(result.config, keys),
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


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The completed trial with the highest final signal (a trial ASHA stopped early was
    scored on less training, so it is not comparable)."""
    completed = [row for row in rows if row["state"] == "completed"]
    if not completed:
        raise RuntimeError("no sweep trial trained to the end; see the trials' errors")
    return max(completed, key=lambda row: row["signal"])


def results_markdown(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    keys = list(rows[0]["settings"]) if rows else []
    short = [key.removeprefix("pretrain.") for key in keys]
    lines = [
        f"Sweep {summary['parent_run_id']} ({summary['date']}): signal {summary['metric']} "
        f"(validation), reports every {summary['report_every']} steps of "
        f"{summary['total_steps']}.",
        "",
        "| trial | " + " | ".join(short) + " | steps | signal at each report | final | note |",
        "|---" * (len(keys) + 5) + "|",
    ]
    for row in rows:
        marks = []
        if row["trial_id"] == summary.get("current_trial_id"):
            marks.append("current params.yaml")
        if row["trial_id"] == summary["best_trial_id"]:
            marks.append("**best**")
        history = ", ".join(f"{r['signal']:.3f}@{r['step']}" for r in row["reports"])
        final = "—" if row["signal"] is None else f"{row['signal']:.3f}"
        values = " | ".join(f"{row['settings'][key]:g}" for key in keys)
        lines.append(
            f"| {row['trial_id']} | {values} | {row['steps']} ({row['state']}) | {history} "
            f"| {final} | {', '.join(marks)} |"
        )
    return "\n".join(lines) + "\n"


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


def run(params: Params, args: argparse.Namespace | None = None) -> dict[str, Any]:
    check_inputs(params)
    params = anchored(params)
    config = params.sweep
    metric = SIGNALS[config.signal]
    keys = list(config.space)
    total_steps = training_steps(params, trial_section(params, current_values(params)))
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
        searcher = BasicVariantGenerator(
            points_to_evaluate=[current_values(params)] if config.include_current else None,
            max_concurrent=config.max_concurrent,
            random_state=config.seed,
        )
        scheduler = ASHAScheduler(
            time_attr="step",
            # One past the end: ASHA stops a trial that reaches max_t, and a trial stopped
            # while its last report is being handled would not shut down cleanly.
            max_t=total_steps + 1,
            grace_period=min(config.report_every, total_steps),
            reduction_factor=config.reduction_factor,
        )
        tuner = tune.Tuner(
            tune.with_resources(
                tune.with_parameters(run_trial, params=params, parent=parent),
                {"cpu": config.cpus_per_trial},
            ),
            param_space={key: sampler(config.space[key]) for key in keys},
            tune_config=tune.TuneConfig(
                metric=metric,
                mode="max",
                num_samples=config.trials,
                search_alg=searcher,
                scheduler=scheduler,
                max_concurrent_trials=config.max_concurrent,
            ),
            run_config=tune.RunConfig(
                name=parent["name"], verbose=1, **ray_storage(params, "tune")
            ),
        )
        try:
            results = tuner.fit()
        finally:  # trial checkpoints are not kept: the best settings are re-run by the pipeline
            remove_trial_checkpoints(params, f"{parent['name']}-")
        rows = trial_rows(results, keys, metric, total_steps)
        close_child_runs(params, parent["run_id"], rows)
        best = best_row(rows)
        current = rows[0] if config.include_current and rows else None
        summary = {
            "parent_run_id": parent["run_id"],
            "date": date,
            "metric": metric,
            "report_every": config.report_every,
            "total_steps": total_steps,
            "best_trial_id": best["trial_id"],
            "best_signal": best["signal"],
            "current_trial_id": current["trial_id"] if current else None,
            "current_signal": current["signal"] if current else None,
            "current_state": current["state"] if current else None,
        }
        (out / "trials.json").write_text(json.dumps({"summary": summary, "trials": rows}, indent=1))
        (out / "results.md").write_text(results_markdown(rows, summary))
        (out / BEST_FILE).write_text(best_file_text(best, summary))
        mlflow.log_metric(f"best_{metric}", best["signal"])
        if current and current["signal"] is not None:
            mlflow.log_metric(f"current_{metric}", current["signal"])
        mlflow.log_params({f"best.{key}": value for key, value in best["settings"].items()})
        for name in ("trials.json", "results.md", BEST_FILE):
            mlflow.log_artifact(str(out / name))
        extra["summary"] = summary
    print((data_root(params.storage) / "sweep" / "results.md").read_text())
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return stage_main("sweep", run, argv)


if __name__ == "__main__":
    main()
