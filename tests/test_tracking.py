from components.tracking import flatten, redacted


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
