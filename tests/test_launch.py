import subprocess
import sys

import pytest
import yaml
from s3_helpers import MotoProcess, subprocess_environment


def run_launch(folder, *args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "pipeline.launch", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.fixture(scope="module")
def local_s3(tmp_path_factory):
    """moto's S3 server (its own process) holding one bucket, ``sista-data``."""
    seed = tmp_path_factory.mktemp("s3-seed")
    (seed / "sista-data" / "reports").mkdir(parents=True)
    (seed / "sista-data" / "reports" / "CXR1.xml").write_text("<eCitation/>")
    server = MotoProcess(seed)
    server.start()
    yield server
    server.kill()


def no_such(tmp_path):
    return str(tmp_path / "no-such-folder")


# (stage, params.yaml content, what the one line must say, where S3 is: None, "s3", "s3 no keys")
BAD_CONFIGS = {
    "unknown key": (
        "ingest",
        {"pretrain": {"optim": {"lrr": 0.1}}},
        "pretrain.optim.lrr: unknown key",
        None,
    ),
    "wrong type": (
        "ingest",
        {"pretrain": {"optim": {"batch_size": "big"}}},
        "pretrain.optim.batch_size: Input should be a valid integer",
        None,
    ),
    "negative learning rate": (
        "pretrain",
        {"pretrain": {"optim": {"lr": -1}}},
        "pretrain.optim.lr: Input should be greater than 0",
        None,
    ),
    "label fraction above 1": (
        "ingest",
        {"ingest": {"downstream": {"label_fractions": [0.01, 1.5]}}},
        "ingest.downstream.label_fractions.1: Input should be less than or equal to 1",
        None,
    ),
    "label fraction 0": (
        "evaluate",
        {"ingest": {"downstream": {"label_fractions": [0.0]}}},
        "ingest.downstream.label_fractions.0: Input should be greater than 0",
        None,
    ),
    "dataset path not given": (
        "ingest",
        {"ingest": {"source": "mimic_cxr"}},
        "ingest.source_path is required for source 'mimic_cxr'",
        None,
    ),
    "dataset folder missing": (
        "ingest",
        {"ingest": {"source": "mimic_cxr", "source_path": no_such}},
        "ingest.source_path: no such file or folder: {tmp}/no-such-folder",
        None,
    ),
    "a set its task cannot use": (
        "ingest",
        {
            "ingest": {"downstream": {"sets": {"covidx": {"adapter": "covidx", "path": no_such}}}},
            "evaluate": {"tasks": {"segmentation": ["covidx"]}},
        },
        "evaluate.tasks.segmentation: set 'covidx' (covidx) cannot serve segmentation; "
        "it serves classification",
        None,
    ),
    "a task on an undefined set": (
        "evaluate",
        {"evaluate": {"tasks": {"detection": ["rsna"]}}},
        "evaluate.tasks.detection: no set 'rsna' in ingest.downstream.sets (defined: "
        "phantom_classification, phantom_opacity, phantom_pneumothorax)",
        None,
    ),
    "an unknown set option": (
        "ingest",
        {
            "ingest": {
                "downstream": {
                    "sets": {"siim": {"adapter": "siim_acr", "path": no_such, "val_fration": 0.1}}
                }
            }
        },
        "ingest.downstream.sets.siim.siim_acr.val_fration: unknown key",
        None,
    ),
    "a set's folder missing": (
        "ingest",
        {
            "ingest": {"downstream": {"sets": {"siim": {"adapter": "siim_acr", "path": no_such}}}},
            "evaluate": {"tasks": {"segmentation": ["siim"]}},
        },
        "ingest.downstream.sets.siim.path: no such file or folder: {tmp}/no-such-folder",
        None,
    ),
    "weight file missing": (
        "pretrain",
        {"pretrain": {"image": {"checkpoint": no_such}}},
        "pretrain.image.checkpoint: no such file or folder: {tmp}/no-such-folder",
        None,
    ),
    "bucket missing": (
        "reports",
        {"storage": {"uri": "s3://no-such-bucket/sista"}},
        "storage.uri: bucket 'no-such-bucket' does not exist",
        "s3",
    ),
    "nothing at the dataset prefix": (
        "ingest",
        {"ingest": {"source": "openi", "source_path": "s3://sista-data/images"}},
        "ingest.source_path: nothing at s3://sista-data/images",
        "s3",
    ),
    "no credentials": (
        "ingest",
        {"ingest": {"source": "openi", "source_path": "s3://sista-data/reports"}},
        "ingest.source_path: no AWS credentials for exists s3://sista-data/reports",
        "s3 no keys",
    ),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_a_bad_config_fails_in_one_line_naming_the_key_before_any_work(case, tmp_path, request):
    stage, params, expected, s3 = BAD_CONFIGS[case]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_resolve(params, tmp_path)))
    env = None
    if s3:
        server = request.getfixturevalue("local_s3")
        env = subprocess_environment(server.endpoint, tmp_path, credentials=s3 == "s3")
    result = run_launch(tmp_path, stage, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("params.yaml: "), result.stderr
    assert expected.format(tmp=tmp_path) in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


def test_a_stage_started_as_a_cluster_job_checks_its_locations_too(tmp_path):
    """A submitted job runs ``python -m components.STAGE`` on the cluster: the same check."""
    missing = tmp_path / "no-such-folder"
    params = {"ingest": {"source": "mimic_cxr", "source_path": str(missing)}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(
        [sys.executable, "-m", "components.stages.ingest", "--params", "params.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"params.yaml: ingest.source_path: no such file or folder: {missing}"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def _resolve(data, tmp_path):
    """Call the placeholders (``no_such``) of a case with this test's folder."""
    if isinstance(data, dict):
        return {k: _resolve(v, tmp_path) for k, v in data.items()}
    return data(tmp_path) if callable(data) else data


def test_an_unknown_stage_is_refused(tmp_path):
    result = run_launch(tmp_path, "pretrian")
    assert result.returncode != 0 and "invalid choice" in result.stderr


def test_job_entrypoint_names_this_interpreter():
    from pipeline.launch import entrypoint

    command = entrypoint("pretrain", "params.yaml", ["--variant", "convirt"])
    assert command.startswith(sys.executable)
    assert command.endswith("-m components.stages.pretrain --params params.yaml --variant convirt")


def test_a_submitted_job_gets_absolute_local_paths(tmp_path, monkeypatch):
    from components.platform.config import load_params
    from pipeline.launch import job_params

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"storage": {"uri": "data"}}))
    job = job_params(load_params("params.yaml"))
    assert job["storage"]["uri"] == str(tmp_path / "data")  # a shared file system
    assert job["mlflow"]["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert job["mlflow"]["artifact_root"] == str(tmp_path / "mlartifacts")

    s3 = {"uri": "s3://bucket/sista", "local_dir": "data"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"storage": s3}))
    job = job_params(load_params("params.yaml"))
    assert job["storage"] == {**s3, "endpoint_url": None}  # the job's copy: its own folder


def test_a_submitted_job_gets_endpoints_but_never_credentials(monkeypatch):
    from pipeline.launch import job_environment

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEEXAMPLE00")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-in-a-job")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "never-in-a-job-either")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    environment = job_environment()
    assert environment["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:9000"
    assert environment["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(
        environment
    )
