"""What DVC compares experiments by: evaluate's scores and headline, the files the launcher
exports into metrics/ (git-tracked, dvc.yaml's `cache: false` metrics, plots and outs), and
the MLflow tags and store of a run inside `dvc exp run`. The experiments themselves:
test_dvc_experiments.py."""

import json
import subprocess

import yaml

from components.platform.config import Params, load_params
from components.platform.stage_storage import export_tracked
from components.platform.tracking import dvc_experiment_store, dvc_experiment_tags
from components.stages.evaluate import headline, scores_at_smallest_fraction
from pipeline.launch import export_for_dvc


def score(mean: float) -> dict:
    return {"mean": mean, "std": 0.0, "n": 1}


def test_the_scores_are_each_inits_score_at_the_smallest_fraction_per_trained_task_and_set():
    by_init = {
        init: {"0.01": score(base), "0.1": score(base + 0.1), "1": score(base + 0.2)}
        for init, base in (("convirt", 0.5), ("random", 0.4), ("sista", 0.612345))
    }
    summary = {
        "classification": {"chexpert": {"images": "real", "auroc": by_init}},
        "segmentation": {
            "phantom_pneumothorax": {"images": "phantom", "dice": by_init},
            "phantom_opacity": {"images": "phantom", "dice": by_init},
        },
        "detection": {
            "rsna": {"images": "real", "map_40_75": by_init, "map_50": by_init},
            "rsna_detection": {"images": "real", "map_40_75": by_init, "map_50": by_init},
        },
        "zero_shot": {"chexpert": {"images": "real", "auroc": {"sista": {"0": score(0.7)}}}},
    }
    tracked = scores_at_smallest_fraction(summary, ["sista", "convirt", "random"])
    # One set: the task's code alone; several: the code and the set, less the name start the
    # sets share up to an underscore. No language tasks.
    assert list(tracked) == [
        "cls",
        "seg/pneumothorax",
        "seg/opacity",
        "det/rsna",
        "det/rsna_detection",
    ]
    assert tracked["cls"] == {"sista": 0.6123, "convirt": 0.5, "random": 0.4}
    assert list(tracked["seg/opacity"]) == ["sista", "convirt", "random"]  # the inits' order


def test_the_headline_is_sistas_score_per_task_averaged_over_the_tasks_sets():
    scores = {
        "cls": {"sista": 0.61234, "convirt": 0.9},
        "seg/pneumothorax": {"sista": 0.2, "convirt": 0.9},
        "seg/opacity": {"sista": 0.4, "convirt": 0.9},
        "det/rsna": {"sista": 0.01, "convirt": 0.9},
        "det/object_cxr": {"sista": 0.03, "convirt": 0.9},
        "det/siim": {"sista": 0.05, "convirt": 0.9},
    }
    assert headline(scores) == {"cls": 0.6123, "seg": 0.3, "det": 0.03}
    assert headline(scores, "convirt") == {"cls": 0.9, "seg": 0.9, "det": 0.9}
    # Without SISTA (`evaluate.inits: [random]`): the first init scored.
    assert headline({"cls": {"random": 0.5, "dense": 0.7}}) == {"cls": 0.5}


def write_stage_outputs(data):
    for variant, loss in (("sista", 3.0), ("convirt", 2.0), ("dense", 2.5)):
        folder = data / "pretrain" / variant
        folder.mkdir(parents=True)
        history = [{"step": step, "loss": loss - step / 10} for step in (5, 10)]
        (folder / "history.json").write_text(json.dumps(history, indent=1))
        metrics = {
            "epoch": 1,
            "epoch_loss_sia": 1.23456,
            "epoch_loss_sta": 0.5,
            "epoch_loss_intra": 0.25,
            "epoch_fraction_negatives_eliminated": 0.0125,
            "epoch_samples_per_s": 40.0,
        }
        (folder / "metrics.json").write_text(json.dumps(metrics))
    (data / "evaluate").mkdir()
    (data / "evaluate" / "headline.json").write_text('{"cls": 0.6}\n')
    (data / "evaluate" / "scores.json").write_text('{"cls": {"sista": 0.6, "random": 0.5}}\n')


