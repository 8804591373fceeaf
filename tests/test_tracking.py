from components.secrets import redacted
from components.tracking import flatten


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
