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
