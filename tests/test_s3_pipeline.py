"""S3 everywhere, against real server processes on 127.0.0.1: `dvc repro` runs the first
stages with ``storage.uri: s3://...`` and MLFLOW_TRACKING_URI pointing at `make
mlflow-server` (SQLite, artifacts on S3); then the outputs go through a DVC S3 remote
(`dvc push`, `dvc pull`) and a stage on a fresh machine reads its inputs from S3.
(Ray Train checkpoints on S3 are checked by the two-node cluster test.)"""

import hashlib
import json
import shutil
import sys
import uuid
from pathlib import Path

import mlflow
import pytest
import yaml
from pipeline_helpers import ROOT, dvc_yaml_for, local_s3_environment, sh, write_ci_params

from components.platform import storage
from components.platform.stage_storage import MANIFEST, content_hashes
from pipeline.local_services import serve_on_free_port, stop_process_tree

# A few minutes on a quiet 2-core machine; a loaded one can take several times that.
pytestmark = [pytest.mark.slow, pytest.mark.system, pytest.mark.timeout(2400)]

STAGES = ("ingest", "reports", "similarity")
# The CI profile made smaller still: these stages' S3 and MLflow paths, not their maths.
TINY = {
    "ingest.pretrain.max_reports": 24,
    "ingest.downstream.sets.phantom_classification.patients": 50,
    "ingest.downstream.label_fractions": [1.0],
    "ingest.downstream.seeds": [0],
    "similarity.top_k": 4,
    "publish.metric": "classification/phantom_classification/auroc@1",  # the one fraction
}
ONLY_SETS = ("phantom_classification",)


