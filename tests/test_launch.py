import subprocess
import sys

import yaml


def run_launch(folder, *args):
    return subprocess.run(
        [sys.executable, "-m", "pipeline.launch", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_config_typo_fails_before_any_work_with_the_key_named(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"pretrain": {"optim": {"lr": -1}}}))
    result = run_launch(tmp_path, "ingest")
    assert result.returncode == 2
    assert "pretrain.optim.lr: Input should be greater than 0" in result.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()


def test_an_unknown_stage_is_refused(tmp_path):
    result = run_launch(tmp_path, "pretrian")
    assert result.returncode != 0 and "invalid choice" in result.stderr


def test_job_entrypoint_names_this_interpreter():
    from pipeline.launch import entrypoint

    command = entrypoint("pretrain", "params.yaml", ["--variant", "convirt"])
    assert command.startswith(sys.executable)
    assert command.endswith("-m components.pretrain --params params.yaml --variant convirt")


def test_a_submitted_job_gets_absolute_local_paths(tmp_path, monkeypatch):
    from components.config import load_params
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
