"""`dvc repro` on real dataset layouts at CI size: MIMIC-CXR-JPG pre-trains, and CheXpert,
CheXpert 5x200, RSNA (classification and detection splits), SIIM, COVIDx and Object-CXR are
scored with MGCA's protocol. Every configured (task, set, fraction) lands in metrics.json
marked real, and each set's splits have its protocol's proportions."""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from pipeline_helpers import (
    GIT_IDENTITY,
    dvc_executable,
    dvc_yaml_for,
    init_dvc_repository,
    sh,
    stage_environment,
)
from protocol_layouts import build_all

from components.platform.profiles import profile_data

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

STAGES = ("ingest", "reports", "similarity", "pretrain", "evaluate", "publish")
FRACTIONS = (0.1, 1.0)
PER_FINDING = 2  # CheXpert 5x200 at CI size: 2 per finding
TASKS = {
    "classification": ["chexpert", "rsna", "covidx"],
    "segmentation": ["siim", "rsna_detection"],
    "detection": ["rsna_detection", "object_cxr"],
    "zero_shot": ["chexpert_5x200"],
    "retrieval": ["pretrain"],
}


def protocol_params(layouts: dict[str, Path]) -> dict:
    """The ci profile on the real layouts, with the paper profile's sets and tasks."""
    params, paper = profile_data("ci"), profile_data("paper")
    ingest = params["ingest"]
    ingest.update(source="mimic_cxr", source_path=str(layouts["mimic_cxr"]))
    ingest["max_quarantine_fraction"] = 0.0  # every record of these layouts loads
    sets = paper["ingest"]["downstream"]["sets"]
    folder_of = {
        "chexpert": "chexpert",
        "chexpert_5x200": "chexpert",
        "rsna": "rsna",
        "rsna_detection": "rsna",
        "siim": "siim",
        "covidx": "covidx",
        "object_cxr": "object_cxr",
    }
    for name, layout in folder_of.items():
        sets[name]["path"] = str(layouts[layout])
    sets["chexpert"].update(val_images=10, per_finding=PER_FINDING)
    sets["chexpert_5x200"]["per_finding"] = PER_FINDING
    ingest["downstream"] = {"label_fractions": list(FRACTIONS), "seeds": [0], "sets": sets}
    params["evaluate"].update(tasks=TASKS, inits=["sista", "random"], probe_epochs=20, head_steps=4)
    params["evaluate"]["localisation_images"] = 0
    params["publish"]["metric"] = "classification/chexpert/auroc@0.1"
    params["pretrain"]["optim"]["epochs"] = 1
    params["pretrain"]["baselines"] = {}  # the protocol is scored on SISTA and random init
    return params


def sista_only(pipeline: dict) -> dict:
    """dvc.yaml without the baselines' pre-training outputs (the protocol run trains none)."""
    baselines = profile_data("ci")["pretrain"]["baselines"]

    def kept(entry) -> bool:
        return not any(f"/{name}" in str(entry) for name in baselines)

    for stage in pipeline["stages"].values():
        for key in ("deps", "outs", "plots"):
            if key in stage:
                stage[key] = [entry for entry in stage[key] if kept(entry)]
    return pipeline


@pytest.fixture(scope="module")
def protocol_run(tmp_path_factory):
    layouts = build_all(tmp_path_factory.mktemp("layouts"))
    folder = tmp_path_factory.mktemp("protocol")
    (folder / "params.yaml").write_text(yaml.safe_dump(protocol_params(layouts)))
    (folder / "dvc.yaml").write_text(
        yaml.safe_dump(sista_only(dvc_yaml_for(STAGES)), sort_keys=False)
    )
    env = stage_environment(
        {
            **GIT_IDENTITY,
        }
    )
    init_dvc_repository(folder, env, "protocol run")
    dvc = dvc_executable()
    sh([dvc, "repro"], folder, env, timeout=1500)
    shown = sh([dvc, "metrics", "show", "--json", "-R", "metrics"], folder, env)  # full/ too
    yield {"folder": folder, "layouts": layouts, "metrics_show": json.loads(shown.stdout)}
    shutil.rmtree(layouts["mimic_cxr"].parents[1], ignore_errors=True)


