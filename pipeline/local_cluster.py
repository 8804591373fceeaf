"""A real multi-node Ray cluster on this machine: a head and worker nodes started with
``ray start``, each on 127.0.0.1 with its own ports, temporary folder and logical CPUs, joined
with token authentication. Stopped by the process ids it started (``ray stop`` would stop
every Ray instance on the machine, other users' too).

    with LocalRayCluster(nodes=2, cpus_per_node=1) as cluster:
        os.environ["RAY_ADDRESS"] = cluster.dashboard_url
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from components.platform.ports import (
    ATTEMPTS,
    HOST,
    PortTaken,
    offered_port,
    retry_when_port_taken,
    says_address_in_use,
)


def stop_processes(pids: Iterable[int], grace_s: float = 15.0) -> None:
    """SIGTERM these processes, SIGKILL those still alive after ``grace_s``."""
    processes = []
    for pid in pids:
        try:
            processes.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    for signal_, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, grace_s)):
        for process in processes:
            try:
                process.send_signal(signal_)
            except psutil.NoSuchProcess:
                pass
        _, processes = psutil.wait_procs(processes, timeout=wait)
        if not processes:
            return


def node_ip(index: int) -> str:
    """Node ``index``'s address: 127.0.0.2, 127.0.0.3, ... (loopback). Not 127.0.0.1: on
    Linux Ray replaces a literal 127.0.0.1 / localhost node or cluster address with the
    machine's routed address (``resolve_ip_for_localhost``), which is not loopback."""
    return f"127.0.0.{2 + index}"


def ray_executable() -> str:
    """``ray`` of this interpreter's environment (not whatever is first on PATH)."""
    return str(Path(sys.executable).with_name("ray"))


LOG_HEAD_BYTES = 256 << 10  # where a node's start-up errors are


@dataclass
class RayNode:
    name: str
    process: subprocess.Popen
    temp_dir: Path
    log: Path

    def pids(self) -> set[int]:
        """This node's processes: ``ray start`` and its descendants, and any process whose
        command line names this node's own temporary folder (Ray daemons, workers)."""
        found: set[int] = set()
        try:
            root = psutil.Process(self.process.pid)
            found |= {root.pid, *(child.pid for child in root.children(recursive=True))}
        except psutil.NoSuchProcess:
            pass
        marker = str(self.temp_dir)
        for process in psutil.process_iter(["pid", "cmdline"]):
            if any(marker in part for part in process.info["cmdline"] or ()):
                found.add(process.info["pid"])
        return found - {os.getpid()}

    def lost_port_race(self) -> bool:
        """Did one of this node's processes fail because its port was taken (by another
        process that bound it between the offer and Ray's bind)? Its ``ray start`` output and
        its Ray processes' logs say so, near their start (a raylet that cannot bind dies,
        while ``ray start --block`` may stay up)."""
        for path in [self.log, *self.temp_dir.glob("session_*/logs/*")]:
            try:
                with open(path, "rb") as log:
                    start = log.read(LOG_HEAD_BYTES).decode(errors="replace")
            except OSError:  # a folder, or a log rotated away
                continue
            if says_address_in_use(start):
                return True
        return False


