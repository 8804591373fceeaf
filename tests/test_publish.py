"""Promotion moves @champion only when the candidate is better (both outcomes, real registry):
beyond the paired-bootstrap noise on the same test images (the default gate) or strictly
(``publish.gate: strict``), and refuses, moving nothing, when the champion cannot be compared
with (no readable score, no gate outputs, other test images, a failing registry)."""

import os
import shutil

import mlflow
import numpy as np
import pytest

from components.platform.config import Params
from components.stages.paired_bootstrap import Difference
from components.stages.publish import (
    PromotionRefused,
    beats_beyond_noise,
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


# What pre-training tags a version with, and a tag that is not lineage.
LINEAGE_TAGS = {"lineage.data": "d1", "lineage.params": "p1", "lineage.code": "c1", "team": "x"}


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
            "sista-encoder", f"{run.info.artifact_uri}/model", run.info.run_id, tags=LINEAGE_TAGS
        )
        client.set_registered_model_alias("sista-encoder", "candidate", version.version)
        return version.version

    return client, new_candidate


STRICT = {"gate": "strict"}


def test_a_better_candidate_becomes_champion_and_a_worse_one_does_not(registry):
    client, new_candidate = registry
    params = Params(publish=STRICT)
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
    params = Params(publish={**STRICT, "higher_is_better": higher_is_better})
    first = new_candidate()
    assert promote_if_better(params, 0.70)["promoted"]
    second = new_candidate()
    decision = promote_if_better(params, score)
    assert decision["promoted"] is promoted
    assert decision["gate"] == "strict"
    assert decision["rule"] == f"strictly {'higher' if higher_is_better else 'lower'} score"
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
        promote_if_better(Params(publish=STRICT), 0.01)
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
        promote_if_better(Params(publish=STRICT), 0.99)
    assert refused.value.__cause__ is error
    assert f"while {doing}" in str(refused.value)
    assert champion_version(client) == str(first)


def test_a_refused_promotion_fails_the_stage_with_its_message(monkeypatch, capsys):
    import components.stages.publish as publish

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
    params = Params.model_validate(
        {"mlflow": {"tracking_uri": os.environ["MLFLOW_TRACKING_URI"]}, "publish": STRICT}
    )
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # MLflow's default store would be here, empty
    assert promote_if_better(params, 0.7)["promoted"]
    assert champion_version(client) == str(first)


# --- the bootstrap gate: the candidate's test outputs against the champion's ---


def test_the_bootstrap_rule_needs_the_interval_on_the_better_side():
    assert beats_beyond_noise(Difference(0.05, 0.01, 0.09, 1000), higher_is_better=True)
    assert not beats_beyond_noise(Difference(0.05, -0.01, 0.09, 1000), higher_is_better=True)
    assert not beats_beyond_noise(Difference(0.0, 0.0, 0.0, 1000), higher_is_better=True)
    assert beats_beyond_noise(Difference(-0.05, -0.09, -0.01, 1000), higher_is_better=False)
    assert not beats_beyond_noise(Difference(-0.05, -0.09, 0.0, 1000), higher_is_better=False)
    assert not beats_beyond_noise(Difference(0.05, 0.0, 0.09, 1000), higher_is_better=True)
    assert not beats_beyond_noise(Difference(0.05, 0.01, 0.09, 1000), higher_is_better=False)
    nan = float("nan")
    assert not beats_beyond_noise(Difference(0.05, nan, nan, 0), higher_is_better=True)
    assert not beats_beyond_noise(Difference(-0.05, nan, nan, 0), higher_is_better=False)


TEST_IDS = [f"patient{i:03d}/study1/view1" for i in range(300)]
LABELS = (np.random.default_rng(0).random((300, 3)) < 0.4).astype(np.float32)


