"""What a Kubeflow step (``pipeline/kubeflow.py``) runs its command with. Kept apart from the
pipeline definition: a step imports it inside kfp's executor, where importing kfp's compiler
again would be circular."""

from __future__ import annotations

import os
from urllib.parse import urlsplit


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
