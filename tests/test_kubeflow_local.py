"""The Kubeflow pipeline itself, run end to end by kfp's local runner on a trimmed CI profile
whose pre-training source is a MIMIC-CXR-JPG folder: the same step functions a cluster runs,
each launching its stage (here on a local Ray instance: an empty ray_address), in the compiled
order. Run 1 trains everything and publishes @champion; run 2, with nothing changed, stops
after its input check; run 3, after new studies were released into the folder, decodes only
those, warm-starts SISTA from the champion, keeps the baselines and lets the gate decide."""

import json
import os
import re
import subprocess
import sys
import time

import mlflow
import pyarrow.parquet as pq
import pytest
from pipeline_helpers import write_ci_params
from protocol_layouts import build_mimic_cxr_jpg, release_mimic_studies, withhold_mimic_studies

from components.platform.stage_storage import read_manifest

pytestmark = [pytest.mark.slow, pytest.mark.system]

RUN_PIPELINE = """
import sys
from kfp import local
from pipeline.kubeflow import sista_pipeline

local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=sys.argv[2])
sista_pipeline(params_path=sys.argv[1], ray_address="", mlflow_tracking_uri="")
print("PIPELINE SUCCEEDED")
"""


@pytest.mark.timeout(2400)
def test_the_kubeflow_pipeline_runs_every_step_and_publishes_a_champion(tmp_path):
    data = tmp_path / "data"
    source = build_mimic_cxr_jpg(tmp_path / "mimic-cxr-jpg", studies=64)
    new_studies = withhold_mimic_studies(source, 8, tmp_path / "next-release")
    params = write_ci_params(
        tmp_path,
        ("phantom_classification",),
        **{
            "ingest.source": "mimic_cxr",
            "ingest.source_path": str(source),
            # Absolute: each step runs in a process of kfp's own.
            "storage.uri": str(data),
            "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "mlflow.artifact_root": str(tmp_path / "mlartifacts"),
            # Trimmed to what the chain needs: every stage runs, each on little work.
            "ingest.downstream.seeds": [0],
            "pretrain.optim.epochs": 1,
            "evaluate.inits": ["sista", "convirt", "dense", "random"],
            "evaluate.localisation_images": 0,
        },
    )
    environment = {
        **os.environ,
        "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",  # steps' python3
        "HF_HUB_OFFLINE": "1",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
        # kfp warns, per step, that the image and resources mean nothing locally: keep the
        # log to the steps' own output.
        "PYTHONWARNINGS": "ignore",
    }
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        environment.pop(name, None)

    def run_pipeline() -> tuple[str, float]:
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-c", RUN_PIPELINE, str(params), str(tmp_path / "kfp")],
            cwd=tmp_path,
            env=environment,
            capture_output=True,
            text=True,
            timeout=2300,
        )
        log = _plain(result.stdout + result.stderr)
        assert result.returncode == 0 and "PIPELINE SUCCEEDED" in result.stdout, log[-8000:]
        return log, time.monotonic() - started

    log, _ = run_pipeline()
    assert "Task 'check-inputs' finished with status SUCCESS" in log
    assert read_manifest(data / "ingest")["counts"]["pretrain_decoded"] == 56
    finished = re.findall(r"Task '(run-stage[-\d]*)' finished with status SUCCESS", log)
    assert len(set(finished)) == 8  # ingest, reports, similarity, 3 x pretrain, evaluate, publish
    for variant in ("sista", "convirt", "dense"):
        assert (data / "pretrain" / variant / "model" / "model.safetensors").is_file()

    decision = json.loads((data / "publish" / "registry.json").read_text())
    assert decision["promoted"] and decision["champion_version_before"] is None
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("sista-encoder", "champion")
    assert champion.version == decision["candidate_version"]
    assert {"lineage.data", "lineage.params", "lineage.code"} <= set(champion.tags)

    # The next scheduled run: nothing new, nothing changed. It ends after the check.
    log, seconds = run_pipeline()
    assert "Task 'check-inputs' finished with status SUCCESS" in log
    assert not re.findall(r"Task 'run-stage[-\d]*'", log), log[-4000:]
    assert seconds < 60, f"the skipped run took {seconds:.0f} s"
    schedule = client.get_experiment_by_name("sista-schedule")
    decisions = client.search_runs([schedule.experiment_id], order_by=["attributes.start_time"])
    assert [run.info.run_name for run in decisions] == ["retrain", "skipped"]
    assert decisions[1].data.tags["lineage.data"] == champion.tags["lineage.data"]

    # The next release of the source: 8 new studies. Only they are decoded, SISTA continues
    # from the champion, the baselines of run 1 are kept, and the gate decides.
    baselines = {v: read_manifest(data / "pretrain" / v) for v in ("convirt", "dense")}
    release_mimic_studies(source, tmp_path / "next-release")
    log, _ = run_pipeline()
    decisions = client.search_runs([schedule.experiment_id], order_by=["attributes.start_time"])
    assert [run.info.run_name for run in decisions] == ["retrain", "skipped", "update"]
    counts = read_manifest(data / "ingest")["counts"]
    assert (counts["pretrain_decoded"], counts["pretrain_reused"]) == (8, 56)
    assert counts["phantom_classification_decoded"] == 0
    ingested = pq.read_table(data / "ingest" / "manifest.parquet").column("record_id")
    assert set(new_studies) <= set(ingested.to_pylist())
    similarity = read_manifest(data / "similarity")["counts"]
    assert (similarity["embedded"], similarity["topk"]) == (8, "merged")
    warm = read_manifest(data / "pretrain" / "sista")["warm_start"]
    assert warm == {"champion_version": str(champion.version), "epochs": 1}
    assert "[pretrain] warm start from" in log
    for variant, before in baselines.items():
        assert read_manifest(data / "pretrain" / variant) == before, variant
        assert f"pretrain ({variant}): kept from the last run" in log

    decision = json.loads((data / "publish" / "registry.json").read_text())
    assert str(decision["champion_version_before"]) == str(champion.version)
    candidate = client.get_model_version("sista-encoder", decision["candidate_version"])
    assert candidate.tags["retrain.warm_start_from"] == str(champion.version)
    assert candidate.tags["gate.rule"] and candidate.tags["gate.interval"]
    now = client.get_model_version_by_alias("sista-encoder", "champion").version
    assert now == (candidate.version if decision["promoted"] else champion.version)
    for version in client.search_model_versions("name = 'sista-encoder'"):
        assert {"lineage.data", "lineage.params", "lineage.code"} <= set(version.tags)
    assert candidate.tags["lineage.data"] != champion.tags["lineage.data"]


def _plain(log: str) -> str:
    """The runner's log without its colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", log)