def test_every_configured_cell_is_in_the_table_marked_real(protocol_run):
    metrics = json.loads((protocol_run["folder"] / "data/evaluate/metrics.json").read_text())
    for task in ("classification", "segmentation", "detection"):
        assert set(metrics[task]) == set(TASKS[task])
        for dataset, block in metrics[task].items():
            assert block["images"] == "real", (task, dataset)
            metric = "accuracy" if dataset == "covidx" else None
            metric = metric or {"classification": "auroc", "segmentation": "dice"}.get(
                task, "map_40_75"
            )
            for init in ("sista", "random"):
                by_fraction = block[metric][init]
                assert set(by_fraction) == {f"{f:g}" for f in FRACTIONS}, (task, dataset)
                assert all(0.0 <= v["mean"] <= 1.0 for v in by_fraction.values())
    zero_shot = metrics["zero_shot"]["chexpert_5x200"]
    assert zero_shot["images"] == "real" and set(zero_shot) == {"images", "auroc", "accuracy"}
    assert metrics["retrieval"]["pretrain"]["images"] == "real"
    table = (protocol_run["folder"] / "data/publish/results.md").read_text()
    assert "### classification · covidx (real images): accuracy" in table
    assert "PHANTOM" not in table


def test_dvc_metrics_show_has_the_headline_and_full_has_each_inits_score_per_set(protocol_run):
    """metrics/evaluate.json, a column each in `dvc exp show`: SISTA's score per task at the
    smallest fraction (10 %), averaged over the task's sets; metrics/full/evaluate.json, each
    init's per (task, set)."""
    shown = protocol_run["metrics_show"][""]["data"]
    tracked = shown["metrics/full/evaluate.json"]["data"]
    assert set(tracked) == {
        *(f"cls/{name}" for name in TASKS["classification"]),
        *(f"seg/{name}" for name in TASKS["segmentation"]),
        *(f"det/{name}" for name in TASKS["detection"]),
    }  # no language tasks; several sets per task: each named
    assert all(list(by_init) == ["sista", "random"] for by_init in tracked.values())
    metrics = json.loads((protocol_run["folder"] / "data/evaluate/metrics.json").read_text())
    covidx = metrics["classification"]["covidx"]["accuracy"]["sista"]["0.1"]["mean"]
    assert tracked["cls/covidx"]["sista"] == round(covidx, 4)
    cls = [tracked[f"cls/{name}"]["sista"] for name in TASKS["classification"]]
    assert shown["metrics/evaluate.json"]["data"]["cls"] == pytest.approx(
        sum(cls) / len(cls), abs=1e-4
    )


def manifest(protocol_run) -> list[dict]:
    path = protocol_run["folder"] / "data/ingest/manifest.parquet"
    return pq.read_table(path).to_pylist()


def split_counts(rows: list[dict], dataset: str, key: str = "record_id") -> Counter:
    return Counter(
        r["split"] for r in {r[key]: r for r in rows if r["dataset"] == dataset}.values()
    )


