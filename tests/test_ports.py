"""Services start even when another process takes the port they were offered: the port
race of choosing a free port and binding it later is lost on purpose here, by holding the
first port offered open."""

import errno
import os
import socket
import urllib.request
from collections.abc import Iterator

import pytest
import ray

from components.platform import ports
from components.platform.config import Params
from components.platform.ports import HOST, PortTaken, lost_port_race, start_on_free_port


@pytest.fixture
def first_port_taken(monkeypatch) -> Iterator[int]:
    """The first port offered is one another process listens on (the race, lost); every
    later offer is a genuinely free port."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    real_offer = ports.offered_port
    offers: list[int] = []

    def offer(host: str = ports.HOST) -> int:
        offers.append(taken if not offers else real_offer(host))
        return offers[-1]

    monkeypatch.setattr(ports, "offered_port", offer)
    monkeypatch.setattr("pipeline.local_cluster.offered_port", offer)
    yield taken
    holder.close()
    assert offers and offers[0] == taken, "the service never asked for a port"


def test_bind_errors_of_every_kind_count_as_a_lost_race():
    assert lost_port_race(OSError(errno.EADDRINUSE, "Address already in use"))
    wrapped = RuntimeError("mlflow exited with 1: [Errno 98] error while attempting to bind")
    assert lost_port_race(wrapped)
    try:
        try:
            raise OSError(errno.EADDRINUSE, "in use")
        except OSError as cause:
            raise RuntimeError("the service did not start") from cause
    except RuntimeError as chained:
        assert lost_port_race(chained)
    assert not lost_port_race(RuntimeError("database is locked"))
    assert not lost_port_race(OSError(errno.ECONNREFUSED, "Connection refused"))


def test_a_lost_race_retries_on_a_fresh_port_and_other_errors_propagate():
    tried: list[int] = []

    def start(port: int) -> int:
        tried.append(port)
        if len(tried) == 1:
            raise PortTaken(f"port {port} is taken")
        return port

    assert start_on_free_port(start, "test service") == tried[-1]
    assert len(tried) == 2

    def broken(port: int) -> int:
        raise ValueError("bad configuration")

    with pytest.raises(ValueError, match="bad configuration"):
        start_on_free_port(broken, "test service")


def test_a_race_lost_every_time_gives_up_with_the_bind_error():
    def always_taken(port: int) -> None:
        raise OSError(errno.EADDRINUSE, f"port {port}: Address already in use")

    with pytest.raises(OSError, match="Address already in use"):
        start_on_free_port(always_taken, "test service", attempts=3)


@pytest.mark.slow
def test_the_s3_server_starts_when_its_first_port_is_taken(first_port_taken):
    from pipeline.local_services import S3Server

    with S3Server(buckets=("sista",)) as server:
        assert server.port != first_port_taken
        with urllib.request.urlopen(f"{server.endpoint}/moto-api/", timeout=10) as answer:
            assert answer.status == 200


@pytest.mark.slow
def test_the_mlflow_server_starts_when_its_first_port_is_taken(first_port_taken, tmp_path):
    from pipeline.local_services import MLflowServer

    with MLflowServer(tmp_path / "mlflow") as server:
        assert server.port != first_port_taken
        with urllib.request.urlopen(f"{server.url}/health", timeout=10) as answer:
            assert answer.status == 200


@pytest.mark.slow
def test_the_ray_dashboard_starts_when_its_first_port_is_taken(first_port_taken, monkeypatch):
    from components.platform.runtime import ensure_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    try:
        ensure_ray(Params.model_validate({"ray": {"num_cpus": 1}}), dashboard=True)
        assert os.environ["RAY_API_SERVER_ADDRESS"] != f"http://127.0.0.1:{first_port_taken}"
        # The State API that Ray Train's placement-group cleaner asks, at that address.
        from ray.util.state import list_nodes

        assert len(list_nodes(timeout=30)) == 1
    finally:
        ray.shutdown()
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)


@pytest.mark.cluster
@pytest.mark.system
def test_a_ray_head_node_starts_when_its_first_port_is_taken(first_port_taken):
    """Also beside another Ray instance: its metrics servers hold Ray's fixed default ports
    (44217, 44227), which a node must not reach for (a failed bind there reads as a lost race)."""
    from pipeline.local_cluster import LocalRayCluster

    holders = []
    for port in (44217, 44227):  # held here, unless another Ray instance holds them already
        holder = socket.socket()
        try:
            holder.bind((HOST, port))
            holder.listen()
            holders.append(holder)
        except OSError:
            holder.close()
    try:
        with LocalRayCluster(nodes=1, cpus_per_node=1) as cluster:
            assert len(cluster.alive_nodes()) == 1
            assert str(first_port_taken) not in cluster.dashboard_url
            assert not cluster.started[0].lost_port_race()
    finally:
        for holder in holders:
            holder.close()
