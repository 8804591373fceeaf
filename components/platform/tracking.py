"""MLflow: one experiment per stage, the resolved config logged as params (secrets masked).

The store is ``MLFLOW_TRACKING_URI`` (a tracking server, ``http://host:5000``) or
``mlflow.tracking_uri`` (SQLite by default). Artifacts go to ``mlflow.artifact_root`` when it
is a URI (``s3://bucket/prefix``: MLflow's boto3 honours ``MLFLOW_S3_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_S3``); with a server and a local root, the server's own artifact store.

Inside `dvc exp run` every run is tagged with the DVC experiment's name and the params it
changed (:func:`dvc_experiment_tags`), so MLflow's compare view lines up with `dvc exp show`;
a queued experiment, run in a temporary copy of the repository, logs to the repository's own
store (:func:`dvc_experiment_store`).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import yaml

from components.platform.config import Params, tracking_uri
from components.platform.secrets import redacted


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; MLflow params are flat."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


# What `dvc exp run` sets for a stage's command (dvc/env.py), in the workspace and in a queue.
DVC_EXP_NAME, DVC_EXP_BASELINE_REV, DVC_ROOT = "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_ROOT"
EXP_TAG, BASELINE_TAG, PARAM_TAG = "dvc_exp", "dvc_baseline", "dvc_param."


def dvc_experiment_tags(params_file: str | Path = "params.yaml") -> dict[str, str]:
    """A run's tags inside `dvc exp run`: the experiment's name (``dvc_exp``), its baseline
    commit (``dvc_baseline``) and, per ``params_file`` key whose value differs from the
    baseline commit's, ``dvc_param.<key>``: the experiment's value. None outside one."""
    name = os.environ.get(DVC_EXP_NAME)
    if not name:
        return {}
    tags = {EXP_TAG: name}
    baseline = os.environ.get(DVC_EXP_BASELINE_REV)
    if baseline:
        tags[BASELINE_TAG] = baseline
        changed = changed_params(baseline, Path(params_file))
        tags.update({f"{PARAM_TAG}{key}": value for key, value in changed.items()})
    return tags


def changed_params(baseline: str, params_file: Path) -> dict[str, str]:
    """``params_file``'s keys whose value differs from the one in git commit ``baseline``,
    with the current value as text (``removed`` for a key no longer there); empty when git
    cannot show the baseline's file."""
    try:
        shown = subprocess.run(
            ["git", "show", f"{baseline}:./{params_file.as_posix()}"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    before = flatten(yaml.safe_load(shown.stdout) or {})
    after = flatten(yaml.safe_load(params_file.read_text()) or {})
    changed = {}
    for key in sorted(set(before) | set(after)):
        if key not in after:
            changed[key] = "removed"
        elif before.get(key, object()) != after[key]:
            value = after[key]
            text = value if isinstance(value, str) else json.dumps(value)
            changed[key] = redacted(key, text)[:5000]
    return changed


def dvc_experiment_store(params: Params) -> Params:
    """A queued `dvc exp run` runs the stages in a temporary copy of the repository
    (``<repository>/.dvc/tmp/exps/...``) that DVC deletes afterwards; ``DVC_ROOT`` names the
    repository. There a relative SQLite store and artifact folder become the repository's
    own, so the experiment's runs land with every other run (``MLFLOW_TRACKING_URI``, a
    server, still wins). Elsewhere ``params`` come back unchanged."""
    root = os.environ.get(DVC_ROOT)
    if not root or not Path.cwd().resolve().is_relative_to(Path(root).resolve() / ".dvc" / "tmp"):
        return params
    section, update = params.mlflow, {}
    prefix = "sqlite:///"
    store = section.tracking_uri.removeprefix(prefix)
    if section.tracking_uri.startswith(prefix) and not store.startswith("/"):
        update["tracking_uri"] = prefix + str(Path(root) / store)
    if "://" not in section.artifact_root and not Path(section.artifact_root).is_absolute():
        update["artifact_root"] = str(Path(root) / section.artifact_root)
    return params.model_copy(update={"mlflow": section.model_copy(update=update)})


def experiment_name(params: Params, stage: str) -> str:
    return f"{params.mlflow.experiment_prefix}-{stage}"


def experiment_for(params: Params, stage: str) -> str:
    """Create (in the driver, before any Ray worker asks) and return the stage's experiment."""
    uri = tracking_uri(params)
    name = experiment_name(params, stage)
    with _environment_kept(("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")):
        mlflow.set_tracking_uri(uri)
        if mlflow.get_experiment_by_name(name) is None:
            root = params.mlflow.artifact_root
            if "://" in root:
                location = f"{root.rstrip('/')}/{name}"
            elif uri.startswith(("http://", "https://")):
                location = None  # a local folder of this machine means nothing to a server
            else:
                location = f"{Path(root).resolve().as_uri()}/{name}"
            mlflow.create_experiment(name, artifact_location=location)
        mlflow.set_experiment(name)
    return name


@contextmanager
def _environment_kept(names: tuple[str, ...]) -> Iterator[None]:
    """These environment variables as they were before the block. mlflow.set_tracking_uri and
    set_experiment write theirs, and ``MLFLOW_TRACKING_URI`` is the user's override
    (:func:`tracking_uri`): a later stage in the same process with another store must not
    read this one's back as an override."""
    before = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def stage_run(
    params: Params, stage: str, run_name: str | None = None, logged: Mapping[str, Any] | None = None
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run in the stage's experiment with ``logged`` (the resolved config) as params,
    tagged with the DVC experiment it belongs to, if any."""
    experiment_for(params, stage)
    with mlflow.start_run(run_name=run_name or stage) as run:
        tags = dvc_experiment_tags()
        if tags:
            mlflow.set_tags(tags)
        if logged:
            items = list(flatten(logged).items())
            for start in range(0, len(items), 100):  # MLflow's batch limit
                batch = items[start : start + 100]
                mlflow.log_params({k: redacted(k, v)[:500] for k, v in batch})
        yield run


def last_logged_step(client: mlflow.MlflowClient, run_id: str, keys: tuple[str, ...]) -> int:
    """The highest step any of ``keys`` holds in the run (0 if none): a worker group that
    Ray restarted from a checkpoint re-runs later steps, and must not log them twice."""
    steps = [m.step for key in keys for m in client.get_metric_history(run_id, key)]
    return max(steps, default=0)


def _metrics_at(metrics: Mapping[str, float], step: int) -> list[mlflow.entities.Metric]:
    timestamp = int(time.time() * 1000)
    return [mlflow.entities.Metric(k, float(v), timestamp, step) for k, v in metrics.items()]


# MLflow error codes of a store that answered and refused the request (keeping it would not help)
REFUSED = ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST")


class TrackingUnavailable(RuntimeError):
    """The tracking server did not take kept metrics before the end of the run's patience."""


@contextmanager
def _quick_requests() -> Iterator[None]:
    """MLflow's HTTP client without its retries (seven, backing off for minutes): a request
    to a server that is away fails at once, and the caller decides what to do."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    with _environment_kept(tuple(quick)):
        os.environ.update(quick)
        yield


class MetricLog:
    """A run's step metrics, sent to the tracking store as they are made; training never waits
    for it. A batch the store does not take (a server that is down, restarting, unreachable) is
    kept, in order, and sent before the next one once the store answers again. A batch leaves
    the queue only once taken, with the time it was made: nothing is logged twice (MLflow drops
    an identical metric sent again), nothing is lost while the process lives. ``flush``, at the
    end of training, waits for the store to take what is kept."""

    def __init__(self, client: mlflow.MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        self.kept: deque[list[mlflow.entities.Metric]] = deque()
        self.away_since: float | None = None

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.kept.append(_metrics_at(metrics, step))
        self.send()

    def send(self) -> bool:
        """Send what is kept, oldest first; False when the store did not take it all."""
        with _quick_requests():
            while self.kept:
                try:
                    self.client.log_batch(self.run_id, metrics=self.kept[0])
                except Exception as error:  # noqa: BLE001 (unreachable, down, overloaded: later)
                    if getattr(error, "error_code", None) in REFUSED:
                        raise  # the store answered and refused these metrics: not an outage
                    if self.away_since is None:
                        self.away_since = time.monotonic()
                        reason = str(error).splitlines()[0][:200]
                        print(
                            f"[tracking] MLflow did not take the step metrics ({reason}); "
                            "training goes on, they are kept and sent when it answers",
                            flush=True,
                        )
                    return False
                self.kept.popleft()
        if self.away_since is not None:
            away = time.monotonic() - self.away_since
            print(
                f"[tracking] MLflow answers again after {away:.0f} s: kept metrics sent", flush=True
            )
            self.away_since = None
        return True

    def flush(self, patience_s: float = 600.0, every_s: float = 5.0) -> None:
        """Wait until the store took everything kept; TrackingUnavailable after ``patience_s``."""
        deadline = time.monotonic() + patience_s
        while not self.send():
            if time.monotonic() > deadline:
                raise TrackingUnavailable(
                    f"MLflow has not answered for {patience_s:.0f} s: {len(self.kept)} batches "
                    f"of step metrics of run {self.run_id} could not be logged"
                )
            time.sleep(every_s)


def record_placement(placement: list[dict[str, Any]], path: Path) -> int:
    """Write where each Ray Train rank ran (``workers.json``), tag the active run with the
    distinct node ids and log it; returns the number of nodes."""
    nodes = sorted({worker["node_id"] for worker in placement})
    path.write_text(json.dumps(placement, indent=1))
    mlflow.set_tag("ray.worker_nodes", ",".join(nodes))
    mlflow.log_metric("ray_worker_nodes", len(nodes))
    mlflow.log_artifact(str(path))
    return len(nodes)


def champion_version(params: Params) -> Any | None:
    """The registered model's version holding ``@champion`` (an MLflow ``ModelVersion``), or
    None when no version holds it (or the model is not registered yet)."""
    name = params.mlflow.registered_model
    client = mlflow.MlflowClient(tracking_uri(params))
    models = client.search_registered_models(f"name = '{name}'")
    version = models[0].aliases.get("champion") if models else None
    return None if version is None else client.get_model_version(name, str(version))