def test_splits_follow_each_sets_protocol(protocol_run):
    rows = manifest(protocol_run)
    layouts = protocol_run["layouts"]
    by_set = {name: [r for r in rows if r["dataset"] == name] for name in TASKS["classification"]}
    # MIMIC-CXR: the official split (train pre-trains, validate validates, test retrieves)
    split_csv = gzip.decompress(
        (layouts["mimic_cxr"] / "mimic-cxr-2.0.0-split.csv.gz").read_bytes()
    )
    official = {r["dicom_id"]: r["split"] for r in csv.DictReader(io.StringIO(split_csv.decode()))}
    for row in (r for r in rows if r["dataset"] == "pretrain"):
        assert {"train": "train", "validate": "val", "test": "test"}[
            official[row["record_id"]]
        ] == (row["split"])
    # CheXpert: test = valid.csv; 5x200 held out of training; val = whole patients >= 10 images
    chexpert = by_set["chexpert"]
    valid_rows = (layouts["chexpert"] / "valid.csv").read_text().strip().splitlines()[1:]
    assert sum(r["split"] == "test" for r in chexpert) == len(valid_rows)
    held_out = {r["record_id"] for r in rows if r["dataset"] == "chexpert_5x200"}
    assert len(held_out) == 5 * PER_FINDING
    assert all(r["split"] == "test" for r in rows if r["dataset"] == "chexpert_5x200")
    assert not held_out & {r["record_id"] for r in chexpert}
    val = [r for r in chexpert if r["split"] == "val"]
    assert len(val) >= 10 and not {r["patient_id"] for r in val} & {
        r["patient_id"] for r in chexpert if r["split"] == "train"
    }
    for row in rows:
        if row["dataset"] == "chexpert_5x200":
            assert sorted(row["labels"]).count(1.0) == 1  # one finding positive, alone

    def patients(name: str) -> Counter:
        return split_counts(rows, name, key="patient_id")

    # RSNA: 70 / 15 / 15 (classification) and 60 / 20 / 20 (detection) of patients
    for name, fraction in (("rsna", 0.15), ("rsna_detection", 0.2)):
        counts = patients(name)
        total = sum(counts.values())
        assert counts["test"] == round(fraction * total) == counts["val"], (name, counts)
    # SIIM: 15 % / 15 % of patients; training positives and negatives balanced
    siim = [r for r in rows if r["dataset"] == "siim"]
    counts = patients("siim")
    sets = json.loads((protocol_run["folder"] / "data/ingest/sets.json").read_text())
    total = sum(counts.values()) + sets["siim"]["excluded_by_protocol"].get("balance_train", 0)
    assert counts["test"] == round(0.15 * total) == counts["val"]
    train_labels = Counter(r["labels"][0] for r in siim if r["split"] == "train")
    assert 0 < train_labels[0.0] <= train_labels[1.0]  # negatives beyond positives left out
    if sets["siim"]["excluded_by_protocol"]:
        assert train_labels[0.0] == train_labels[1.0]
    # COVIDx: the official test list, 20 % of training patients validate, 3 classes
    covidx = by_set["covidx"]
    test_lines = (layouts["covidx"] / "test.txt").read_text().strip().splitlines()
    assert sum(r["split"] == "test" for r in covidx) == len(test_lines)
    train_patients = {r["patient_id"] for r in covidx if r["split"] != "test"}
    assert patients("covidx")["val"] == round(0.2 * len(train_patients))
    assert all(sum(r["labels"]) == 1.0 and len(r["labels"]) == 3 for r in covidx)
    # Object-CXR: the dev set is the test split, 10 % of train validates
    object_cxr = [r for r in rows if r["dataset"] == "object_cxr"]
    dev_rows = (layouts["object_cxr"] / "dev.csv").read_text().strip().splitlines()[1:]
    assert sum(r["split"] == "test" for r in object_cxr) == len(dev_rows)
    assert sum(r["split"] == "val" for r in object_cxr) == math.floor(
        0.1 * sum(r["split"] != "test" for r in object_cxr) + 0.5
    )


def test_label_subsets_are_nested_and_saved_per_set(protocol_run):
    subsets = protocol_run["folder"] / "data/ingest/subsets"
    rows = manifest(protocol_run)
    trained = {
        name for task in ("classification", "segmentation", "detection") for name in TASKS[task]
    }
    for dataset in trained:
        small, full = (
            set((subsets / f"{dataset}-train-frac{f:g}-seed0.txt").read_text().split())
            for f in FRACTIONS
        )
        assert small and small <= full, dataset
        assert full == {
            r["record_id"] for r in rows if r["dataset"] == dataset and r["split"] == "train"
        }
