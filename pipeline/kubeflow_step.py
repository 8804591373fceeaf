"""What a Kubeflow step (``pipeline/kubeflow.py``) runs its command with. Kept apart from the
pipeline definition: a step imports it inside kfp's executor, where importing kfp's compiler
again would be circular."""

from __future__ import annotations

import os
from urllib.parse import urlsplit


def decision_of(returncode: int) -> str:
    """The input check's decision from ``python -m components.platform.lineage``'s exit code."""
    from components.platform.lineage import EXIT_CODES

    decisions = {code: decision for decision, code in EXIT_CODES.items()}
    if returncode not in decisions:
        raise RuntimeError(f"the input check failed with exit code {returncode}")
    return decisions[returncode]


def stage_arguments(stage: str, variant: str, decision: str, params_path: str) -> list[str] | None:
    """The stage's arguments after ``--params`` for this run's decision, or None when the step
    has nothing to do: on ``update`` pre-training warm-starts SISTA from @champion and keeps
    the baselines of the last run unless ``retrain.baselines``."""
    arguments = ["--variant", variant] if variant else []
    if stage != "pretrain" or decision != "update":
        return arguments
    if variant == "sista":
        return [*arguments, "--warm-start"]
    from components.platform.config import load_params

    return arguments if load_params(params_path).retrain.baselines else None


def step_environment(ray_address: str, mlflow_tracking_uri: str) -> dict[str, str]:
    """The environment of a step's command. A step holds Ray's token and MLflow's login: it
    sends them only to services of the ``sista`` namespace (or this pod), whatever address a
    run's parameters name; an empty address means a local Ray instance / the params' store."""
    for name, url in (("ray_address", ray_address), ("mlflow_tracking_uri", mlflow_tracking_uri)):
        host = urlsplit(url).hostname or ""  # none for a local store (sqlite:///...)
        if host and not (
            host.endswith(".sista.svc.cluster.local") or host in ("127.0.0.1", "localhost")
        ):
            raise ValueError(f"{name}: {host!r} is not a service of the sista namespace")
    environment = dict(os.environ)
    for name, value in (("RAY_ADDRESS", ray_address), ("MLFLOW_TRACKING_URI", mlflow_tracking_uri)):
        if value:
            environment[name] = value
        else:
            environment.pop(name, None)
    return environment
