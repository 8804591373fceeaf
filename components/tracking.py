"""MLflow: one experiment per stage, the resolved config logged as params (secrets masked).

The store is ``MLFLOW_TRACKING_URI`` (a tracking server, ``http://host:5000``) or
``mlflow.tracking_uri`` (SQLite by default). Artifacts go to ``mlflow.artifact_root`` when it
is a URI (``s3://bucket/prefix``: MLflow's boto3 honours ``MLFLOW_S3_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_S3``); with a server and a local root, the server's own artifact store.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow

from .config import Params, tracking_uri
from .secrets import redacted


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


def experiment_for(params: Params, stage: str) -> str:
    """Create (in the driver, before any Ray worker asks) and return the stage's experiment."""
    uri = tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    name = f"{params.mlflow.experiment_prefix}-{stage}"
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
def stage_run(
    params: Params, stage: str, run_name: str | None = None, logged: Mapping[str, Any] | None = None
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run in the stage's experiment with ``logged`` (the resolved config) as params."""
    experiment_for(params, stage)
    with mlflow.start_run(run_name=run_name or stage) as run:
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


def log_metrics_at(
    client: mlflow.MlflowClient, run_id: str, metrics: Mapping[str, float], step: int
) -> None:
    """Log ``metrics`` at ``step`` in one request."""
    timestamp = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[mlflow.entities.Metric(k, float(v), timestamp, step) for k, v in metrics.items()],
    )


def record_placement(placement: list[dict[str, Any]], path: Path) -> int:
    """Write where each Ray Train rank ran (``workers.json``), tag the active run with the
    distinct node ids and log it; returns the number of nodes."""
    nodes = sorted({worker["node_id"] for worker in placement})
    path.write_text(json.dumps(placement, indent=1))
    mlflow.set_tag("ray.worker_nodes", ",".join(nodes))
    mlflow.log_metric("ray_worker_nodes", len(nodes))
    mlflow.log_artifact(str(path))
    return len(nodes)
