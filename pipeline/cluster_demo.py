"""``make cluster-demo``: the CI-profile pipeline on a real two-node Ray cluster on this
machine, as it runs on a production cluster.

It starts an S3 server (moto), an MLflow tracking server (SQLite, artifacts on S3) and a
Ray head plus a worker node (``ray start``, loopback addresses, 1 CPU each, token auth),
then launches every stage with ``RAY_ADDRESS`` set, so each is a ``ray job submit`` with
``storage.uri: s3://sista/ci``. Pre-training uses ``placement_strategy: STRICT_SPREAD``:
one Ray Train worker per node. Afterwards it checks that the workers ran on both nodes and
that checkpoints and stage outputs are on S3, prints the evidence and stops every process
it started, by process id.

    python -m pipeline.cluster_demo [--through pretrain] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from components.platform.config import with_overrides
from components.platform.profiles import profile_data

from .launch import PIPELINE
from .local_cluster import LocalRayCluster
from .local_services import MLflowServer, S3Server

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "sista"
STORAGE_URI = f"s3://{BUCKET}/ci"


LAUNCHER = (sys.executable, "-m", "pipeline.launch")  # as dvc.yaml runs a stage


class DemoFailure(AssertionError):
    """The cluster run did not show what it must (two nodes, shared checkpoints)."""


@dataclass
class ClusterRun:
    """The services of one demo run and what each stage took."""

    work: Path
    s3: S3Server
    tracking: MLflowServer
    cluster: LocalRayCluster
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """The launcher's environment: S3, MLflow server, the cluster's address and token."""
        return {
            **os.environ,
            **self.s3.env,
            **self.cluster.client_env,
            "MLFLOW_TRACKING_URI": self.tracking.url,
            "HF_HUB_OFFLINE": "1",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
        }

    def start(self, *stage_args: str, log: Path) -> subprocess.Popen:
        """:meth:`launch` in the background, its output to ``log``."""
        with open(log, "wb") as output:
            return subprocess.Popen(
                [*LAUNCHER, *stage_args],
                cwd=self.work,
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def launch(
        self, *stage_args: str, timeout_s: float = 900, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        """``python -m pipeline.launch STAGE ...`` in the work folder, as dvc.yaml runs it;
        ``env`` changes the launcher's environment (which the job inherits) for this run."""
        started = time.perf_counter()
        result = subprocess.run(
            [*LAUNCHER, *stage_args],
            cwd=self.work,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        name = run_name(stage_args)
        if name in self.seconds:  # a second run of a stage: keep the first one's record
            name = next(f"{name}#{n}" for n in range(2, 100) if f"{name}#{n}" not in self.seconds)
        self.seconds[name] = round(time.perf_counter() - started, 1)
        logs = self.work / "logs"
        logs.mkdir(exist_ok=True)
        (logs / f"{name.replace('/', '-')}.log").write_text(result.stdout + result.stderr)
        (logs / "seconds.json").write_text(json.dumps(self.seconds, indent=1))
        return result

    @property
    def last(self) -> str:
        """The name the last launch was recorded under (``pretrain/sista#2`` for a rerun)."""
        return list(self.seconds)[-1]


def run_name(stage_args: tuple[str, ...] | list[str]) -> str:
    """``("pretrain", "--variant", "sista")`` -> ``pretrain/sista``."""
    return "/".join(a for a in stage_args if not a.startswith("-"))


def write_params(work: Path, storage_uri: str = STORAGE_URI, **overrides: Any) -> Path:
    """The ci profile with stage folders on S3 and one pre-training worker per node."""
    cluster = {
        "storage.uri": storage_uri,
        "ray.num_cpus": None,  # the cluster's, not a local instance's
        "pretrain.placement_strategy": "STRICT_SPREAD",
    }
    params = profile_data("ci")
    params = with_overrides(params, {**cluster, **overrides})
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def stages_through(last: str) -> list[tuple[str, ...]]:
    """The pipeline's stage runs up to and including every run of stage ``last``."""
    names = [command[0] for command in PIPELINE]
    end = len(names) - names[::-1].index(last)
    return list(PIPELINE[:end])


@contextmanager
def start_services(work: Path, s3: S3Server) -> Iterator[tuple[MLflowServer, LocalRayCluster]]:
    """The MLflow server (artifacts on ``s3``) and the two-node Ray cluster, started side
    by side (each mostly waits for its processes), both stopped on the way out."""
    tracking = MLflowServer(work / "mlflow-server", f"s3://{BUCKET}/mlflow", env=s3.env)
    cluster = LocalRayCluster(nodes=2, cpus_per_node=1, env=s3.env)
    with ThreadPoolExecutor(2) as pool:
        starting = [pool.submit(tracking.start), pool.submit(cluster.start)]
    try:
        for future in starting:
            future.result()  # a failed start raises here
        yield tracking, cluster
    finally:
        cluster.stop()
        tracking.stop()


def pretraining_evidence(run: ClusterRun, variant: str = "sista") -> dict[str, Any]:
    """Where the variant's Ray Train workers ran and where its checkpoints went, checked:
    two distinct nodes, both members of this cluster, the same on S3 and in MLflow, and
    checkpoints below ``<storage.uri>/checkpoints`` on S3."""
    import mlflow

    from components.platform import storage

    folder = f"pretrain/{variant}"
    placement = json.loads(storage.read_bytes(f"{STORAGE_URI}/{folder}/workers.json"))
    local_copy = json.loads((run.work / "data" / folder / "workers.json").read_text())
    worker_nodes = sorted({worker["node_id"] for worker in placement})
    cluster_nodes = sorted(node["node_id"] for node in run.cluster.alive_nodes())
    manifest = json.loads(storage.read_bytes(f"{STORAGE_URI}/{folder}/_stage.json"))
    checkpoints = [
        uri
        for uri in storage.list_prefix(f"{STORAGE_URI}/checkpoints")
        if f"/pretrain-{variant}-{manifest['fingerprint']}/checkpoint_" in uri
    ]
    client = mlflow.MlflowClient(run.tracking.url)
    mlflow_run = client.get_run(manifest["mlflow_run_id"])
    evidence = {
        "worker_nodes": worker_nodes,
        "cluster_nodes": cluster_nodes,
        "ranks": {w["rank"]: w["node_id"][:12] for w in placement},
        "checkpoint_files": len(checkpoints),
        "checkpoint_example": checkpoints[-1] if checkpoints else None,
        "mlflow_run": manifest["mlflow_run_id"],
        "mlflow_tag": mlflow_run.data.tags.get("ray.worker_nodes", ""),
        "mlflow_artifact_uri": mlflow_run.info.artifact_uri,
    }
    problems = []
    if len(worker_nodes) != 2:
        problems.append(f"pre-training workers ran on {len(worker_nodes)} node(s), not 2")
    if not set(worker_nodes) <= set(cluster_nodes):
        problems.append(f"worker nodes {worker_nodes} are not this cluster's {cluster_nodes}")
    if local_copy != placement:
        problems.append("the launcher's local copy of workers.json differs from S3's")
    if not any(uri.endswith("/model.safetensors") for uri in checkpoints):
        problems.append(f"no checkpoint below {STORAGE_URI}/checkpoints on S3")
    if evidence["mlflow_tag"] != ",".join(worker_nodes):
        problems.append(f"MLflow tag ray.worker_nodes is {evidence['mlflow_tag']!r}")
    if problems:
        raise DemoFailure("; ".join(problems))
    return evidence


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.cluster_demo", description=__doc__)
    parser.add_argument(
        "--through",
        default="publish",
        choices=sorted({command[0] for command in PIPELINE}),
        help="last stage to run (default: the whole pipeline)",
    )
    parser.add_argument("--work", help="work folder (default: a new temporary one)")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="sista-cluster-demo-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    write_params(work)
    print(f"work folder: {work}", flush=True)
    started = time.perf_counter()
    with S3Server(buckets=(BUCKET,)) as s3:
        os.environ.update(s3.env)  # this process reads the evidence from S3 too
        with start_services(work, s3) as (tracking, cluster):
            run = ClusterRun(work, s3, tracking, cluster)
            nodes = len(cluster.alive_nodes())
            up = time.perf_counter() - started
            print(
                f"S3 {s3.endpoint}, MLflow {tracking.url}, Ray {cluster.dashboard_url} with "
                f"{nodes} nodes, up after {up:.0f} s",
                flush=True,
            )
            for command in stages_through(args.through):
                result = run.launch(*command)
                name = run_name(command)
                print(f"{name}: exit {result.returncode} in {run.seconds[name]} s", flush=True)
                if result.returncode != 0:
                    print(result.stdout[-3000:] + result.stderr[-3000:], file=sys.stderr)
                    return 1
            evidence = pretraining_evidence(run)
            print(json.dumps({"seconds": run.seconds, **evidence}, indent=2))
    print(f"cluster, MLflow and S3 stopped; {time.perf_counter() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
