"""Promotion moves @champion only when the candidate is better (both outcomes, real registry),
and refuses, moving nothing, when the champion's score cannot be read."""

import os
import shutil

import mlflow
import pytest

from components.config import Params
from components.publish import (
    PromotionRefused,
    metric_value,
    promote_if_better,
    results_markdown,
    should_promote,
)


def test_should_promote_rules():
    assert should_promote(0.7, None, higher_is_better=True)
    assert should_promote(0.71, 0.70, higher_is_better=True)
    assert not should_promote(0.70, 0.70, higher_is_better=True)
    assert not should_promote(0.69, 0.70, higher_is_better=True)
    assert should_promote(0.1, 0.2, higher_is_better=False)
    assert not should_promote(float("nan"), None, higher_is_better=True)  # nothing to rank


SCORES = {
    "sista": {
        "0.01": {"mean": 0.71, "std": 0.01, "n": 3},
        "1": {"mean": 0.8, "std": 0.0, "n": 3},
    },
    "random": {
        "0.01": {"mean": 0.6, "std": 0.02, "n": 3},
        "1": {"mean": 0.7, "std": 0.0, "n": 3},
    },
}
SUMMARY = {
    "classification": {
        "chexpert": {"images": "real", "auroc": SCORES},
        "phantom_classification": {"images": "phantom", "auroc": SCORES},
    },
    "retrieval": {
        "pretrain": {
            "images": "real",
            "image_to_text_recall_at_1": {"sista": {"0": {"mean": 0.12, "std": 0.0, "n": 1}}},
            "text_to_image_recall_at_1": {"sista": {"0": {"mean": 0.1, "std": 0.0, "n": 1}}},
        }
    },
    "heatmap_localisation": {
        "num_images": 40,
        "rate": 0.55,
        "majority_rate": 0.1,
        "uniform_majority_rate": 0.0,
        "mean_mass_in_mask": 0.2,
        "mean_uniform_mass": 0.1,
        "pointing_game": 0.5,
        "uniform_pointing": 0.2,
        "per_finding": {
            "Nodule": {"num_images": 40, "pointing_game": 0.5, "uniform_pointing": 0.2}
        },
        "dense": {
            "pointing_game": 0.25,
            "per_finding": {"Nodule": {"pointing_game": 0.25}},
        },
    },
}


def test_metric_value_and_table():
    assert metric_value(SUMMARY, "classification/chexpert/auroc@0.01") == 0.71
    with pytest.raises(KeyError, match="classification/siim/auroc@0.01"):
        metric_value(SUMMARY, "classification/siim/auroc@0.01")
    table = results_markdown(SUMMARY)
    blocks = table.split("### ")
    chexpert = next(b for b in blocks if b.startswith("classification · chexpert (real images)"))
    assert "| init | 1 % | 100 % |" in chexpert
    assert "| sista | 0.710 ± 0.010 | 0.800 ± 0.000 |" in chexpert
    phantom = next(b for b in blocks if b.startswith("classification · phantom_classification"))
    assert "PHANTOM images" in phantom
    assert "| init (no labels) | image_to_text_recall_at_1 | text_to_image_recall_at_1 |" in table
    assert "| sista | 0.120 | 0.100 |" in table
    assert "inside the finding's mask on 10% of them (a uniform map: 0%)" in table
    assert "| finding | images | SISTA | dense | uniform patch |" in table
    assert "| Nodule | 40 | 0.50 | 0.25 | 0.20 |" in table


@pytest.fixture(scope="module")
def empty_registry(tmp_path_factory):
    """A store holding the model ``sista-encoder`` and no version, made once: creating the
    SQLite schema is most of a registry test's time."""
    folder = tmp_path_factory.mktemp("registry")
    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    client.create_registered_model("sista-encoder")
    experiment = client.create_experiment("x", artifact_location=(folder / "a").as_uri())
    return folder / "mlflow.db", experiment


