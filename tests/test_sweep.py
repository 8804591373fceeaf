"""`sista sweep`: its config fails early, its result applies to params.yaml, and on the CI
profile it runs Ray Tune trials as MLflow child runs of one parent and writes the best."""

import json
import subprocess
import sys

import mlflow
import pytest
import yaml
from pipeline_helpers import ROOT, run_stages, write_ci_params

from components.config import ConfigError, Params, load_params
from components.sweep import best_row, current_values, trial_section, trial_settings
from components.sweep_best import apply_best, dvc_arguments


def write(tmp_path, data):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "space, message",
    [
        (
            {"pretrain.loss.sia_wieght": {"uniform": [0, 1]}},
            "pretrain.loss has no 'sia_wieght' (known: intra_weight, sia_weight, sta_weight)",
        ),
        ({"ingest.seed": {"choice": [1, 2]}}, "only pretrain settings are swept"),
        ({"pretrain.sia.mode": {"choice": [1]}}, "is not a number of the pretrain section"),
        ({"pretrain.loss.sia_weight": {"uniform": [2, 1]}}, "low must be below high"),
        ({"pretrain.loss.sia_weight": {"choice": [1], "q": 0.1}}, "q rounds uniform"),
        (
            {"pretrain.loss.sta_weight": {"uniform": [-1, 1]}},
            "sweep.space.pretrain.loss.sta_weight: -1.0 is invalid: Input should be greater",
        ),
    ],
)
def test_a_bad_sweep_space_fails_before_any_work(tmp_path, space, message):
    with pytest.raises(ConfigError) as error:
        load_params(write(tmp_path, {"sweep": {"space": space}}))
    assert message in str(error.value)


def test_a_trial_trains_params_yaml_with_its_values_and_the_sweep_resources():
    params = Params.model_validate(
        {"sweep": {"epochs": 2, "cpus_per_worker": 0.75}, "pretrain": {"optim": {"epochs": 5}}}
    )
    section = trial_section(
        params, {"pretrain.loss.sia_weight": 0.4, "pretrain.sia.threshold": 0.8}
    )
    assert section.loss.sia_weight == 0.4 and section.sia.threshold == 0.8
    assert section.loss.sta_weight == params.pretrain.loss.sta_weight
    assert section.optim.epochs == 2 and section.cpus_per_worker == 0.75
    assert current_values(params)["pretrain.loss.intra_weight"] == 0.5
    assert trial_settings(
        {"pretrain.loss.sia_weight": 0.9500000000000001}, ["pretrain.loss.sia_weight"]
    ) == {"pretrain.loss.sia_weight": 0.95}


def test_the_best_is_the_highest_trial_that_trained_to_the_end():
    rows = [
        {"trial_id": "a", "state": "completed", "signal": 0.55},
        {"trial_id": "b", "state": "stopped at step 30", "signal": 0.70},
        {"trial_id": "c", "state": "completed", "signal": 0.58},
        {"trial_id": "d", "state": "failed", "signal": None},
    ]
    assert best_row(rows)["trial_id"] == "c"
    with pytest.raises(RuntimeError, match="no sweep trial trained to the end"):
        best_row([rows[1], rows[3]])


BEST = "# from a sweep\npretrain.loss.sia_weight: 0.6\npretrain.sia.temperature: 0.05\n"


def test_apply_writes_the_best_into_params_yaml_keeping_its_comments(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    best = tmp_path / "best_params.yaml"
    best.write_text(BEST)
    changed = apply_best(params, best)
    assert changed == {
        "pretrain.loss.sia_weight": (1.0, 0.6),
        "pretrain.sia.temperature": (0.07, 0.05),
    }
    applied = load_params(params)
    assert applied.pretrain.loss.sia_weight == 0.6 and applied.pretrain.sia.temperature == 0.05
    text = params.read_text()
    assert "# Every tunable number of the pipeline" in text  # comments survive
    assert "mode: eliminate" in text
    assert dvc_arguments(best) == "-S pretrain.loss.sia_weight=0.6 -S pretrain.sia.temperature=0.05"


def test_apply_refuses_a_result_that_would_make_params_yaml_invalid(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    before = params.read_text()
    best = tmp_path / "best_params.yaml"
    best.write_text("pretrain.loss.sia_weight: -1\n")
    with pytest.raises(ConfigError, match="pretrain.loss.sia_weight"):
        apply_best(params, best)
    best.write_text("pretrain.losses.sia_weight: 1\n")
    with pytest.raises(ConfigError, match="not a swept key"):
        apply_best(params, best)
    best.write_text("storage.uri: s3://attacker/bucket\n")  # a key the sweep never searched
    with pytest.raises(ConfigError, match="storage.uri: not a swept key"):
        apply_best(params, best)
    best.write_text("pretrain.loss.sia_weight: [1, 2]\n")
    with pytest.raises(ConfigError, match="is not a number"):
        apply_best(params, best)
    assert params.read_text() == before


@pytest.mark.slow
@pytest.mark.system
@pytest.mark.timeout(2400)
def test_a_ci_sweep_logs_child_runs_under_one_parent_and_its_best_applies(tmp_path):
    """Three tiny trials (params.yaml's values first) with ASHA: every trial a child run of
    the sweep's parent run, stopped trials closed as KILLED, the best file applies."""
    write_ci_params(tmp_path, ("phantom_classification",))
    stages = [["ingest"], ["reports"], ["similarity"], ["sweep"]]
    result = run_stages(tmp_path, stages, timeout=2300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    out = tmp_path / "data" / "sweep"
    record = json.loads((out / "trials.json").read_text())
    summary, trials = record["summary"], record["trials"]
    assert len(trials) == 3
    current = trials[0]
    assert current["trial_id"] == summary["current_trial_id"]
    assert current["settings"] == current_values(load_params(tmp_path / "params.yaml"))
    assert summary["total_steps"] > 4  # reports at step 4, 8, ... and at the end

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_probe_auroc"] == pytest.approx(summary["best_signal"])
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    assert {run.info.run_id for run in children} == {t["mlflow_run_id"] for t in trials}
    for trial in trials:
        child = client.get_run(trial["mlflow_run_id"])
        expected = "FINISHED" if trial["state"] == "completed" else "KILLED"
        assert child.info.status == expected, trial
        assert child.data.params == {k: str(v) for k, v in trial["settings"].items()}
        signal = client.get_metric_history(child.info.run_id, "val_probe_auroc")
        assert [m.step for m in signal] == [r["step"] for r in trial["reports"]]
    assert any(t["state"] == "completed" for t in trials)
    assert all(t["steps"] >= 4 for t in trials)  # a stopped trial frees its CPUs for the next

    best = yaml.safe_load((out / "best_params.yaml").read_text())
    assert set(best) == set(load_params(tmp_path / "params.yaml").sweep.space)
    assert best == next(t for t in trials if t["trial_id"] == summary["best_trial_id"])["settings"]
    applied = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "sweep", "--apply"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert applied.returncode == 0, applied.stderr
    assert current_values(load_params(tmp_path / "params.yaml")) == best
