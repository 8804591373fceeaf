"""Run one stage as a Ray job: in-process on a local Ray instance by default, or submitted
to a cluster (``RAY_ADDRESS`` or ``ray.address`` in params) with job submission, streaming
its logs and exiting non-zero when the job fails so DVC sees the failure.

    python -m pipeline.launch ingest
    python -m pipeline.launch pretrain --variant convirt
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import shlex
import sys
import time

from components.config import ConfigError, load_params
from components.preflight import check_resources
from components.stage import JOBS

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def entrypoint(stage: str, params_path: str, stage_args: list[str]) -> str:
    """The job's command: this interpreter by absolute path (a job runs with the head's
    PATH, which may not hold our venv)."""
    command = [sys.executable, "-m", f"components.{stage}", "--params", params_path, *stage_args]
    return shlex.join(command)


def submit(address: str, command: str, working_dir: str | None = None) -> int:
    """Submit ``command`` as a Ray job, stream its logs, return a process exit code."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    runtime_env = {"working_dir": working_dir} if working_dir else None
    job_id = client.submit_job(entrypoint=command, runtime_env=runtime_env)
    print(f"submitted job {job_id} to {address}: {command}", flush=True)

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
        return submit(address, entrypoint(stage, params_path, stage_args))
    # No address: a local Ray instance. A bare GCS address (head:6379) is what Ray sets inside
    # a running job (a KubeRay RayJob's entrypoint): the stage attaches to that cluster.
    module = importlib.import_module(f"components.{stage}")
    module.main(["--params", params_path, *stage_args])
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.launch", description=__doc__)
    parser.add_argument("stage", choices=JOBS)
    parser.add_argument("--params", default="params.yaml")
    args, stage_args = parser.parse_known_args(argv)
    raise SystemExit(launch(args.stage, args.params, stage_args))


if __name__ == "__main__":
    main()
