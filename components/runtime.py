"""Ray runtime for a stage: attach to the job's cluster, or start a local instance."""

from __future__ import annotations

import os
import socket

import ray

from .config import Params


def ensure_ray(params: Params, dashboard: bool = False) -> None:
    """Inside a submitted Ray job (``RAY_ADDRESS`` set by the job) attach to its cluster;
    otherwise start a private local instance. ``address="local"`` never attaches to a stale
    cluster that a killed head left behind in /tmp/ray.

    ``dashboard=True`` (sweeps) starts the local dashboard on a free loopback port and points
    Ray's processes at it: when a scheduler stops a trial, Ray Train's placement-group
    cleaner asks the State API whether the trial's controller died, and without an address
    it cannot tell this instance from other Ray instances on the machine, so the stopped
    trial's workers' resources would never be freed."""
    if ray.is_initialized():
        own_without_dashboard = not os.environ.get("RAY_ADDRESS") and not os.environ.get(
            "RAY_API_SERVER_ADDRESS"
        )
        if not (dashboard and own_without_dashboard):
            return
        ray.shutdown()  # this process's own instance (earlier stages), started without it
    quiet = {"log_to_driver": True, "include_dashboard": False, "configure_logging": False}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    if dashboard:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"  # inherited by Ray
        quiet.update(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port)
    ray.init(address="local", num_cpus=params.ray.num_cpus, **quiet)
