"""Faults provoked for real on the CI-profile pipeline (the session's ``pipeline_run``): a Ray
Train worker process SIGKILLed mid-epoch, a stage's whole process group SIGKILLed mid-write,
and fake credentials in the environment and config of a run, which must reach no log,
MLflow record or artifact."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from types import SimpleNamespace

import mlflow
import psutil
import pytest
from pipeline_helpers import kill_job, run_stages, start_stage, wait_for, write_ci_params

from components.platform.stage_storage import content_hashes, read_manifest

pytestmark = pytest.mark.slow

# Fake credentials: in the stage's environment, and one in params.yaml (an endpoint URL with
# a password, the way S3-compatible stores are often configured).
ENVIRONMENT_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIARELIABILITY00007",
    "AWS_SECRET_ACCESS_KEY": "reliability-env-secret-6f1c",
    "AWS_SESSION_TOKEN": "reliability-session-token-93ab",
    "MLFLOW_TRACKING_TOKEN": "reliability-mlflow-token-5d20",
    "HF_TOKEN": "hf_reliabilitytokennotreal",
}
CONFIG_SECRET = "reliability-config-secret-a7e4"


def history_steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def train_workers(job) -> list[psutil.Process]:
    """The Ray Train worker processes of a stage's local Ray instance."""
    workers = []
    for process in psutil.Process(job.pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                workers.append(process)
        except psutil.NoSuchProcess:
            pass
    return workers


@pytest.fixture(scope="module")
def worker_killed_run(pipeline_run):
    """Pre-training (the CI profile's 2 epochs) whose Ray Train worker is SIGKILLed once its
    second epoch has logged a step; fake secrets in its environment and params.yaml."""
    folder, _ = pipeline_run
    # max_failures 3: a new run (the config fingerprint differs), the same training maths.
    endpoint = f"http://sista:{CONFIG_SECRET}@127.0.0.1:9"
    write_ci_params(folder, **{"pretrain.max_failures": 3, "storage.endpoint_url": endpoint})
    ray_temp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # Ray's logs, for the scan
    log = folder / "worker-killed-pretrain.log"
    env = {**ENVIRONMENT_SECRETS, "RAY_TMPDIR": str(ray_temp)}
    job = start_stage(folder, ["pretrain", "--variant", "sista"], log, env=env)
    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sista-pretrain").experiment_id

    def this_run():
        runs = client.search_runs(
            [experiment], "params.`pretrain.max_failures` = '3' and attributes.status = 'RUNNING'"
        )
        return runs[0].info.run_id if runs else None

    try:
        run_id = wait_for(this_run, job, "the MLflow run started")
        first_epoch = wait_for(
            lambda: history_steps(client, run_id, "epoch_loss"), job, "epoch 1 ended"
        )
        steps_per_epoch = first_epoch[0]
        fingerprint = client.get_run(run_id).data.params["fingerprint"]
        snapshot = folder / f"data/checkpoints/pretrain-sista-{fingerprint}"
        snapshot /= "checkpoint_manager_snapshot.json"
        wait_for(  # Ray has registered the epoch-1 checkpoint: there is something to resume
            lambda: snapshot.exists() and "checkpoint_" in snapshot.read_text(),
            job,
            "the epoch-1 checkpoint was registered",
        )
        wait_for(
            lambda: any(s > steps_per_epoch for s in history_steps(client, run_id, "loss")),
            job,
            "a step of epoch 2 was logged",
        )
        worker = wait_for(lambda: train_workers(job), job, "a Ray Train worker process")[0]
        worker.send_signal(signal.SIGKILL)
        epochs_done_at_kill = len(history_steps(client, run_id, "epoch_loss"))
        job.wait(timeout=900)
    finally:
        if job.poll() is None:
            kill_job(job)
    yield SimpleNamespace(
        folder=folder,
        client=client,
        run_id=run_id,
        returncode=job.returncode,
        log=log.read_text(errors="replace"),
        killed_pid=worker.pid,
        epochs_done_at_kill=epochs_done_at_kill,
        steps_per_epoch=steps_per_epoch,
        ray_temp=ray_temp,
    )
    shutil.rmtree(ray_temp, ignore_errors=True)


def test_training_survives_a_killed_worker_and_ends_with_the_configured_steps(worker_killed_run):
    run = worker_killed_run
    assert run.returncode == 0, run.log[-4000:]
    assert run.epochs_done_at_kill == 1  # the worker died in the middle of epoch 2
    assert not psutil.pid_exists(run.killed_pid)
    assert f"resuming after epoch 1, step {run.steps_per_epoch}" in run.log
    output = run.folder / "data" / "pretrain" / "sista"
    metrics = json.loads((output / "metrics.json").read_text())
    assert (metrics["epoch"], metrics["step"]) == (2, 2 * run.steps_per_epoch)
    assert read_manifest(output)["mlflow_run_id"] == run.run_id
    assert run.client.get_run(run.run_id).info.status == "FINISHED"


def test_no_step_is_logged_twice_after_the_restart(worker_killed_run):
    run = worker_killed_run
    last = 2 * run.steps_per_epoch
    for key in ("loss", "loss_sta", "lr", "samples_per_s"):
        assert history_steps(run.client, run.run_id, key) == list(range(5, last + 1, 5)), key
    for key in ("epoch_loss", "val_recall_at_1"):
        assert history_steps(run.client, run.run_id, key) == [run.steps_per_epoch, last], key
    history = json.loads((run.folder / "data/pretrain/sista/history.json").read_text())
    assert [h["step"] for h in history] == list(range(5, last + 1, 5))


def test_the_same_seed_gives_the_same_first_losses(worker_killed_run):
    """The pipeline's own first pre-training run and this one share seed, data and maths:
    every loss logged before the kill is bit-for-bit the same (CPU)."""
    run = worker_killed_run
    experiment = run.client.get_experiment_by_name("sista-pretrain").experiment_id
    first = run.client.search_runs(
        [experiment],
        "params.`pretrain.max_failures` = '2' and params.`pretrain.optim.epochs` = '2' "
        "and attributes.run_name = 'pretrain-sista'",
        order_by=["attributes.start_time ASC"],
    )[0]
    for key, step in (("loss", 5), ("loss_sia", 5), ("epoch_loss", run.steps_per_epoch)):
        ours = {m.step: m.value for m in run.client.get_metric_history(run.run_id, key)}
        theirs = {m.step: m.value for m in run.client.get_metric_history(first.info.run_id, key)}
        assert ours[step] == theirs[step], key


def files_below(root: Path):
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            if path.is_file() and not path.is_symlink():
                yield path


def test_no_secret_reaches_logs_mlflow_or_artifacts(worker_killed_run):
    run = worker_killed_run
    secrets = [*ENVIRONMENT_SECRETS.values(), CONFIG_SECRET]
    mlflow_run = run.client.get_run(run.run_id)
    recorded = [*mlflow_run.data.params.values(), *mlflow_run.data.tags.values(), run.log]
    assert not [s for s in secrets if any(s in text for text in recorded)]
    # Every file the pipeline wrote (stage outputs, Ray checkpoints, MLflow's database and
    # artifacts, Ray's own logs), except the params.yaml the secret was put in.
    scanned, holding = 0, []
    for root in (run.folder, run.ray_temp):
        for path in files_below(root):
            if path == run.folder / "params.yaml":
                continue
            content = path.read_bytes()
            scanned += 1
            holding += [f"{path}: {s}" for s in secrets if s.encode() in content]
    assert scanned > 100 and not holding


def test_a_stage_killed_mid_write_leaves_no_partial_output_and_reruns(pipeline_run):
    folder, _ = pipeline_run
    write_ci_params(folder)
    data = folder / "data"
    before = read_manifest(data / "ingest")
    assert content_hashes(data / "ingest") == before["files"]
    job = start_stage(folder, ["ingest"], folder / "killed-ingest.log")
    try:
        written = wait_for(
            lambda: sorted(data.glob(".ingest.tmp-*/shards/*.npy")), job, "a shard was written"
        )
    finally:
        if job.poll() is None:
            kill_job(job)  # SIGKILL of the whole process group, mid-write
    partial = written[0].parents[1]
    # The earlier complete output is untouched and still matches its manifest; the partial
    # one is a hidden sibling without a manifest, outside DVC's `outs: data/ingest`, where
    # neither DVC nor the reports stage looks.
    assert read_manifest(data / "ingest") == before
    assert content_hashes(data / "ingest") == before["files"]
    assert partial.name.startswith(".ingest.tmp-") and not (partial / "_stage.json").exists()

    rerun = run_stages(folder, [["ingest"]])
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert not list(data.glob(".ingest*"))  # the killed run's leftovers are cleared
    after = read_manifest(data / "ingest")
    assert after["mlflow_run_id"] != before["mlflow_run_id"]
    # The same seed gives byte-identical splits (manifest), label subsets and image shards.
    assert after["files"] == before["files"]
