"""The watch that stops pre-training when a Ray node it needs is lost: the block is
interrupted at once and the error names the node; a loss that leaves enough nodes, or a block
that ends first, is left alone."""

import time

import pytest

from components.platform import runtime
from components.platform.runtime import NodeLost, stop_when_nodes_are_lost


@pytest.fixture
def nodes(monkeypatch):
    cluster = [
        {"NodeID": "a1" * 14, "NodeManagerAddress": "127.0.0.2", "Alive": True},
        {"NodeID": "b2" * 14, "NodeManagerAddress": "127.0.0.3", "Alive": True},
        {"NodeID": "c3" * 14, "NodeManagerAddress": "127.0.0.4", "Alive": True},
    ]
    monkeypatch.setattr(runtime.ray, "nodes", lambda: [dict(node) for node in cluster])
    return cluster


def test_a_lost_node_interrupts_the_block_and_is_named(nodes):
    nodes[2]["Alive"] = False  # not there at the start: never counted as lost
    started = time.monotonic()
    with pytest.raises(NodeLost) as error:
        with stop_when_nodes_are_lost(2, "STRICT_SPREAD", "rerun it", interval_s=0.05):
            nodes[1]["Alive"] = False
            while time.monotonic() - started < 10:  # a trainer.fit() that would wait for ever
                time.sleep(0.01)
    assert time.monotonic() - started < 5
    assert str(error.value) == (
        "Ray node b2b2b2b2 (127.0.0.3) was lost: STRICT_SPREAD needs 2 nodes, 1 left; rerun it"
    )


def test_a_loss_that_leaves_enough_nodes_or_a_block_that_ends_first_is_left_alone(nodes):
    with stop_when_nodes_are_lost(2, "STRICT_SPREAD", "rerun it", interval_s=0.05):
        nodes[2]["Alive"] = False  # two of the three are left: the placement still fits
        time.sleep(0.5)
    with stop_when_nodes_are_lost(3, "STRICT_SPREAD", "rerun it", interval_s=0.05):
        pass
    nodes[0]["Alive"] = False  # after the block: nothing is interrupted
    time.sleep(0.3)


def test_another_error_in_the_block_is_raised_as_it_is(nodes):
    with pytest.raises(ValueError, match="bad batch"):
        with stop_when_nodes_are_lost(2, "STRICT_SPREAD", "rerun it", interval_s=0.05):
            raise ValueError("bad batch")


def test_a_run_that_fails_because_its_node_died_names_the_node(nodes):
    """Ray Train may give up on the lost worker before the watch's next look."""
    with pytest.raises(NodeLost, match=r"Ray node a1a1a1a1 \(127.0.0.2\) was lost"):
        with stop_when_nodes_are_lost(3, "STRICT_SPREAD", "rerun it", interval_s=60):
            nodes[0]["Alive"] = False
            raise RuntimeError("worker group failed")


@pytest.mark.slow
def test_a_ray_get_waiting_on_a_run_that_cannot_go_on_is_interrupted(monkeypatch):
    """trainer.fit() waits in ray.get, which lets only a KeyboardInterrupt out of a signal
    handler: the watch must get through it (a real local Ray, the node loss simulated)."""
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        cluster = [
            {"NodeID": "a1" * 14, "NodeManagerAddress": "127.0.0.2", "Alive": True},
            {"NodeID": "b2" * 14, "NodeManagerAddress": "127.0.0.3", "Alive": True},
        ]
        monkeypatch.setattr(runtime.ray, "nodes", lambda: [dict(node) for node in cluster])
        never_done = ray.remote(lambda: time.sleep(120)).remote()
        started = time.monotonic()
        with pytest.raises(NodeLost, match=r"b2b2b2b2 \(127.0.0.3\) was lost"):
            with stop_when_nodes_are_lost(2, "STRICT_SPREAD", "rerun it", interval_s=0.2):
                cluster[1]["Alive"] = False
                ray.get(never_done)
        assert time.monotonic() - started < 30
    finally:
        ray.shutdown()