@pytest.fixture
def registry(empty_registry, tmp_path, monkeypatch):
    template, experiment = empty_registry
    shutil.copyfile(template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(uri)

    def new_candidate() -> str:
        run = client.create_run(experiment)
        version = client.create_model_version(
            "sista-encoder", f"{run.info.artifact_uri}/model", run.info.run_id
        )
        client.set_registered_model_alias("sista-encoder", "candidate", version.version)
        return version.version

    return client, new_candidate


def test_a_better_candidate_becomes_champion_and_a_worse_one_does_not(registry):
    client, new_candidate = registry
    params = Params()
    first = new_candidate()
    assert promote_if_better(params, 0.70)["promoted"]
    assert client.get_model_version_by_alias("sista-encoder", "champion").version == first

    worse = new_candidate()
    decision = promote_if_better(params, 0.65)
    assert not decision["promoted"] and decision["champion_score_before"] == 0.70
    assert (decision["model"], decision["metric"]) == ("sista-encoder", params.publish_metric())
    assert (decision["candidate_version"], decision["candidate_score"]) == (worse, 0.65)
    assert client.get_model_version_by_alias("sista-encoder", "champion").version == first
    assert client.get_model_version("sista-encoder", worse).tags["score"] == "0.65"

    better = new_candidate()
    assert promote_if_better(params, 0.75)["promoted"]
    assert client.get_model_version_by_alias("sista-encoder", "champion").version == better


def champion_version(client) -> str:
    return str(client.get_model_version_by_alias("sista-encoder", "champion").version)


@pytest.mark.parametrize(
    ("higher_is_better", "score", "promoted"),
    [
        (True, 0.75, True),
        (True, 0.70, False),  # a tie keeps the champion
        (True, 0.65, False),
        (False, 0.65, True),  # e.g. an error rate: lower is better
        (False, 0.70, False),
        (False, 0.75, False),
    ],
)
def test_only_a_strictly_better_candidate_takes_champion(
    registry, higher_is_better, score, promoted
):
    client, new_candidate = registry
    params = Params(publish={"higher_is_better": higher_is_better})
    first = new_candidate()
    assert promote_if_better(params, 0.70)["promoted"]
    second = new_candidate()
    decision = promote_if_better(params, score)
    assert decision["promoted"] is promoted
    assert decision["champion_score_before"] == 0.70
    assert str(decision["champion_version_before"]) == str(first)
    assert champion_version(client) == str(second if promoted else first)


@pytest.mark.parametrize("tag", [None, "", "n/a", "nan"])
def test_a_champion_without_a_readable_score_is_never_replaced(registry, tag):
    """An untagged champion used to read as "no champion": any candidate, even one scoring
    0.01, took its place."""
    client, new_candidate = registry
    first = new_candidate()
    client.set_registered_model_alias("sista-encoder", "champion", first)
    if tag is not None:
        client.set_model_version_tag("sista-encoder", first, "score", tag)
    new_candidate()
    with pytest.raises(PromotionRefused) as refused:
        promote_if_better(Params(), 0.01)
    message = str(refused.value)
    assert "'sista-encoder'" in message and f"version {first}" in message
    assert "'score'" in message and "not moved" in message
    assert champion_version(client) == str(first)


class RegistryDown(mlflow.exceptions.MlflowException):
    pass


@pytest.mark.parametrize(
    ("failing", "error", "doing"),
    [
        ("get_registered_model", RegistryDown("503"), "reading @candidate and @champion"),
        ("get_model_version", OSError("connection reset"), "reading @candidate and @champion"),
        ("get_model_version_by_alias", RegistryDown("503"), "reading @candidate and @champion"),
        ("set_model_version_tag", OSError("reset"), "reading @candidate and @champion"),
        ("set_registered_model_alias", RegistryDown("503"), "moving @champion to version"),
    ],
)
def test_a_failing_registry_refuses_to_promote(registry, monkeypatch, failing, error, doing):
    client, new_candidate = registry
    first = new_candidate()
    client.set_registered_model_alias("sista-encoder", "champion", first)
    client.set_model_version_tag("sista-encoder", first, "score", "0.70")
    new_candidate()

    def fail(*args, **kwargs):
        raise error

    # The real client against the real store, with one call failing the way a server does.
    failing_client = type("FailingClient", (mlflow.MlflowClient,), {failing: fail})
    monkeypatch.setattr(mlflow, "MlflowClient", failing_client)
    with pytest.raises(PromotionRefused, match=r"'sista-encoder': the registry failed") as refused:
        promote_if_better(Params(), 0.99)
    assert refused.value.__cause__ is error
    assert f"while {doing}" in str(refused.value)
    assert champion_version(client) == str(first)


def test_a_refused_promotion_fails_the_stage_with_its_message(monkeypatch, capsys):
    import components.publish as publish

    def refuse(*args):
        raise PromotionRefused("registered model 'sista-encoder' version 3: no score")

    monkeypatch.setattr(publish, "stage_main", refuse)
    with pytest.raises(SystemExit) as exit_:
        publish.main([])
    assert exit_.value.code == 1
    assert (
        capsys.readouterr().err == "publish: registered model 'sista-encoder' version 3: no score\n"
    )


def test_without_the_environment_variable_the_gate_reads_the_registry_params_name(
    registry, tmp_path, monkeypatch
):
    client, new_candidate = registry
    first = new_candidate()
    params = Params.model_validate({"mlflow": {"tracking_uri": os.environ["MLFLOW_TRACKING_URI"]}})
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)  # MLflow's own default store would be here, and empty
    assert promote_if_better(params, 0.7)["promoted"]
    assert champion_version(client) == str(first)
