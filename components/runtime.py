"""Ray runtime for a stage: attach to the job's cluster, or start a local instance; where
a stage's Ray Train workers ran."""

from __future__ import annotations

import os
import socket
from typing import Any

import ray

from .config import Params
from .ports import HOST, start_on_free_port


def ensure_ray(params: Params, dashboard: bool = False) -> None:
    """Inside a submitted Ray job (``RAY_ADDRESS`` set by the job) attach to its cluster;
    otherwise start a private local instance. ``address="local"`` never attaches to a stale
    cluster that a killed head left behind in /tmp/ray.

    ``dashboard=True`` (wherever Ray Train runs: pretrain, sweeps) starts the local dashboard
    on a free loopback port (a fresh one if another process binds it first) and points Ray's
    processes at it. Ray Train's placement-group cleaner asks the State API every second
    whether the training controller died: without the dashboard each ask fails (a warning a
    second in the stage's log) and the workers' resources of a controller that dies, or a
    trial a scheduler stops, are never freed."""
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
    if not dashboard:
        ray.init(address="local", num_cpus=params.ray.num_cpus, **quiet)
        return

    def start_with_dashboard(port: int) -> None:
        # Set before ray.init: Ray's processes inherit it at start.
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://{HOST}:{port}"
        with_dashboard = {"include_dashboard": True, "dashboard_host": HOST, "dashboard_port": port}
        try:
            ray.init(address="local", num_cpus=params.ray.num_cpus, **quiet | with_dashboard)
        except BaseException:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
            ray.shutdown()  # whatever this attempt started
            raise

    start_on_free_port(start_with_dashboard, "Ray dashboard")


def require_nodes(count: int, why: str) -> None:
    """Fail at once, naming the nodes, when the cluster has fewer than ``count`` alive nodes
    (a placement that needs them would otherwise wait for nodes that never come)."""
    alive = [node for node in ray.nodes() if node["Alive"]]
    if len(alive) < count:
        names = ", ".join(f"{n['NodeID'][:8]} ({n['NodeManagerAddress']})" for n in alive)
        raise RuntimeError(
            f"{why} needs {count} Ray nodes, the cluster has {len(alive)}: {names or 'none'}"
        )


def worker_placement() -> list[dict[str, Any]]:
    """Called by every Ray Train worker (collective: all must call it): the Ray node id,
    host and process of each rank, in rank order."""
    import ray.train
    import torch.distributed as dist

    context = ray.train.get_context()
    mine = {
        "rank": context.get_world_rank(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    if not dist.is_available() or not dist.is_initialized():
        return [mine]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return sorted(everyone, key=lambda worker: worker["rank"])


def on_this_node() -> dict[str, Any]:
    """``.options(**on_this_node())``: a Ray task that runs on the calling process's node,
    where the local files it reads are (other nodes do not share the disk)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}


def this_node_resource() -> dict[str, float]:
    """A sliver of this node's ``node:<ip>`` resource: a Tune trial that asks for it is
    placed on this node (with its local files)."""
    return {f"node:{ray.util.get_node_ip_address()}": 0.001}