@dataclass
class LocalRayCluster:
    """``nodes`` Ray nodes (the first is the head) with ``cpus_per_node`` logical CPUs and a
    custom resource ``sista_node_<i>`` each. ``env`` is added to the nodes' environment
    (what their workers inherit: e.g. S3 credentials, as an instance role would give)."""

    nodes: int = 2
    cpus_per_node: int = 1
    object_store_mb: int = 256
    env: dict[str, str] = field(default_factory=dict)
    start_timeout_s: float = 600.0  # a node takes ~1 min on a busy 2-core machine
    started: list[RayNode] = field(default_factory=list, init=False)
    root: Path = field(init=False)
    gcs_address: str = field(init=False, default="")
    dashboard_url: str = field(init=False, default="")
    token_path: Path = field(init=False)

    def __post_init__(self) -> None:
        # Short: Ray's unix sockets live below it and their paths are limited to 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="sista-ray-"))
        self.token_path = self.root / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)

    @property
    def client_env(self) -> dict[str, str]:
        """What a process needs to submit jobs to this cluster."""
        return {
            "RAY_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
        }

    def _node_env(self) -> dict[str, str]:
        # RAY_ADDRESS: Ray's own helpers in the nodes' processes (Ray Train's placement
        # group cleaner, the state API) find this cluster, not another one on the machine.
        # A loaded machine can take minutes to register a raylet (the default wait is 60 s).
        return {
            **os.environ,
            **self.env,
            **self.client_env,
            "RAY_ADDRESS": self.gcs_address,
            "RAY_raylet_start_wait_time_s": str(int(self.start_timeout_s)),
        }

    def _start_node(self, index: int) -> RayNode:
        name = "head" if index == 0 else f"worker{index}"
        # A folder of its own per start: a restarted node never reads a failed start's logs.
        # (Short: Ray's socket paths below it are limited to 107 bytes.)
        temp_dir = Path(tempfile.mkdtemp(prefix=f"{index}.", dir=self.root))
        ports = {
            "--node-manager-port": offered_port(),
            "--object-manager-port": offered_port(),
            "--runtime-env-agent-port": offered_port(),
            "--dashboard-agent-listen-port": offered_port(),
            "--dashboard-agent-grpc-port": offered_port(),
            "--metrics-export-port": offered_port(),
        }
        command = [
            ray_executable(),
            "start",
            "--block",
            f"--node-ip-address={node_ip(index)}",
            f"--num-cpus={self.cpus_per_node}",
            "--num-gpus=0",
            f"--resources={json.dumps({f'sista_node_{index}': 1})}",
            f"--object-store-memory={self.object_store_mb << 20}",
            f"--temp-dir={temp_dir}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--disable-usage-stats",
            *(f"{flag}={port}" for flag, port in ports.items()),
        ]
        if index == 0:
            gcs_port, dashboard_port = offered_port(), offered_port()
            self.gcs_address = f"{node_ip(0)}:{gcs_port}"
            self.dashboard_url = f"http://{HOST}:{dashboard_port}"
            command += [
                "--head",
                f"--port={gcs_port}",
                "--include-dashboard=true",
                f"--dashboard-host={HOST}",
                f"--dashboard-port={dashboard_port}",
                f"--ray-client-server-port={offered_port()}",
            ]
        else:
            command += [f"--address={self.gcs_address}"]
        log = self.root / f"{temp_dir.name}.{name}.log"
        with open(log, "wb") as output:
            process = subprocess.Popen(
                command,
                env={
                    **self._node_env(),
                    # Ray's metrics servers default to fixed ports (44217, 44227): another
                    # Ray instance on the machine holds them, so each node gets its own.
                    "AUTOSCALER_METRIC_PORT": str(offered_port()),
                    "DASHBOARD_METRIC_PORT": str(offered_port()),
                },
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of the caller does not reach the nodes
            )
        node = RayNode(name, process, temp_dir, log)
        self.started.append(node)
        return node

    def start(self) -> LocalRayCluster:
        """The head, then (once it serves jobs) every worker node at once; returns when all
        nodes are alive and the job server answers. A node whose port another process took
        first is started again on fresh ports."""
        try:
            retry_when_port_taken(self._start_head, "Ray head node")
            for index in range(1, self.nodes):
                self._start_node(index)
            self.wait_for_nodes(self.nodes, restarts=ATTEMPTS)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_head(self) -> RayNode:
        head = self._start_node(0)
        try:
            self._wait_for_gcs(head)
            self.wait_for_nodes(1)
            self._wait_for_job_server()
        except BaseException:
            self.stop_node(head)
            raise
        return head

    def _wait_for_gcs(self, head: RayNode) -> None:
        host, port = self.gcs_address.rsplit(":", 1)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if head.lost_port_race():
                raise PortTaken(f"a port of the head was taken: {head.log.read_text()[-2000:]}")
            if head.process.poll() is not None:
                raise RuntimeError(f"ray start of the head exited: {head.log.read_text()[-2000:]}")
            try:
                socket.create_connection((host, int(port)), timeout=2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no GCS at {self.gcs_address}") from None
                time.sleep(0.5)

    def _get(self, path: str) -> dict:
        """GET a dashboard endpoint with this cluster's token."""
        request = urllib.request.Request(
            f"{self.dashboard_url}{path}",
            headers={"Authorization": f"Bearer {self.token_path.read_text()}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def alive_nodes(self) -> list[dict]:
        """The alive nodes as the head's state API lists them (``node_id``, ``node_ip``,
        ``resources_total``, ...)."""
        listing = self._get("/api/v0/nodes?limit=100&detail=true")
        rows = listing["data"]["result"]["result"]
        return [row for row in rows if row["state"] == "ALIVE"]

    def wait_for_nodes(self, count: int, restarts: int = 0) -> None:
        """Until exactly ``count`` nodes are alive (a node that joined, or one that was
        stopped and whose death the head has noticed); a ``ray start`` that exits early
        fails at once, unless it lost a port race and ``restarts`` are left: then that node
        starts again on fresh ports."""
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                alive = len(self.alive_nodes())
                if alive == count:
                    return
            except Exception as error:  # noqa: BLE001 - the dashboard is still starting
                alive = f"unknown ({error})"
            # Still waiting: has a node failed (its logs are read only now, not once ready)?
            for node in list(self.started):
                lost_port = node.lost_port_race()
                if node.process.poll() is None and not lost_port:
                    continue
                if lost_port and restarts and node.name != "head":
                    restarts -= 1
                    print(f"[cluster] {node.name}: a port was taken; restarting it on fresh ports")
                    self.stop_node(node)
                    self._start_node(int(node.name.removeprefix("worker")))
                    continue
                failure = PortTaken if lost_port else RuntimeError
                raise failure(
                    f"the {node.name} node failed (ray start exit code {node.process.poll()}): "
                    f"{node.log.read_text(errors='replace')[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{alive} alive Ray nodes, not {count}, after {self.start_timeout_s} s"
                )
            time.sleep(1)

    def _wait_for_job_server(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                self._get("/api/version")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no job server at {self.dashboard_url}") from None
                time.sleep(1)

    def stop_node(self, node: RayNode, grace_s: float = 15.0) -> None:
        """SIGTERM every process of this node, SIGKILL what is left after ``grace_s``."""
        stop_processes(node.pids(), grace_s)
        node.process.wait(timeout=grace_s)
        self.started.remove(node)

    def restart_node(self, node: RayNode) -> RayNode:
        """Stop what is left of worker ``node`` (after a crash, say) and start it again on
        fresh ports; returns once the cluster has all its nodes."""
        if node in self.started:
            self.stop_node(node)
        again = self._start_node(int(node.name.removeprefix("worker")))
        self.wait_for_nodes(self.nodes, restarts=ATTEMPTS)
        return again

    def stop(self) -> None:
        """Stop the workers, then the head; remove the temporary folder."""
        for node in reversed(list(self.started)):
            self.stop_node(node)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *_) -> None:
        self.stop()
