"""Ray runtime for a stage: attach to the job's cluster, or start a local instance; where
a stage's Ray Train workers ran."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray

from components.platform.config import Params, StageStopped
from components.platform.ports import HOST, start_on_free_port


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
    alive = list(_alive_nodes().values())
    if len(alive) < count:
        names = _named(alive)
        raise RuntimeError(
            f"{why} needs {count} Ray nodes, the cluster has {len(alive)}: {names or 'none'}"
        )


class NodeLost(StageStopped):
    """Ray nodes died while a placement that needs them ran, and too few are left."""


def _alive_nodes() -> dict[str, dict[str, Any]]:
    return {node["NodeID"]: node for node in ray.nodes() if node["Alive"]}


def _named(nodes: list[dict[str, Any]]) -> str:
    return ", ".join(f"{n['NodeID'][:8]} ({n['NodeManagerAddress']})" for n in nodes)


@contextmanager
def stop_when_nodes_are_lost(
    needed: int, why: str, then: str, interval_s: float = 2.0
) -> Iterator[None]:
    """Run the block (a ``trainer.fit()`` in the main thread) while a thread watches the
    cluster's nodes. When a node that was alive at the start dies and fewer than ``needed``
    are left, the block is interrupted and :class:`NodeLost` names the lost nodes; ``then``
    says what to do next. Without it, a placement that needs the lost node waits for ever:
    Ray Train retries a worker group that cannot start without limit, and its own Ctrl-C
    abort waits behind that retry. The interrupt is a signal (SIGUSR1) whose handler raises
    KeyboardInterrupt: a blocking ``ray.get`` runs signal handlers while it waits and lets
    that one through. The training run's actors go with the stage's process, which owns
    them."""
    if threading.current_thread() is not threading.main_thread():  # signals reach only it
        yield
        return
    at_start = _alive_nodes()
    lost: list[dict[str, Any]] = []
    left: list[int] = []
    finished = threading.Event()

    def too_few_left() -> bool:
        try:
            alive = _alive_nodes()
        except Exception:  # noqa: BLE001 - the GCS did not answer this time; ask again
            return False
        gone = [node for node_id, node in at_start.items() if node_id not in alive]
        if gone and len(alive) < needed and not lost:
            lost.extend(gone)
            left.append(len(alive))
        return bool(lost)

    def interrupted(signum: int, frame: Any) -> None:
        # KeyboardInterrupt: the one exception a waiting ray.get lets through (it swallows
        # others raised by signal handlers); turned into NodeLost below.
        raise KeyboardInterrupt

    def watch() -> None:
        while not finished.wait(interval_s):
            if too_few_left() and not finished.is_set():
                os.kill(os.getpid(), signal.SIGUSR1)
                return

    def failure() -> NodeLost:
        return NodeLost(
            f"Ray node {_named(lost)} was lost: {why} needs {needed} nodes, {left[0]} left; {then}"
        )

    previous = signal.signal(signal.SIGUSR1, interrupted)
    watcher = threading.Thread(target=watch, name="node-watch", daemon=True)
    watcher.start()
    try:
        yield
    except BaseException:
        finished.set()
        if lost or too_few_left():  # Ray Train may give up on the lost worker first
            raise failure() from None
        raise
    finally:
        finished.set()
        watcher.join()
        signal.signal(signal.SIGUSR1, previous)
    if lost:
        raise failure()


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
