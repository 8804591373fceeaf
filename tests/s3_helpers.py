"""S3 for tests: moto's server on 127.0.0.1 only, fake credentials, and nothing else reachable.

``MotoProcess`` runs the server as its own process, so a test can kill it (SIGKILL: the
endpoint refuses connections), start it again on the same port with the same objects (what
a real S3 keeps across an endpoint restart), or freeze it (SIGSTOP: requests hang).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SECRET = "fake-secret-never-in-logs"
KEY_ID = "AKIAFAKEFAKEFAKE0000"
# Variables that could point boto3 at another endpoint, account or proxy.
AWS_VARIABLES_REMOVED = (
    "AWS_ENDPOINT_URL",
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "http_proxy",
    "https_proxy",
)


def start_moto(port: int = 0):
    """moto's threaded server on 127.0.0.1: on ``port``, or (0) on a port it binds itself and
    reports, so no other process can take it between a choice and the bind."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, server.get_host_and_port()[1]


def aws_variables(endpoint: str, folder: Path, credentials: bool = True) -> dict[str, str]:
    """Environment for boto3: the local endpoint, no config files, no instance metadata
    (169.254.169.254), and fake credentials unless ``credentials`` is False."""
    variables = {
        "NO_PROXY": "127.0.0.1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(folder / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(folder / "no-aws-credentials"),
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    if credentials:
        variables |= {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
    return variables


def set_aws_variables(monkeypatch, endpoint: str, folder: Path, credentials: bool = True) -> None:
    """``aws_variables`` applied to this process for one test."""
    for name in (*AWS_VARIABLES_REMOVED, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in aws_variables(endpoint, folder, credentials).items():
        monkeypatch.setenv(name, value)


def subprocess_environment(endpoint: str, folder: Path, credentials: bool = True) -> dict:
    """This process's environment with ``aws_variables`` instead of any AWS settings."""
    removed = (*AWS_VARIABLES_REMOVED, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    environment = {k: v for k, v in os.environ.items() if k not in removed}
    return environment | aws_variables(endpoint, folder, credentials)


class MotoProcess:
    """moto's S3 server in its own process; ``seed`` (a folder of ``BUCKET/KEY`` files) is
    loaded before the port opens, at every start. The first start binds a port the server
    picks itself; later starts reopen that same port (an endpoint that comes back)."""

    def __init__(self, seed: Path) -> None:
        self.seed, self.port = seed, 0
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, str(self.port), str(self.seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            word, _, port = self.process.stdout.readline().strip().partition(" ")
            if word == "ready":
                self.port = int(port)
                return
        raise RuntimeError(f"moto server did not start (port {self.port or 'of its choice'})")

    def kill(self) -> None:
        """SIGKILL: every connection is refused until ``start``."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process.stdout.close()
            self.process = None

    def freeze(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but nothing answers."""
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)


def _serve(port: int, seed: Path) -> None:
    """Entry point of ``MotoProcess``: seed through a private port, then open ``port``."""
    import boto3

    os.environ |= {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
    _, private_port = start_moto()
    client = boto3.client(
        "s3", endpoint_url=f"http://127.0.0.1:{private_port}", region_name="us-east-1"
    )
    for bucket in sorted(p for p in seed.iterdir() if p.is_dir()):
        client.create_bucket(Bucket=bucket.name)
        for path in sorted(p for p in bucket.rglob("*") if p.is_file()):
            client.put_object(
                Bucket=bucket.name, Key=path.relative_to(bucket).as_posix(), Body=path.read_bytes()
            )
    _, port = start_moto(port)
    print(f"ready {port}", flush=True)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nobody reads the pipe from here on
    signal.pause()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), Path(sys.argv[2]))
