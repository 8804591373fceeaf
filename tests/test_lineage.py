"""Lineage (components/platform/lineage.py): the data hash follows the sources' listing (a new
study, a replaced image) and nothing else, the params hash follows what is computed and not where it
runs, and the scheduled run's comparison reads the last finished publish run in a real store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest

from components.platform import lineage
from components.platform.config import Params
from components.platform.stage_storage import atomic_output_dir
from components.platform.tracking import experiment_for


def mimic_params(source: Path, chexpert: Path | None = None, **sections) -> Params:
    sets = {k: v.model_dump() for k, v in Params().ingest.downstream.sets.items()}
    if chexpert is not None:
        sets["chexpert"] = {"adapter": "chexpert", "path": str(chexpert)}
    ingest = {"source": "mimic_cxr", "source_path": str(source), "downstream": {"sets": sets}}
    return Params.model_validate({"ingest": ingest, **sections})


@pytest.fixture
def source(tmp_path) -> Path:
    folder = tmp_path / "mimic" / "files" / "p10" / "p10000032"
    folder.mkdir(parents=True)
    (folder / "s50414267.txt").write_text("FINDINGS: clear lungs.")
    (folder / "s50414267").mkdir()
    (folder / "s50414267" / "view1.jpg").write_bytes(b"\xff\xd8 one image")
    return tmp_path / "mimic"


def test_the_data_hash_follows_the_listing_of_every_source(source, tmp_path):
    chexpert = tmp_path / "chexpert"
    chexpert.mkdir()
    (chexpert / "valid.csv").write_text("Path,Sex\n")
    params = mimic_params(source, chexpert)
    assert lineage.source_paths(params) == sorted([str(source), str(chexpert)])
    first = lineage.current(params)
    listing = lineage.source_listing(params)
    assert first.sources == len(listing) == 3 + len(lineage.EMBEDDED_PACKAGES)
    assert lineage.current(params) == first  # listing again (reading) changes nothing

    study = source / "files" / "p10" / "p10000032" / "s50414267"
    (study / "view2.jpg").write_bytes(b"\xff\xd8 a new image")  # a new study's image
    second = lineage.current(params)
    assert second.data != first.data and second.sources == first.sources + 1
    assert (second.params, second.code) == (first.params, first.code)
    (chexpert / "valid.csv").write_text("Path,Sex\nx.jpg,F\n")  # a replaced table
    assert lineage.current(params).data != second.data
    assert second.changes_from(first) == ["data"] and first.changes_from(None) == [
        "data",
        "params",
        "code",
    ]


def test_a_missing_or_empty_source_is_named(source, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"source folder {tmp_path / 'gone'} does not"):
        lineage.current(mimic_params(tmp_path / "gone"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="lists no file"):
        lineage.current(mimic_params(tmp_path / "empty"))


def test_the_params_hash_follows_what_is_computed_not_where(source):
    base = lineage.params_hash(mimic_params(source))
    moved = mimic_params(
        source,
        storage={"uri": "s3://bucket/sista"},
        ray={"address": "http://head:8265"},
        mlflow={"tracking_uri": "http://mlflow:5000"},
    )
    assert lineage.params_hash(moved) == base
    weighted = mimic_params(source, pretrain={"loss": {"sta_weight": 0.5}})
    assert lineage.params_hash(weighted) != base


def test_the_code_version_follows_a_changed_source_file(tmp_path):
    root = tmp_path / "project"
    for folder in lineage.CODE_FOLDERS:
        shutil.copytree(lineage.PROJECT_ROOT / folder, root / folder)
    for name in lineage.CODE_FILES:
        shutil.copyfile(lineage.PROJECT_ROOT / name, root / name)
    before = lineage.code_version(root)
    assert before == lineage.code_version(lineage.PROJECT_ROOT)  # where it lies plays no part
    loss = root / "sista_core" / "losses" / "sia.py"
    loss.write_text(loss.read_text() + "\n# one more line\n")
    assert lineage.code_version(root) != before


def test_the_embedded_source_is_named_by_its_packages():
    listing = lineage.source_listing(Params())
    assert [line.split("\t")[0] for line in listing] == list(lineage.EMBEDDED_PACKAGES)
    assert all("not installed" not in line for line in listing)


def publish_run(params: Params, tags: dict[str, str], status: str = "FINISHED") -> str:
    experiment_for(params, "publish")
    with mlflow.start_run(run_name="publish") as run:
        mlflow.set_tags(tags)
    mlflow.MlflowClient().set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture
def checked(source, tmp_path, monkeypatch):
    """MIMIC params with their own SQLite store, written to a params file: (params, file, store)."""
    store = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    store["artifact_root"] = str(tmp_path / "artifacts")
    params = mimic_params(source, mlflow=store)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(params.model_dump_json())  # JSON is YAML
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return params, params_file, store


def test_the_scheduled_check_compares_with_the_last_finished_publish(
    source, checked, tmp_path, capsys
):
    params, params_file, store = checked

    assert lineage.main(["--params", str(params_file)]) == 0
    assert "(no finished run yet)" in capsys.readouterr().out

    now = lineage.current(params)
    run_id = publish_run(params, now.tags())
    publish_run(params, {}, status="FAILED")  # newer, but it did not finish
    out = tmp_path / "compare.json"
    assert lineage.main(["--params", str(params_file), "--out", str(out), "--record"]) == 3
    assert f"nothing changed since run {run_id}" in capsys.readouterr().out
    assert lineage.last_finished(params) == (run_id, now)
    assert json.loads(out.read_text())["changed"] == []
    client = mlflow.MlflowClient(store["tracking_uri"])
    schedule = client.get_experiment_by_name("sista-schedule")
    (skipped,) = client.search_runs([schedule.experiment_id])
    assert skipped.info.run_name == "skipped" and skipped.info.status == "FINISHED"
    assert skipped.data.tags["schedule.compared_with"] == run_id
    assert skipped.data.tags["lineage.data"] == now.data

    study = source / "files" / "p10" / "p10000032" / "s50414268.txt"
    study.write_text("FINDINGS: a new study.")
    assert lineage.main(["--params", str(params_file)]) == 0
    assert f"changed since run {run_id}: data" in capsys.readouterr().out


def test_the_registered_lineage_is_ingests_listing_with_the_current_params(source, tmp_path):
    params = mimic_params(source, storage={"uri": str(tmp_path / "data")})
    with pytest.raises(FileNotFoundError):
        lineage.of_ingested(params)
    listed = lineage.current(params)
    info = {"lineage": {"data": listed.data, "sources": listed.sources}}
    with atomic_output_dir(tmp_path / "data" / "ingest", "ingest", info) as (folder, _):
        (folder / "manifest.parquet").write_bytes(b"")
    (source / "files" / "new.txt").write_text("added after ingest read")
    recorded = lineage.of_ingested(params)
    assert (recorded.data, recorded.sources) == (listed.data, listed.sources)
    assert recorded.params == lineage.params_hash(params)


NOW = lineage.Lineage(data="d2", params="p", code="c", sources=3)
BEFORE = lineage.Lineage(data="d1", params="p", code="c", sources=2)


@pytest.mark.parametrize(
    ("before", "champion", "start", "decision"),
    [
        (NOW, BEFORE, "champion", "skip"),  # nothing changed
        (BEFORE, BEFORE, "champion", "update"),  # new data, champion of these params and code
        (BEFORE, BEFORE, "scratch", "retrain"),  # the profile asks for a full retrain
        (BEFORE, None, "champion", "retrain"),  # no champion (or one without lineage tags)
        (None, BEFORE, "champion", "retrain"),  # no finished run to compare with
        (BEFORE, NOW.__class__("d1", "p-old", "c", 2), "champion", "retrain"),  # its params
        (BEFORE, NOW.__class__("d1", "p", "c-old", 2), "champion", "retrain"),  # its code
        (NOW.__class__("d1", "p-old", "c", 2), BEFORE, "champion", "retrain"),  # params changed
        (NOW.__class__("d2", "p", "c-old", 3), BEFORE, "champion", "retrain"),  # code changed
    ],
)
def test_the_scheduled_run_warm_starts_only_when_nothing_but_the_data_changed(
    before, champion, start, decision
):
    assert lineage.decide(NOW, before, champion, start) == decision


def test_the_check_reads_the_champion_and_says_update_with_its_exit_code(
    source, checked, tmp_path, capsys
):
    params, params_file, store = checked
    assert lineage.champion(params) is None  # no registered model yet

    made = lineage.current(params)
    publish_run(params, made.tags())
    client = mlflow.MlflowClient(store["tracking_uri"])
    client.create_registered_model(params.mlflow.registered_model)
    for _ in range(2):
        client.create_model_version(
            params.mlflow.registered_model, source=str(tmp_path), tags=made.tags()
        )
    assert lineage.champion(params) is None  # versions, none of them @champion
    client.set_registered_model_alias(params.mlflow.registered_model, "champion", "1")
    assert lineage.champion(params) == ("1", made)

    (source / "files" / "p10" / "p10000032" / "s50414268.txt").write_text("FINDINGS: new.")
    out = tmp_path / "compare.json"
    code = lineage.main(["--params", str(params_file), "--record", "--out", str(out)])
    assert code == lineage.EXIT_CODES["update"] == 4
    assert "update (new records only, SISTA warm-started from @champion version 1" in (
        capsys.readouterr().out
    )
    assert json.loads(out.read_text())["champion"] == "1"
    schedule = client.get_experiment_by_name("sista-schedule")
    (recorded,) = client.search_runs([schedule.experiment_id])
    assert recorded.info.run_name == "update"
    assert recorded.data.tags["schedule.champion"] == "1"

    scratch = params_file.parent / "scratch.yaml"
    from_scratch = mimic_params(source, mlflow=store, retrain={"start": "scratch"})
    assert lineage.params_hash(from_scratch) == lineage.params_hash(params)
    scratch.write_text(from_scratch.model_dump_json())
    assert lineage.main(["--params", str(scratch)]) == lineage.EXIT_CODES["retrain"] == 0
