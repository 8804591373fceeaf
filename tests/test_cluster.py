"""Cluster mode for real: a Ray head and a second Ray node started with `ray start` on this
machine (loopback addresses, 1 CPU each, token auth), the CI-profile stages submitted to it
as Ray jobs by the launcher with stage folders on S3 (moto's server process) and MLflow as a
server. Pre-training asks for one worker per node (STRICT_SPREAD), so it cannot run, and
this test cannot pass, without the second node. `make cluster-demo` runs the whole pipeline
the same way; this test stops after pre-training to stay within a few minutes on 2 cores."""

import json

import psutil
import pytest

from components import storage
from pipeline.cluster_demo import (
    STORAGE_URI,
    ClusterRun,
    pretraining_evidence,
    run_name,
    stages_through,
    start_services,
    write_params,
)

# A few minutes on a quiet 2-core machine; a loaded one can take several times that.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.system,
    pytest.mark.cluster,
    pytest.mark.timeout(2400),
]
STAGES = [*stages_through("similarity"), ("pretrain", "--variant", "sista")]


@pytest.fixture(scope="module")
def cluster_run(s3_server, tmp_path_factory):
    work = tmp_path_factory.mktemp("cluster")
    write_params(work)
    with start_services(work, s3_server) as (tracking, cluster):
        run = ClusterRun(work, s3_server, tracking, cluster)
        results = {}
        for command in STAGES:
            results[run_name(command)] = result = run.launch(*command)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        pids = set().union(*(node.pids() for node in cluster.started))  # both nodes
        yield run, results
        pids |= set().union(*(node.pids() for node in cluster.started))  # the head's, now
    # Every process of both nodes is gone, stopped by its process id.
    assert pids and not [pid for pid in pids if psutil.pid_exists(pid)]


def test_each_stage_ran_as_a_job_submitted_to_the_cluster(cluster_run):
    run, results = cluster_run
    for name, result in results.items():
        assert f"to {run.cluster.dashboard_url}: " in result.stdout, name
        assert result.stdout.count(": SUCCEEDED") == 1, name


def test_pretraining_workers_ran_on_both_nodes_and_checkpointed_to_s3(cluster_run, s3_env):
    run, _ = cluster_run
    evidence = pretraining_evidence(run, "sista")  # raises naming what is missing
    assert len(evidence["cluster_nodes"]) == 2
    assert evidence["worker_nodes"] == evidence["cluster_nodes"]  # one rank on each node
    assert evidence["checkpoint_example"].startswith(f"{STORAGE_URI}/checkpoints/")
    assert evidence["mlflow_artifact_uri"].startswith("mlflow-artifacts:")


def test_every_stage_output_is_on_s3_and_pulled_back_for_dvc(cluster_run, s3_env):
    run, _ = cluster_run
    for folder in ("ingest", "reports", "similarity", "pretrain/sista"):
        stored = storage.read_bytes(f"{STORAGE_URI}/{folder}/_stage.json")
        assert (run.work / "data" / folder / "_stage.json").read_bytes() == stored, folder


def test_without_the_second_node_pretraining_stops_at_once_naming_the_nodes(cluster_run, s3_env):
    run, _ = cluster_run
    completed = storage.read_bytes(f"{STORAGE_URI}/pretrain/sista/_stage.json")
    worker = next(node for node in run.cluster.started if node.name != "head")
    run.cluster.stop_node(worker)
    run.cluster.wait_for_nodes(1)
    result = run.launch("pretrain", "--variant", "sista", timeout_s=300)
    assert result.returncode != 0
    assert "needs 2 Ray nodes, the cluster has 1" in result.stdout + result.stderr
    assert run.seconds[run.last] < 120  # refused before any training
    # The completed output from the two-node run is untouched.
    assert storage.read_bytes(f"{STORAGE_URI}/pretrain/sista/_stage.json") == completed
    assert json.loads(completed)["worker_nodes"] == 2
