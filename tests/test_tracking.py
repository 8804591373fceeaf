import os

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from components.platform.secrets import redacted
from components.platform.tracking import MetricLog, TrackingUnavailable, flatten


def test_secrets_in_a_config_are_masked_before_mlflow_sees_them():
    logged = flatten(
        {
            "storage": {
                "uri": "s3://sista-data/runs",
                "endpoint_url": "http://minio:hunter2-secret@127.0.0.1:9000/",
            },
            "aws_secret_access_key": "wJalrXUtnFEMI",
            "hf_token": "hf_abc",
            "tokenizer": "/models/minilm",
            "pretrain.optim.lr": 0.001,
        }
    )
    shown = {key: redacted(key, value) for key, value in logged.items()}
    assert shown == {
        "storage.uri": "s3://sista-data/runs",
        "storage.endpoint_url": "http://***@127.0.0.1:9000/",
        "aws_secret_access_key": "***",
        "hf_token": "***",
        "tokenizer": "/models/minilm",
        "pretrain.optim.lr": "0.001",
    }


def test_secret_names_in_every_case_style_are_masked():
    secrets = [
        "api_key", "apiKey", "secretKey", "accessToken", "private_key", "Authorization",
        "passphrase", "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token",
        "mlflow.tracking_password", "AWS_SECRET_ACCESS_KEY",
    ]  # fmt: skip
    for key in secrets:
        assert redacted(key, "value") == "***", key
    for key in ("tokenizer", "max_length", "keyframe", "monkey"):
        assert redacted(key, "value") == "value", key


def test_urls_lose_their_user_information_and_query_values():
    assert redacted("uri", "http://ann:pa/ss@host:5000/api") == "http://***@host:5000/api"
    signed = "https://b.s3.amazonaws.com/k?X-Amz-Signature=abc&X-Amz-Credential=AKIA%2Fx&v=1"
    assert redacted("link", signed) == (
        "https://b.s3.amazonaws.com/k?X-Amz-Signature=***&X-Amz-Credential=***&v=***"
    )
    assert redacted("endpoint", "http://ray-head:8265/?token=t0k3n") == (
        "http://ray-head:8265/?token=***"
    )
    assert redacted("note", "plain text?a=b") == "plain text?a=b"  # not a URL


class FlakyStore:
    """A tracking client whose server is away for the calls listed in ``away`` (0-based)."""

    def __init__(self, away: set[int], error: Exception | None = None) -> None:
        self.away, self.calls, self.taken = away, 0, []
        self.error = error or MlflowException("API request failed: Connection refused")

    def log_batch(self, run_id, metrics):
        call, self.calls = self.calls, self.calls + 1
        if call in self.away:
            raise self.error
        self.taken.append([(m.key, m.step, m.timestamp) for m in metrics])


def test_metrics_made_while_the_server_is_away_are_sent_in_order_once_it_answers(capsys):
    store = FlakyStore(away={1, 2, 3})
    log = MetricLog(store, "run")
    for step in (5, 10, 15, 20):
        log.log({"loss": 1.0 / step}, step)
    # step 5 taken; step 10 refused (1), retried with 15 (2) and 20 (3); all go on call 4
    assert [batch[0][1] for batch in store.taken] == [5]
    assert len(log.kept) == 3
    assert log.send()
    assert [batch[0][1] for batch in store.taken] == [5, 10, 15, 20]
    assert not log.kept
    output = capsys.readouterr().out
    assert output.count("did not take the step metrics") == 1
    assert "answers again" in output
    timestamps = [batch[0][2] for batch in store.taken]
    assert timestamps == sorted(timestamps)  # the time each was made, not sent


def test_a_store_that_refuses_the_metrics_is_an_error_not_an_outage():
    refused = MlflowException("bad value", error_code=INVALID_PARAMETER_VALUE)
    log = MetricLog(FlakyStore(away={0}, error=refused), "run")
    with pytest.raises(MlflowException, match="bad value"):
        log.log({"loss": 1.0}, 5)


def test_flush_waits_for_the_server_and_gives_up_after_its_patience():
    store = FlakyStore(away={0, 1, 2})
    log = MetricLog(store, "run")
    log.log({"loss": 1.0}, 5)
    log.flush(patience_s=5, every_s=0.01)  # refused twice more, then taken
    assert store.taken == [[("loss", 5, store.taken[0][0][2])]]
    gone = MetricLog(FlakyStore(away=set(range(1000))), "run")
    gone.log({"loss": 1.0}, 5)
    with pytest.raises(TrackingUnavailable, match="1 batches of step metrics of run run"):
        gone.flush(patience_s=0.05, every_s=0.01)


def test_a_second_store_in_the_same_process_gets_its_own_runs(tmp_path, monkeypatch):
    from components.platform.config import Params
    from components.platform.tracking import stage_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    ids = {}
    for name in ("first", "second"):
        store = {"tracking_uri": f"sqlite:///{tmp_path / name}.db"}
        params = Params.model_validate({"mlflow": {**store, "artifact_root": str(tmp_path)}})
        with stage_run(params, "ingest") as run:
            ids[name] = run.info.run_id
        # mlflow.set_tracking_uri writes MLFLOW_TRACKING_URI, the user's override: put back
        assert "MLFLOW_TRACKING_URI" not in os.environ
    for name, run_id in ids.items():
        client = mlflow.MlflowClient(f"sqlite:///{tmp_path / name}.db")
        assert client.get_run(run_id).info.run_id == run_id