def test_the_launcher_exports_the_headline_loss_terms_and_histories_into_metrics(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"storage": {"uri": str(tmp_path)}}))
    params = load_params(tmp_path / "params.yaml")
    write_stage_outputs(tmp_path)
    out = tmp_path / "repo"
    metrics = out / "metrics"
    assert export_tracked(params, "evaluate", root=out) == [
        metrics / "evaluate.json",
        metrics / "full" / "evaluate.json",
    ]
    assert json.loads((metrics / "evaluate.json").read_text()) == {"cls": 0.6}
    full = json.loads((metrics / "full" / "evaluate.json").read_text())
    assert full == {"cls": {"sista": 0.6, "random": 0.5}}

    written = export_tracked(params, "pretrain", root=out)
    assert sorted(p.relative_to(metrics).as_posix() for p in written) == [
        "full/pretrain.json",
        "history/convirt.json",
        "history/dense.json",
        "history/sista.json",
        "pretrain.json",
    ]
    assert json.loads((metrics / "full" / "pretrain.json").read_text()) == {
        "loss_sia": 1.2346,
        "loss_sta": 0.5,
        "loss_intra": 0.25,
        "flag_rate": 0.0125,
    }
    assert json.loads((metrics / "pretrain.json").read_text()) == {
        "loss_sia": 1.2346,
        "flag_rate": 0.0125,
    }
    lines = (metrics / "history" / "dense.json").read_text().splitlines()
    assert lines == ["[", '{"step": 5, "loss": 2.0},', '{"step": 10, "loss": 1.5}', "]"]
    assert not list(metrics.rglob(".*.tmp"))

    written = export_tracked(params, "pretrain", "convirt", root=out)  # --variant convirt
    assert written == [metrics / "history" / "convirt.json"]
    assert export_tracked(params, "publish", root=out) == []


def test_the_launcher_exports_only_when_dvc_runs_it(tmp_path, monkeypatch):
    """A Kubeflow step or a RayJob may run in a read-only folder: nothing written there."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"storage": {"uri": str(tmp_path)}}))
    params = load_params(tmp_path / "params.yaml")
    write_stage_outputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    export_for_dvc(params, "evaluate", [])
    assert not (tmp_path / "metrics").exists()
    monkeypatch.setenv("DVC_STAGE", "evaluate")  # what DVC sets for a stage's command
    export_for_dvc(params, "pretrain", ["--variant", "dense"])
    assert [p.name for p in (tmp_path / "metrics").rglob("*.json")] == ["dense.json"]


def git(folder, *args):
    environment = {
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.invalid",
        "PATH": "/usr/bin:/bin:/usr/local/bin",
    }
    result = subprocess.run(
        ["git", *args], cwd=folder, env=environment, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def test_runs_inside_a_dvc_experiment_are_tagged_with_its_name_and_changed_params(
    tmp_path, monkeypatch
):
    params = {"pretrain": {"loss": {"sia_weight": 1.0, "intra_weight": 0.5}, "epochs": 1}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "params.yaml")
    git(tmp_path, "commit", "-qm", "baseline")
    baseline = git(tmp_path, "rev-parse", "HEAD")
    params["pretrain"]["loss"]["intra_weight"] = 0
    params["pretrain"]["sta"] = {"sparse": "softmax"}  # a key the baseline does not have
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert dvc_experiment_tags() == {}  # `dvc repro`, or no DVC at all

    monkeypatch.setenv("DVC_EXP_NAME", "intra-0")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", baseline)
    assert dvc_experiment_tags() == {
        "dvc_exp": "intra-0",
        "dvc_baseline": baseline,
        "dvc_param.pretrain.loss.intra_weight": "0",
        "dvc_param.pretrain.sta.sparse": "softmax",
    }
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0" * 40)  # not in this repository
    assert dvc_experiment_tags() == {"dvc_exp": "intra-0", "dvc_baseline": "0" * 40}


def test_a_queued_experiment_logs_to_the_repositorys_mlflow_store(tmp_path, monkeypatch):
    params = Params()
    executor = tmp_path / ".dvc" / "tmp" / "exps" / "tmp1234"
    executor.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(executor)  # where DVC runs a queued experiment's stages
    moved = dvc_experiment_store(params).mlflow
    assert moved.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert moved.artifact_root == str(tmp_path / "mlartifacts")

    monkeypatch.chdir(tmp_path)  # `dvc repro` or a workspace `dvc exp run`: nothing moves
    assert dvc_experiment_store(params) == params
    monkeypatch.chdir(executor)
    served = params.mlflow.model_copy(
        update={"tracking_uri": "http://mlflow:5000", "artifact_root": "s3://b/mlflow"}
    )
    server = params.model_copy(update={"mlflow": served})
    assert dvc_experiment_store(server).mlflow == served
