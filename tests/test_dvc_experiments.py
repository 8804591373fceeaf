"""DVC experiments at CI size, as docs/experiments.md runs them: `dvc repro`, commit the
baseline (dvc.lock and metrics/), queue two values of one loss weight, `dvc queue start -j 1`;
then `dvc exp show` holds each experiment's headline, `dvc metrics diff` and `dvc plots diff`
compare them, MLflow's runs carry each experiment's name and changed param, and `dvc exp
apply` restores one. The pipeline is the CI profile made smaller still: one downstream set."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from pipeline_helpers import (
    GIT_IDENTITY,
    ROOT,
    dvc_executable,
    dvc_yaml_for,
    init_dvc_repository,
    sh,
    stage_environment,
    write_ci_params,
)

# A base run, then two of pretrain, evaluate and publish: 22 minutes on 2 cores shared with
# other jobs (load average about 10; the base run 8, the two experiments 14); a quiet machine
# takes a fraction of that.
pytestmark = [pytest.mark.slow, pytest.mark.system, pytest.mark.timeout(2400)]

STAGES = ("ingest", "reports", "similarity", "pretrain", "evaluate", "publish")
ONLY_SETS = ("phantom_classification",)
TINY = {
    "ingest.downstream.label_fractions": [0.1, 1.0],  # the headline: each init at 10 %
    "ingest.downstream.seeds": [0],
    "pretrain.optim.epochs": 1,
    "evaluate.localisation_images": 0,
    "publish.metric": "classification/phantom_classification/auroc@0.1",
}
WEIGHT = "pretrain.loss.intra_weight"
EXPERIMENTS = {"intra-0": 0, "intra-1": 1}  # the baseline's is 0.5


def exp_show(folder: Path, env: dict) -> dict[str, dict]:
    """`dvc exp show --json`: each experiment's params and metrics files by name."""
    shown = json.loads(sh([dvc_executable(), "exp", "show", "--json"], folder, env).stdout)
    found = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment["revs"]:
                data = rev["data"]
                found[rev["name"]] = {
                    "rev": rev["rev"],
                    "params": data["params"]["params.yaml"]["data"],
                    "metrics": {path: item.get("data") for path, item in data["metrics"].items()},
                    "errors": [path for path, item in data["metrics"].items() if "error" in item],
                }
    return found


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    folder = tmp_path_factory.mktemp("experiments")
    write_ci_params(folder, ONLY_SETS, **TINY)
    pipeline = dvc_yaml_for(STAGES)
    # A stand-in for the real dvc.yaml's code deps (components/..., pipeline/...), which sort
    # before data/ and are the same in every experiment: `dvc exp show` never folds the first
    # dep it lists, so without one the first changed input hash would stay in view at 120
    # columns and crowd out the changed param.
    (folder / "code_version.txt").write_text("the stage code\n")
    pipeline["stages"]["pretrain"]["deps"].insert(0, "code_version.txt")
    (folder / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    # The repository's: data/, mlflow.db and mlartifacts/ ignored, or git's status (which
    # `dvc exp` asks often) hashes gigabytes of models and checkpoints.
    shutil.copy(ROOT / ".gitignore", folder / ".gitignore")
    env = stage_environment(
        {
            # `dvc queue start` spawns its worker as `dvc` from PATH: this venv's.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            **GIT_IDENTITY,
        }
    )
    init_dvc_repository(folder, env, "pipeline")
    dvc = dvc_executable()
    sh([dvc, "repro"], folder, env, timeout=1200)
    sh(["git", "add", "dvc.lock", "metrics"], folder, env)  # what docs/experiments.md commits
    sh(["git", "commit", "-qm", "baseline"], folder, env)
    for name, value in EXPERIMENTS.items():
        sh([dvc, "exp", "run", "--queue", "-S", f"{WEIGHT}={value}", "-n", name], folder, env)
    started = time.monotonic()
    try:
        sh([dvc, "queue", "start", "-j", "1"], folder, env)
        while time.monotonic() - started < 1800:
            status = sh([dvc, "queue", "status"], folder, env).stdout
            if not any(word in status for word in ("Queued", "Running")):
                break
            time.sleep(5)
        seconds = time.monotonic() - started
        print(f"two queued experiments at CI size: {seconds:.0f} s")
        for name in EXPERIMENTS:  # a failed experiment's log says why
            line = next((s for s in status.splitlines() if f" {name} " in s), "")
            logs = sh([dvc, "queue", "logs", name], folder, env).stdout
            assert "Success" in line, status + logs[-4000:]
        yield {"folder": folder, "env": env, "shown": exp_show(folder, env), "seconds": seconds}
    finally:  # the queue's worker stops by itself once the queue is empty; after a failure, here
        subprocess.run([dvc, "queue", "stop", "--kill"], cwd=folder, env=env, capture_output=True)


def test_exp_show_holds_each_experiments_headline_and_they_differ_where_they_should(grid):
    shown = grid["shown"]
    assert set(EXPERIMENTS) <= set(shown)
    runs = [shown[name] for name in EXPERIMENTS]
    for run, value in zip(runs, EXPERIMENTS.values(), strict=True):
        assert not run["errors"]  # every metrics file is in the experiment's commit
        assert run["params"]["pretrain"]["loss"]["intra_weight"] == value
        assert set(run["metrics"]) == {"metrics/evaluate.json", "metrics/pretrain.json"}
        assert list(run["metrics"]["metrics/evaluate.json"]) == ["cls"]  # SISTA's, one task
    zero, one = [r["metrics"]["metrics/pretrain.json"] for r in runs]
    assert list(zero) == ["loss_sia", "flag_rate"]
    assert zero["loss_sia"] != one["loss_sia"]
    assert zero["flag_rate"] == one["flag_rate"]  # SIA's flags: the reports', not the model's
    zero, one = [r["metrics"]["metrics/evaluate.json"]["cls"] for r in runs]
    assert zero != one


def test_each_experiment_commits_every_inits_scores_and_the_loss_terms(grid):
    """metrics/full/, which `dvc exp show` does not list: in each experiment's commit."""
    folder, env = grid["folder"], grid["env"]
    dvc = dvc_executable()
    command = [dvc, "metrics", "diff", *EXPERIMENTS, "--json", "-R", "--targets", "metrics"]
    diff = json.loads(sh(command, folder, env).stdout)
    loss_intra = diff["metrics/full/pretrain.json"]["loss_intra"]
    assert loss_intra["old"] == 0 < loss_intra["new"]  # a zero weight skips the term
    scores = diff["metrics/full/evaluate.json"]
    assert set(scores) == {"cls.sista", "cls.dense"}  # both use the weight
    # ConVIRT pins the weight to 0 and a random init never pre-trains: the same scores.
    for name in EXPERIMENTS:
        experiment = grid["shown"][name]
        committed = f"{experiment['rev']}:metrics/full/evaluate.json"
        full = json.loads(sh(["git", "show", committed], folder, env).stdout)
        assert list(full["cls"]) == ["sista", "convirt", "dense", "random"]
        assert experiment["metrics"]["metrics/evaluate.json"]["cls"] == full["cls"]["sista"]


def test_only_changed_fits_120_columns_with_the_weight_and_the_headline_values_that_moved(grid):
    folder, env = grid["folder"], grid["env"]
    # What docs/experiments.md does once the grid is done: a queued experiment's State and
    # Executor columns are shown until its task is removed from the queue.
    sh([dvc_executable(), "queue", "remove", "--success"], folder, env)
    command = [dvc_executable(), "exp", "show", "--only-changed", "--no-pager"]
    table = sh(command, folder, {**env, "COLUMNS": "120"}).stdout.splitlines()
    assert max(len(line) for line in table) <= 120
    assert "!" not in "".join(table)
    # The changed weight and headline values in full; DVC folds what is right of them (the
    # input hashes) into `…`. flag_rate is not listed: the same in every row.
    header = table[1].split()
    assert header[:5] == ["Experiment", "Created", "loss_sia", "cls", WEIGHT], table
    for name, value in EXPERIMENTS.items():
        row = next(line for line in table if f"[{name}]" in line).split()
        shown = grid["shown"][name]["metrics"]
        loss_sia = shown["metrics/pretrain.json"]["loss_sia"]
        cls = shown["metrics/evaluate.json"]["cls"]
        position = row.index(f"{loss_sia:.5g}")
        assert row[position : position + 3] == [f"{loss_sia:.5g}", f"{cls:.5g}", str(value)], row


def test_metrics_diff_and_plots_diff_compare_the_experiments(grid, tmp_path):
    folder, env = grid["folder"], grid["env"]
    dvc = dvc_executable()
    diff = json.loads(sh([dvc, "metrics", "diff", *EXPERIMENTS, "--json"], folder, env).stdout)
    assert set(diff) == {"metrics/evaluate.json", "metrics/pretrain.json"}
    assert "cls" in diff["metrics/evaluate.json"] and "loss_sia" in diff["metrics/pretrain.json"]
    plots = sh(
        [dvc, "plots", "diff", "HEAD", *EXPERIMENTS, "--json", "-o", str(tmp_path / "plots")],
        folder,
        env,
    ).stdout
    history = json.loads(plots)["data"]["metrics/history/sista.json"][0]
    assert history["revisions"] == ["HEAD", *EXPERIMENTS]
    curves = {row["rev"] for row in history["content"]["data"]["values"]}
    assert curves == {"HEAD", *EXPERIMENTS}  # each revision's loss history, from git


def test_mlflow_runs_carry_the_experiments_name_and_changed_param(grid):
    """The queued experiments ran in temporary copies of the repository: their runs are in
    the repository's own store, tagged, so MLflow's compare view lines them up."""
    client = mlflow.MlflowClient(f"sqlite:///{grid['folder'] / 'mlflow.db'}")
    for stage in ("pretrain", "evaluate", "publish"):
        experiment = client.get_experiment_by_name(f"sista-{stage}")
        for name, value in EXPERIMENTS.items():
            runs = client.search_runs([experiment.experiment_id], f"tags.dvc_exp = '{name}'")
            assert runs, (stage, name)
            tags = runs[0].data.tags
            assert tags[f"dvc_param.{WEIGHT}"] == json.dumps(value)
            assert [k for k in tags if k.startswith("dvc_param.")] == [f"dvc_param.{WEIGHT}"]
        tagged = client.search_runs([experiment.experiment_id], "tags.dvc_exp LIKE '%'")
        every = client.search_runs([experiment.experiment_id])
        assert {run.data.tags["dvc_exp"] for run in tagged} == set(EXPERIMENTS)
        assert len(every) == 3 * len(tagged) / 2  # and `dvc repro`'s, without the tag


def test_exp_apply_restores_one_experiment_and_nothing_is_left_to_run(grid):
    """Last in this module: it changes the work folder."""
    folder, env = grid["folder"], grid["env"]
    dvc = dvc_executable()
    sh([dvc, "exp", "apply", "intra-1"], folder, env)
    assert yaml.safe_load((folder / "params.yaml").read_text())["pretrain"]["loss"] == {
        "sia_weight": 1.0,
        "sta_weight": 1.0,
        "intra_weight": 1,
    }
    headline = json.loads((folder / "metrics" / "evaluate.json").read_text())
    assert headline == grid["shown"]["intra-1"]["metrics"]["metrics/evaluate.json"]
    status = subprocess.run(
        [dvc, "status"], cwd=folder, env=env, capture_output=True, text=True, timeout=300
    )
    assert "Data and pipelines are up to date" in status.stdout, status.stdout + status.stderr
    assert (folder / "data" / "pretrain" / "sista" / "_stage.json").is_file()
