"""Cluster mode for real: a Ray head and a second Ray node started with `ray start` on this
machine (loopback addresses, 1 CPU each, token auth), the CI-profile stages submitted to it
as Ray jobs by the launcher with stage folders on S3 (moto's server process) and MLflow as a
server. Pre-training asks for one worker per node (STRICT_SPREAD), so it cannot run, and
this test cannot pass, without the second node. `make cluster-demo` runs the whole pipeline
the same way; this test stops after pre-training to stay within a few minutes on 2 cores."""

import hashlib
import json
import time

import mlflow
import psutil
import pytest
from outage_proxy import OutageProxy
from pipeline_helpers import wait_for

from components.platform import storage
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


def test_an_s3_outage_while_a_submitted_stage_writes_its_output_is_retried(cluster_run, s3_env):
    """The stage's S3 endpoint refuses connections for 10 s from the moment the similarity job
    starts replacing its output on S3 (its old manifest's DELETE): the job retries, completes,
    and the output on S3 is whole. The S3 server behind the endpoint keeps its objects."""
    run, _ = cluster_run
    before = json.loads(storage.read_bytes(f"{STORAGE_URI}/similarity/_stage.json"))
    delete = b"DELETE /sista/ci/similarity/_stage.json "  # the first write of its output
    with OutageProxy(run.s3.port) as proxy:
        proxy.trip_on(delete, seconds=10)
        result = run.launch("similarity", env={"AWS_ENDPOINT_URL_S3": proxy.endpoint})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    [outage] = proxy.outages
    assert outage.ended is not None and outage.seconds >= 10
    assert proxy.sightings[delete] == 2  # dropped, then sent again once the endpoint was back
    after = json.loads(storage.read_bytes(f"{STORAGE_URI}/similarity/_stage.json"))
    assert after["mlflow_run_id"] != before["mlflow_run_id"]  # this run's output
    for name, digest in after["files"].items():
        stored = storage.read_bytes(f"{STORAGE_URI}/similarity/{name}")
        assert hashlib.sha256(stored).hexdigest() == digest, name


def raylet_of(node) -> psutil.Process:
    for pid in node.pids():
        try:
            process = psutil.Process(pid)
            if process.cmdline() and process.cmdline()[0].endswith("/raylet"):
                return process
        except psutil.NoSuchProcess:
            pass
    raise AssertionError(f"no raylet among the {node.name} node's processes")


def test_a_node_lost_in_epoch_2_stops_pretraining_naming_it_and_a_rerun_resumes(
    cluster_run, s3_env
):
    """The second node's raylet is killed while STRICT_SPREAD pre-training (one worker per
    node) is in epoch 2: the stage stops at once with one line naming the lost node, the
    previous output stays; with the node back, a rerun resumes from the epoch-1 checkpoint on
    S3 and no MLflow step is logged twice."""
    run, _ = cluster_run
    before = storage.read_bytes(f"{STORAGE_URI}/pretrain/sista/_stage.json")
    write_params(run.work, **{"pretrain.max_failures": 1})  # a new run, the same training
    client = mlflow.MlflowClient(run.tracking.url)
    experiment = client.get_experiment_by_name("sista-pretrain").experiment_id
    log = run.work / "logs" / "pretrain-node-lost.log"
    job = run.start("pretrain", "--variant", "sista", log=log)
    try:

        def this_run():
            found = client.search_runs(
                [experiment],
                "params.`pretrain.max_failures` = '1' and attributes.status = 'RUNNING'",
            )
            return found[0].info.run_id if found else None

        run_id = wait_for(this_run, job, "the MLflow run started")
        steps = lambda key: sorted(m.step for m in client.get_metric_history(run_id, key))  # noqa: E731
        steps_per_epoch = wait_for(lambda: steps("epoch_loss"), job, "epoch 1 ended")[0]
        fingerprint = client.get_run(run_id).data.params["fingerprint"]
        snapshot = f"{STORAGE_URI}/checkpoints/pretrain-sista-{fingerprint}"
        snapshot += "/checkpoint_manager_snapshot.json"
        wait_for(
            lambda: storage.exists(snapshot) and b"checkpoint_" in storage.read_bytes(snapshot),
            job,
            "the epoch-1 checkpoint was registered on S3",
        )
        wait_for(lambda: steps("loss")[-1] > steps_per_epoch, job, "a step of epoch 2")
        worker = next(node for node in run.cluster.started if node.name != "head")
        lost_id = next(
            n["node_id"] for n in run.cluster.alive_nodes() if n["node_ip"] == "127.0.0.3"
        )
        raylet_of(worker).kill()
        killed = time.monotonic()
        job.wait(timeout=600)
        stopped_after = time.monotonic() - killed
    finally:
        if job.poll() is None:
            job.kill()
    output = log.read_text(errors="replace")
    (run.work / "logs" / "node-lost.json").write_text(
        json.dumps({"stopped_after_s": stopped_after})
    )
    assert job.returncode != 0, output[-3000:]
    [line] = [line for line in output.splitlines() if "[pretrain] stopped: " in line]
    assert f"Ray node {lost_id[:8]} (127.0.0.3) was lost: " in line
    assert "STRICT_SPREAD needs 2 nodes, 1 left; the last checkpoint is kept in " in line
    assert f"{STORAGE_URI}/checkpoints/pretrain-sista-{fingerprint}" in line
    assert stopped_after < 120, stopped_after
    assert storage.read_bytes(f"{STORAGE_URI}/pretrain/sista/_stage.json") == before
    interrupted = client.get_run(run_id)
    assert interrupted.info.status in ("FAILED", "KILLED")
    for key in ("loss", "epoch_loss"):
        assert len(set(steps(key))) == len(steps(key)), key

    run.cluster.restart_node(worker)
    result = run.launch("pretrain", "--variant", "sista")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resuming after epoch 1, step {steps_per_epoch}" in result.stdout + result.stderr
    manifest = json.loads(storage.read_bytes(f"{STORAGE_URI}/pretrain/sista/_stage.json"))
    assert manifest["fingerprint"] == fingerprint and manifest["worker_nodes"] == 2
    rerun_id = manifest["mlflow_run_id"]
    loss = sorted(m.step for m in client.get_metric_history(rerun_id, "loss"))
    assert len(set(loss)) == len(loss) and loss[0] > steps_per_epoch  # from the checkpoint on
    epochs = [m.step for m in client.get_metric_history(rerun_id, "epoch_loss")]
    assert epochs == [2 * steps_per_epoch]


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
