"""Ray runtime for a stage: attach to the job's cluster, or start a local instance."""

from __future__ import annotations

import os

import ray

from .config import Params


def ensure_ray(params: Params) -> None:
    """Inside a submitted Ray job (``RAY_ADDRESS`` set by the job) attach to its cluster;
    otherwise start a private local instance. ``address="local"`` never attaches to a stale
    cluster that a killed head left behind in /tmp/ray."""
    if ray.is_initialized():
        return
    quiet = {"log_to_driver": True, "include_dashboard": False, "configure_logging": False}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=params.ray.num_cpus, **quiet)
