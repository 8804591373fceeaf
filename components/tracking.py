"""MLflow: one experiment per stage, the resolved config logged as params."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow

from .config import Params, tracking_uri


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
    mlflow.set_tracking_uri(tracking_uri(params))
    name = f"{params.mlflow.experiment_prefix}-{stage}"
    if mlflow.get_experiment_by_name(name) is None:
        root = params.mlflow.artifact_root
        location = root if "://" in root else Path(root).resolve().as_uri()
        mlflow.create_experiment(name, artifact_location=f"{location}/{name}")
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
                mlflow.log_params({k: str(v)[:500] for k, v in items[start : start + 100]})
        yield run