@pytest.fixture(scope="module")
def mlflow_server(s3_server, tmp_path_factory):
    """`make mlflow-server` on a free port: SQLite here, artifacts on the local S3."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    artifacts = f"s3://sista/mlflow-{uuid.uuid4().hex[:8]}"

    process, port = serve_on_free_port(
        lambda port: [
            "make",
            "--no-print-directory",
            "-o",
            ".venv/.installed",  # the venv is there: never reinstall from a test
            "mlflow-server",
            f"MLFLOW_PORT={port}",
            f"MLFLOW_BACKEND_STORE=sqlite:///{folder / 'mlflow.db'}",
            f"MLFLOW_ARTIFACTS={artifacts}",
        ],
        "/health",
        folder / "server.log",
        "make mlflow-server",
        180,
        cwd=ROOT,
        env=local_s3_environment(s3_server, folder),
    )
    url = f"http://127.0.0.1:{port}"
    yield {"url": url, "artifacts": artifacts, "pid": process.pid}
    stop_process_tree(process)


@pytest.fixture(scope="module")
def s3_pipeline(s3_server, mlflow_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("s3-pipeline")
    run = uuid.uuid4().hex[:8]
    uri = f"s3://sista/ci-{run}"
    write_ci_params(folder, ONLY_SETS, **TINY, **{"storage.uri": uri})
    (folder / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml_for(STAGES), sort_keys=False))
    env = local_s3_environment(s3_server, folder)
    env.update(
        MLFLOW_TRACKING_URI=mlflow_server["url"],
        HF_HUB_OFFLINE="1",
        DVC_NO_ANALYTICS="1",  # from the first command on: DVC sends nothing anywhere
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.invalid",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.invalid",
    )
    env.pop("RAY_ADDRESS", None)
    dvc = str(Path(sys.executable).with_name("dvc"))
    remote = f"s3://sista/dvc-{run}"
    for command in (
        ["git", "init", "-q"],
        [dvc, "init", "-q"],
        [dvc, "config", "core.analytics", "false"],
        [dvc, "remote", "add", "-d", "s3", remote],
        [dvc, "remote", "modify", "s3", "endpointurl", s3_server.endpoint],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "pipeline on S3"],
    ):
        sh(command, folder, env)
    sh([dvc, "repro"], folder, env)
    return {"folder": folder, "uri": uri, "remote": remote, "env": env, "dvc": dvc}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_every_stage_writes_its_output_to_s3_manifest_and_all(s3_pipeline, s3_env):
    for stage in STAGES:
        remote = f"{s3_pipeline['uri']}/{stage}"
        manifest = json.loads(storage.read_bytes(f"{remote}/{MANIFEST}"))
        local = s3_pipeline["folder"] / "data" / stage
        assert (local / MANIFEST).read_bytes() == storage.read_bytes(f"{remote}/{MANIFEST}")
        for name, digest in manifest["files"].items():
            assert sha256(storage.read_bytes(f"{remote}/{name}")) == digest, f"{stage}/{name}"
        assert sorted(storage.list_prefix(remote)) == sorted(
            f"{remote}/{name}" for name in [*manifest["files"], MANIFEST]
        )


def test_runs_are_on_the_mlflow_server_and_their_artifacts_on_s3(
    s3_pipeline, mlflow_server, s3_env
):
    client = mlflow.MlflowClient(mlflow_server["url"])
    for stage in STAGES:
        experiment = client.get_experiment_by_name(f"sista-{stage}")
        assert experiment is not None, stage
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED", stage
        manifest = json.loads((s3_pipeline["folder"] / "data" / stage / MANIFEST).read_text())
        assert manifest["mlflow_run_id"] == runs[0].info.run_id
    similarity = client.search_runs(
        [client.get_experiment_by_name("sista-similarity").experiment_id]
    )[0]
    assert similarity.data.params["similarity.top_k"] == "4"
    assert similarity.info.artifact_uri.startswith("mlflow-artifacts:")  # served by the server
    logged = [a.path for a in client.list_artifacts(similarity.info.run_id)]
    assert "similarity_histogram.png" in logged
    on_s3 = storage.list_prefix(mlflow_server["artifacts"])
    assert any(
        similarity.info.run_id in uri and uri.endswith("/similarity_histogram.png") for uri in on_s3
    )


def test_dvc_push_then_pull_restores_every_output_from_the_s3_remote(s3_pipeline, s3_env):
    folder, dvc, env = s3_pipeline["folder"], s3_pipeline["dvc"], s3_pipeline["env"]
    sh([dvc, "push"], folder, env)
    assert storage.list_prefix(s3_pipeline["remote"])  # the cache objects are on S3
    before = {stage: content_hashes(folder / "data" / stage) for stage in STAGES}
    shutil.rmtree(folder / "data")
    shutil.rmtree(folder / ".dvc" / "cache")
    sh([dvc, "pull"], folder, env)
    for stage in ("ingest", "reports"):  # whole-folder outs: the manifest comes back too
        manifest = json.loads((folder / "data" / stage / MANIFEST).read_text())
        assert content_hashes(folder / "data" / stage) == manifest["files"] == before[stage]
    for name in ("embeddings.npy", "record_ids.txt", "topk.parquet"):
        digest = sha256((folder / "data" / "similarity" / name).read_bytes())
        assert digest == before["similarity"][name]


def test_a_stage_on_a_fresh_machine_reads_its_inputs_from_s3(s3_pipeline, tmp_path):
    """Another machine: no local copy at all. `reports` pulls ingest's output from S3,
    checks it against its manifest, and writes the same table."""
    params = yaml.safe_load((s3_pipeline["folder"] / "params.yaml").read_text())
    params["storage"]["local_dir"] = str(tmp_path / "copy")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    sh([sys.executable, "-m", "pipeline.launch", "reports"], tmp_path, s3_pipeline["env"])
    pulled = tmp_path / "copy" / "ingest"
    assert (pulled / MANIFEST).read_bytes() == (
        s3_pipeline["folder"] / "data" / "ingest" / MANIFEST
    ).read_bytes()
    written = json.loads((tmp_path / "copy" / "reports" / MANIFEST).read_text())["files"]
    first = json.loads((s3_pipeline["folder"] / "data" / "reports" / MANIFEST).read_text())
    assert written == first["files"]  # deterministic: the same table from the same input


def test_dvc_exp_run_with_one_changed_key_reruns_that_stage_and_what_follows(s3_pipeline):
    """Params by key: `dvc exp run -S similarity.top_k=3` runs similarity again and skips
    ingest and reports, whose params do not hold that key. (Last in this module: it changes
    the work folder's params.yaml and outputs.)"""
    folder, dvc, env = s3_pipeline["folder"], s3_pipeline["dvc"], s3_pipeline["env"]
    result = sh([dvc, "exp", "run", "-S", "similarity.top_k=3"], folder, env)
    assert "Stage 'ingest' didn't change, skipping" in result.stdout
    assert "Stage 'reports' didn't change, skipping" in result.stdout
    assert "Running stage 'similarity'" in result.stdout
    assert yaml.safe_load((folder / "params.yaml").read_text())["similarity"]["top_k"] == 3