def gate_outputs(path, strength: float, model: int = 0, ids=TEST_IDS, seeds=(0, 1, 2)):
    """evaluate's gate_outputs.npz for a probe whose logits are ``strength`` x the labels plus
    noise, most of it shared by every model (the images that are hard stay hard) and some of
    it the model's own."""
    arrays = {"metric": np.array("auroc"), "test_ids": np.array(ids), "seeds": np.array(seeds)}
    arrays["labels"] = LABELS
    for seed in seeds:
        shared = np.random.default_rng(100 + seed).normal(size=LABELS.shape)
        own = np.random.default_rng(1000 * model + seed).normal(size=LABELS.shape)
        arrays[f"logits.{seed}"] = (LABELS * strength + 0.8 * shared + 0.6 * own).astype(np.float32)
    np.savez(path, **arrays)
    return path


def champion_run_artifacts(client) -> list[str]:
    version = client.get_model_version_by_alias("sista-encoder", "champion")
    return [f.path for f in client.list_artifacts(version.run_id, "gate")]


@pytest.mark.parametrize(
    ("higher_is_better", "strength", "promoted"),
    [
        (True, 3.0, True),  # clearly better on the same images
        (True, 1.03, False),  # a higher score, within noise: the champion stays
        (True, 1.0, False),  # the same outputs: a tie
        (True, 0.3, False),
        (False, 0.3, True),  # lower is better: a clearly lower score
        (False, 1.03, False),
    ],
)
def test_the_bootstrap_gate_promotes_only_beyond_noise(
    registry, tmp_path, monkeypatch, higher_is_better, strength, promoted
):
    client, new_candidate = registry
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # nothing is left in the working folder
    params = Params(publish={"higher_is_better": higher_is_better})
    first = new_candidate()
    decision = promote_if_better(params, 0.70, gate_outputs(tmp_path / "first.npz", 1.0))
    assert decision["promoted"] and decision["rule"] == "first champion"
    assert decision["gate"] == "bootstrap"
    assert decision["lineage"] == {k: v for k, v in LINEAGE_TAGS.items() if k != "team"}
    assert champion_run_artifacts(client) == ["gate/gate_outputs.npz"]
    second = new_candidate()
    score = 0.70 + (strength - 1.0) / 10  # what the score tags alone would say
    # Another model (its own noise), but the very same outputs for the tie.
    model = 0 if strength == 1.0 else 1
    second_outputs = gate_outputs(tmp_path / "second.npz", strength, model)
    decision = promote_if_better(params, score, second_outputs)
    assert decision["promoted"] is promoted
    assert champion_version(client) == str(second if promoted else first)
    low, high = decision["interval"]
    assert low <= decision["difference"] <= high
    side = "above" if higher_is_better else "below"
    assert f"must lie {side} 0" in decision["rule"] and "300 test images" in decision["rule"]
    tags = client.get_model_version("sista-encoder", second).tags
    assert tags["gate.promoted"] == str(promoted) and tags["gate.rule"] == decision["rule"]
    assert tags["gate.interval"] == str([low, high])
    assert tags["gate.difference"] == str(decision["difference"])
    if strength == 1.0:
        assert (decision["difference"], low, high) == (0.0, 0.0, 0.0)
    assert not list((tmp_path / "work").iterdir())


def test_a_near_tie_that_the_score_rule_would_promote_is_kept_out(registry, tmp_path):
    """The case the gate exists for: 0.001 better on the score, nothing beyond noise."""
    client, new_candidate = registry
    first = new_candidate()
    promote_if_better(Params(), 0.700, gate_outputs(tmp_path / "a.npz", 1.0))
    new_candidate()
    assert should_promote(0.701, 0.700, higher_is_better=True)
    decision = promote_if_better(Params(), 0.701, gate_outputs(tmp_path / "b.npz", 1.01, 1))
    assert not decision["promoted"] and decision["interval"][0] < 0 < decision["interval"][1]
    assert champion_version(client) == str(first)


