"""Run one stage as a Ray job: in-process on a local Ray instance by default, or submitted
to a cluster (``RAY_ADDRESS`` or ``ray.address`` in params) with job submission, streaming
its logs and exiting non-zero when the job fails so DVC sees the failure.

A submitted job carries only its parameters (a working_dir holding the resolved
``params.yaml``: local paths made absolute) and the non-secret environment the stage needs
(endpoints, MLflow server); the code and credentials are the cluster's own. With
``storage.uri: s3://...`` the launcher then pulls the stage's output into ``storage.local_dir``,
so DVC finds it where dvc.yaml says. When DVC runs the launcher (``DVC_STAGE`` set), it then
exports the small files git versions for DVC into ``metrics/``
(components.platform.stage_storage), for a stage run here or on a cluster alike.

    python -m pipeline.launch ingest
    python -m pipeline.launch pretrain --variant convirt
    RAY_ADDRESS=http://127.0.0.1:8265 python -m pipeline.launch reports
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import yaml

from components.platform.config import ConfigError, Params, load_params, tracking_uri
from components.platform.preflight import check_resources
from components.platform.secrets import redacted
from components.platform.stage import JOBS, STAGES
from components.platform.stage_storage import (
    absolute,
    check_access,
    export_tracked,
    on_s3,
    output_folders,
    pull,
)
from components.platform.storage import StorageError

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# The stage runs of dvc.yaml, in order: what `dvc repro` launches (pretrain: SISTA, then
# each baseline, in one run).
PIPELINE = tuple((stage,) for stage in STAGES)


def stage_runs(variants: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The pipeline with one pre-training run per variant (a cluster runs them apart)."""
    runs: list[tuple[str, ...]] = []
    for stage in STAGES:
        if stage == "pretrain":
            runs += [("pretrain", "--variant", variant) for variant in variants]
        else:
            runs.append((stage,))
    return runs


# Passed to a submitted job: where things are, never credentials (the cluster's nodes have
# their own: instance profile, service account, or the environment `ray start` ran in).
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
)


def entrypoint(stage: str, params_path: str, stage_args: list[str]) -> str:
    """The job's command: this interpreter by absolute path (a job runs with the head's
    PATH, which may not hold our venv)."""
    command = [
        sys.executable,
        "-m",
        f"components.stages.{stage}",
        "--params",
        params_path,
        *stage_args,
    ]
    return shlex.join(command)


def job_params(params: Params) -> dict:
    """The parameters as a job on the cluster must see them: local stage folders, SQLite
    store and artifact folder by absolute path (a shared file system); with S3 storage the
    job keeps a relative ``local_dir``, a cache inside its own working folder."""
    section = params.storage
    storage = section if on_s3(section) else absolute(section)
    root = params.mlflow.artifact_root
    mlflow = params.mlflow.model_copy(
        update={
            "tracking_uri": tracking_uri(params),
            "artifact_root": root if "://" in root else str(Path(root).resolve()),
        }
    )
    resolved = params.model_copy(update={"storage": storage, "mlflow": mlflow})
    return resolved.model_dump(mode="json")


def job_environment() -> dict[str, str]:
    return {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}


def submit(
    address: str,
    command: str,
    working_dir: str | None = None,
    env_vars: dict[str, str] | None = None,
) -> int:
    """Submit ``command`` as a Ray job, stream its logs, return a process exit code."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    runtime_env = {"working_dir": working_dir} if working_dir else {}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    job_id = client.submit_job(entrypoint=command, runtime_env=runtime_env or None)
    print(f"submitted job {job_id} to {redacted('address', address)}: {command}", flush=True)

    async def stream() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(stream())
    except Exception as error:  # noqa: BLE001 - log streaming is best effort; status decides
        print(f"(log stream ended: {error})", file=sys.stderr)
    status = client.get_job_status(job_id)
    while str(status) not in TERMINAL and getattr(status, "value", status) not in TERMINAL:
        time.sleep(1)
        status = client.get_job_status(job_id)
    status_name = getattr(status, "value", str(status))
    print(f"job {job_id}: {status_name}", flush=True)
    return 0 if status_name == "SUCCEEDED" else 1


def launch(stage: str, params_path: str, stage_args: list[str]) -> int:
    if stage not in JOBS:
        raise SystemExit(f"unknown stage {stage!r}; stages: {', '.join(JOBS)}")
    try:  # a config error stops here, before any job starts
        params = load_params(params_path)
        address = os.environ.get("RAY_ADDRESS") or params.ray.address
        submitted = bool(address) and "://" in address  # a dashboard (http://head:8265)
        # A stage run here needs its locations to answer from here; a submitted job checks
        # them on the cluster (stage_main), which may reach what this machine cannot.
        if not submitted:
            check_resources(params, stage, source=params_path)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    if submitted:
        try:
            check_access(params)  # before a job is queued
        except StorageError as error:
            print(error, file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory(prefix="sista-job-") as job_dir:
            (Path(job_dir) / "params.yaml").write_text(yaml.safe_dump(job_params(params)))
            code = submit(
                address,
                entrypoint(stage, "params.yaml", stage_args),
                working_dir=job_dir,
                env_vars=job_environment(),
            )
        if code == 0 and on_s3(params.storage):
            try:
                pull(params.storage, output_folders(params, stage, _variant(stage_args)))
            except StorageError as error:
                print(f"the job succeeded but its output could not be pulled: {error}")
                return 1
        if code == 0:
            export_for_dvc(params, stage, stage_args)
        return code
    # No address: a local Ray instance. A bare GCS address (head:6379) is what Ray sets inside
    # a running job (a KubeRay RayJob's entrypoint): the stage attaches to that cluster.
    module = importlib.import_module(f"components.stages.{stage}")
    module.main(["--params", params_path, *stage_args])
    export_for_dvc(params, stage, stage_args)
    return 0


def export_for_dvc(params: Params, stage: str, stage_args: list[str]) -> None:
    """Under `dvc repro` or `dvc exp run` (DVC sets ``DVC_STAGE`` for a stage's command), copy
    the stage's tracked metrics and plots into ``metrics/`` next to dvc.yaml. Anywhere else (a
    Kubeflow step, a RayJob, ``sista run``) nothing is written outside the stage folders."""
    if os.environ.get("DVC_STAGE"):
        export_tracked(params, stage, _variant(stage_args))


def _variant(stage_args: list[str]) -> str | None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--variant")
    return parser.parse_known_args(stage_args)[0].variant


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.launch", description=__doc__)
    parser.add_argument("stage", choices=JOBS)
    parser.add_argument("--params", default="params.yaml")
    args, stage_args = parser.parse_known_args(argv)
    raise SystemExit(launch(args.stage, args.params, stage_args))


if __name__ == "__main__":
    main()
