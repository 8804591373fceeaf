"""An MLflow server that goes away for a minute in the middle of pre-training: training goes
on, the step metrics of that minute reach the server once it is back, each step once, and the
stage completes (registers its model, finishes its run). A real `mlflow server` process,
stopped and started again on its port; the CI profile's pre-training on a local Ray."""

from __future__ import annotations

import time

import mlflow
import pytest
from pipeline_helpers import run_stages, start_stage, write_ci_params

from pipeline.local_services import MLflowServer

pytestmark = [pytest.mark.slow, pytest.mark.system]

OUTAGE_S = 60
STEPS_PER_EPOCH, EPOCHS, LOG_EVERY = 12, 6, 5


def pretrain_run(client: mlflow.MlflowClient):
    """The pre-training run of the server's store, once it exists."""
    experiment = client.get_experiment_by_name("sista-pretrain")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return runs[0] if runs else None


@pytest.mark.timeout(1200)
def test_training_outlives_a_minute_without_mlflow_and_logs_each_step_once(tmp_path):
    server = MLflowServer(tmp_path / "mlflow-server").start()
    client = mlflow.MlflowClient(server.url)
    write_ci_params(
        tmp_path,
        ("phantom_classification",),
        **{
            "mlflow.tracking_uri": server.url,
            "ingest.downstream.seeds": [0],
            "similarity.top_k": 4,
            "pretrain.optim.epochs": EPOCHS,
            "pretrain.optim.max_steps_per_epoch": STEPS_PER_EPOCH,
        },
    )
    log = tmp_path / "pretrain.log"
    stage = None
    try:
        prepared = run_stages(tmp_path, [["ingest"], ["reports"], ["similarity"]], timeout=900)
        assert prepared.returncode == 0, prepared.stdout[-3000:] + prepared.stderr[-3000:]
        stage = start_stage(tmp_path, ["pretrain", "--variant", "sista"], log)
        # Stop the server once the first epoch's metrics are in: training is in epoch 2.
        deadline = time.monotonic() + 600
        while True:
            run = pretrain_run(client)
            if run is not None and client.get_metric_history(run.info.run_id, "epoch_loss"):
                break
            assert stage.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "pre-training logged no epoch in 10 minutes"
            time.sleep(1)
        server.stop()
        stopped = time.time()
        time.sleep(OUTAGE_S)
        assert stage.poll() is None, "pre-training ended while MLflow was away"
        restarted = time.time()
        server.restart()
        assert stage.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if stage is not None and stage.poll() is None:
            stage.kill()
        server.stop()
    output = log.read_text()
    assert "[tracking] MLflow did not take the step metrics" in output
    assert "[tracking] MLflow answers again" in output

    server.restart()
    try:
        run = client.get_run(pretrain_run(client).info.run_id)
        assert run.info.status == "FINISHED"
        epochs = sorted(m.step for m in client.get_metric_history(run.info.run_id, "epoch_loss"))
        per_epoch = epochs[0]  # at most STEPS_PER_EPOCH: fewer when the data has fewer batches
        assert epochs == [per_epoch * (epoch + 1) for epoch in range(EPOCHS)]  # each once
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert sorted(steps) == list(range(LOG_EVERY, epochs[-1] + 1, LOG_EVERY))  # each once
        # Steps measured while the server was away reached it, with the time they were made.
        losses = client.get_metric_history(run.info.run_id, "loss")
        assert any(stopped * 1000 <= m.timestamp <= restarted * 1000 for m in losses)
        version = client.get_model_version_by_alias("sista-encoder", "candidate")
        assert version.run_id == run.info.run_id
    finally:
        server.stop()
