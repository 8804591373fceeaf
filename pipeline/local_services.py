"""The services a cluster run talks to, as real server processes on 127.0.0.1: an S3 API
(moto's server) and an MLflow tracking server with a SQLite database. For demos and tests;
production points the same settings at AWS S3 (or MinIO) and a shared MLflow server.

Each is stopped by the process id it started (and that process's children).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from components.platform.ports import HOST, PortTaken, says_address_in_use, start_on_free_port

from .local_cluster import stop_processes

# Fake credentials for the local S3 server: moto accepts any unless IAM checks are on.
LOCAL_S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIALOCALS3TESTKEY00",
    "AWS_SECRET_ACCESS_KEY": "local-s3-secret-not-a-real-one",
}


def _executable(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def stop_process_tree(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM ``process`` and its descendants, SIGKILL what outlives ``grace_s``."""
    try:
        root = psutil.Process(process.pid)
        stop_processes([root.pid, *(child.pid for child in root.children(recursive=True))], grace_s)
    except psutil.NoSuchProcess:
        pass
    process.wait(timeout=grace_s)


def _listening_ports(process: subprocess.Popen) -> set[int]:
    """The TCP ports ``process`` or one of its descendants listens on."""
    try:
        root = psutil.Process(process.pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    ports = set()
    for member in family:
        try:
            connections = member.net_connections(kind="tcp")
        except psutil.Error:
            continue
        ports |= {c.laddr.port for c in connections if c.status == psutil.CONN_LISTEN}
    return ports


def wait_until_up(
    url: str, port: int, process: subprocess.Popen, log: Path, timeout_s: float
) -> None:
    """Until ``url`` answers from ``process`` itself: another process that took ``port`` first
    may answer the same URL, so the port must be one that ``process`` listens on. A process
    that exits because the port was taken raises ``PortTaken``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            output = log.read_text(errors="replace")[-2000:]
            failure = PortTaken if says_address_in_use(output) else RuntimeError
            raise failure(f"{process.args[0]} exited with {process.returncode}: {output}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                if port in _listening_ports(process):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{process.args[0]} did not answer at {url} after {timeout_s} s")
        time.sleep(0.5)


def serve_on_free_port(
    command_for: Callable[[int], list[str]],
    health_path: str,
    log: Path,
    what: str,
    timeout_s: float,
    **popen: Any,
) -> tuple[subprocess.Popen, int]:
    """Start the server process ``command_for(port)`` (output to ``log``) on a port the OS
    offers, until ``health_path`` answers from it; on a port another process took first, again
    on a fresh one. Returns the process and its port."""

    def start(port: int) -> tuple[subprocess.Popen, int]:
        return serve_on(port, command_for, health_path, log, timeout_s, **popen), port

    return start_on_free_port(start, what)


def serve_on(
    port: int,
    command_for: Callable[[int], list[str]],
    health_path: str,
    log: Path,
    timeout_s: float,
    append: bool = False,
    **popen: Any,
) -> subprocess.Popen:
    """Start the server process ``command_for(port)`` (its output to ``log``, after what is
    there when ``append``) and wait until ``health_path`` answers from ``port``."""
    with open(log, "ab" if append else "wb") as output:
        process = subprocess.Popen(
            command_for(port),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **popen,
        )
    try:
        wait_until_up(f"http://{HOST}:{port}{health_path}", port, process, log, timeout_s)
    except BaseException:
        stop_process_tree(process)
        raise
    return process


@dataclass
class S3Server:
    """moto's S3 server (``moto_server``) on 127.0.0.1; ``env`` is what a client needs."""

    buckets: tuple[str, ...] = ("sista",)
    port: int = field(default=0, init=False)  # chosen by start()
    process: subprocess.Popen | None = field(default=None, init=False)
    log: Path = field(init=False)

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            **LOCAL_S3_CREDENTIALS,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",  # never ask 169.254.169.254
            "NO_PROXY": HOST,
        }

    def start(self, timeout_s: float = 60.0) -> S3Server:
        self.log = Path(tempfile.mkstemp(prefix="sista-s3-", suffix=".log")[1])
        self.process, self.port = serve_on_free_port(
            lambda port: [_executable("moto_server"), "-H", HOST, "-p", str(port)],
            "/moto-api/",
            self.log,
            "S3 server",
            timeout_s,
        )
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=LOCAL_S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=LOCAL_S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )
        for bucket in self.buckets:
            client.create_bucket(Bucket=bucket)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process_tree(self.process)
            self.process = None
        self.log.unlink(missing_ok=True)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *_) -> None:
        self.stop()


@dataclass
class MLflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite database in ``folder`` and artifacts
    proxied to ``artifacts`` (an ``s3://`` URI, or a local folder). One worker process and no
    job runner: it is a small server for one machine's runs. ``env`` is added to the
    server's environment (S3 endpoint and credentials for an S3 artifact store)."""

    folder: Path
    artifacts: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default=0, init=False)  # chosen by start()
    process: subprocess.Popen | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def command(self, port: int) -> list[str]:
        return [
            _executable("mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{Path(self.folder).resolve() / 'mlflow.db'}",
            "--artifacts-destination",
            self.artifacts or str(Path(self.folder).resolve() / "mlartifacts"),
            "--host",
            HOST,
            "--port",
            str(port),
            "--workers",
            "1",
        ]

    def start(self, timeout_s: float = 120.0) -> MLflowServer:
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        self.process, self.port = serve_on_free_port(
            self.command,
            "/health",
            Path(self.folder) / "mlflow-server.log",
            "MLflow server",
            timeout_s,
            env=self._environment(),
            cwd=self.folder,
        )
        return self

    def restart(self, timeout_s: float = 120.0) -> MLflowServer:
        """Start the stopped server again on its port, with its store: clients keep its URL."""
        self.stop()
        self.process = serve_on(
            self.port,
            self.command,
            "/health",
            Path(self.folder) / "mlflow-server.log",
            timeout_s,
            append=True,
            env=self._environment(),
            cwd=self.folder,
        )
        return self

    def _environment(self) -> dict[str, str]:
        return {**os.environ, **self.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

    def stop(self) -> None:
        if self.process is not None:
            stop_process_tree(self.process)
            self.process = None

    def __enter__(self) -> MLflowServer:
        return self.start()

    def __exit__(self, *_) -> None:
        self.stop()