def refused_against(registry, tmp_path, champion_outputs, candidate_outputs) -> str:
    client, new_candidate = registry
    first = new_candidate()
    client.set_registered_model_alias("sista-encoder", "champion", first)
    client.set_model_version_tag("sista-encoder", first, "score", "0.70")
    if champion_outputs is not None:
        run_id = client.get_model_version("sista-encoder", first).run_id
        client.log_artifact(run_id, str(champion_outputs), "gate")
    new_candidate()
    with pytest.raises(PromotionRefused) as refused:
        promote_if_better(Params(), 0.99, candidate_outputs)
    assert champion_version(client) == str(first)
    return str(refused.value)


def test_a_champion_without_gate_outputs_is_not_replaced(registry, tmp_path):
    message = refused_against(registry, tmp_path, None, gate_outputs(tmp_path / "c.npz", 3.0))
    assert "version 1 holds @champion" in message and "beyond noise" in message
    assert "publish.gate: strict" in message and "not moved" in message


def test_a_champion_scored_on_other_test_images_is_not_replaced(registry, tmp_path):
    (tmp_path / "gate").mkdir()
    ids = TEST_IDS[:299] + ["x"]
    other = gate_outputs(tmp_path / "gate" / "gate_outputs.npz", 1.0, ids=ids)
    message = refused_against(registry, tmp_path, other, gate_outputs(tmp_path / "c.npz", 3.0))
    assert "other test images (2 of 300 / 300 differ)" in message


def test_without_evaluates_gate_outputs_nothing_moves(registry, tmp_path):
    message = refused_against(registry, tmp_path, None, tmp_path / "missing.npz")
    assert "needs evaluate's gate_outputs.npz" in message


def test_a_candidate_without_a_score_is_kept_out_whatever_its_outputs(registry, tmp_path):
    client, new_candidate = registry
    first = new_candidate()
    promote_if_better(Params(), 0.70, gate_outputs(tmp_path / "a.npz", 1.0))
    new_candidate()
    decision = promote_if_better(Params(), float("nan"), gate_outputs(tmp_path / "b.npz", 3.0))
    assert not decision["promoted"]
    assert decision["rule"] == "a candidate score that is not a number never promotes"
    assert champion_version(client) == str(first)


def test_a_registry_failing_while_the_champions_outputs_are_read_refuses(
    registry, tmp_path, monkeypatch
):
    client, new_candidate = registry
    first = new_candidate()
    promote_if_better(Params(), 0.70, gate_outputs(tmp_path / "a.npz", 1.0))
    new_candidate()
    calls = []
    real = mlflow.MlflowClient.get_model_version

    def fail_the_second_read(self, name, version):
        calls.append(version)
        if len(calls) == 2:  # the first reads @champion's score, the second its run
            raise RegistryDown("503")
        return real(self, name, version)

    monkeypatch.setattr(mlflow.MlflowClient, "get_model_version", fail_the_second_read)
    with pytest.raises(PromotionRefused) as refused:
        promote_if_better(Params(), 0.99, gate_outputs(tmp_path / "b.npz", 3.0, 1))
    assert str(refused.value).startswith(
        "registered model 'sista-encoder': the registry failed while reading the gate outputs "
        f"of version {first}"
    )
    assert champion_version(client) == str(first)


def test_a_registry_failing_while_the_decision_is_tagged_moves_nothing(registry, monkeypatch):
    client, new_candidate = registry
    first = new_candidate()
    promote_if_better(Params(publish=STRICT), 0.70)
    second = new_candidate()
    real = mlflow.MlflowClient.set_model_version_tag

    def fail_on_the_gates_tags(self, name, version, key, value):
        if key.startswith("gate."):
            raise RegistryDown("503")
        return real(self, name, version, key, value)

    monkeypatch.setattr(mlflow.MlflowClient, "set_model_version_tag", fail_on_the_gates_tags)
    with pytest.raises(PromotionRefused) as refused:
        promote_if_better(Params(publish=STRICT), 0.99)
    assert str(refused.value).startswith(
        f"registered model 'sista-encoder': the registry failed while tagging version {second} "
        "with the gate's decision"
    )
    assert champion_version(client) == str(first)
