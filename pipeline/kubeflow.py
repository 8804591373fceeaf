"""The Kubeflow Pipelines (v2) definition: the pipeline's stages as steps that run on the Ray
cluster, and the recurring run that retrains on a schedule.

Every step is a lightweight component in the project's image (``infra/Dockerfile``) that runs
``python -m pipeline.launch STAGE --params PARAMS`` with ``RAY_ADDRESS`` set to the KubeRay
head's dashboard: the launcher submits the stage as a Ray job, streams its logs and fails the
step when the job fails. The first step checks the inputs (``components.platform.lineage``: the
sources' listing, params, code) against the last published run's and the stages run only when
something changed. They follow dvc.yaml (pre-training's three variants side by side); the last
one, publish, moves ``@champion`` to the new encoder only when it beats the current champion
beyond noise on ``publish.metric`` (``components.stages.publish.promote_if_better``).
Parameters come from the ConfigMap ``sista-params``, S3 credentials from the Secret
``sista-s3`` and Ray's token from ``sista-ray-token``, as on the Ray pods (``infra/kuberay/``).

    python -m pipeline.kubeflow compile      # -> infra/kubeflow/sista_pipeline.yaml
    python -m pipeline.kubeflow schedule --host https://KFP-HOST  # recurring_run.yaml
"""

import argparse
import re
from pathlib import Path
from typing import Any

import yaml
from kfp import compiler, dsl, kubernetes

from components.platform.config import Params
from components.platform.stage import STAGES

IMAGE = "ghcr.io/your-org/sista:0.1.0"  # `make image` builds it; push it where the cluster pulls
NAMESPACE = "sista"
PIPELINE_FILE = Path("infra/kubeflow/sista_pipeline.yaml")
RECURRING_RUN_FILE = Path("infra/kubeflow/recurring_run.yaml")
PARAMS_CONFIG_MAP = "sista-params"  # holds params.yaml (the paper profile, edited)
PARAMS_MOUNT = "/etc/sista"
CREDENTIALS_SECRET = "sista-s3"
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
RAY_TOKEN_SECRET = "sista-ray-token"  # Ray's token authentication, as on the Ray pods
PRETRAIN_VARIANTS = ("sista", *Params().pretrain.baselines)  # the base params.yaml's
# KubeRay names the head's service <RayCluster name>-head-svc.
RAY_DASHBOARD = f"http://sista-head-svc.{NAMESPACE}.svc.cluster.local:8265"
MLFLOW_SERVER = f"http://mlflow.{NAMESPACE}.svc.cluster.local:5000"


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def check_inputs(params_path: str, mlflow_tracking_uri: str) -> str:
    """Compare the inputs (the sources' listing, params, code) with those of the last run that
    reached publish: ``skip`` (nothing changed), ``update`` (only the data: new records, SISTA
    warm-started from @champion) or ``retrain`` (everything from scratch). The decision is
    recorded as a run of the MLflow experiment ``<prefix>-schedule``."""
    import subprocess
    import sys

    from pipeline.kubeflow_step import decision_of, step_environment

    command = [
        sys.executable,
        "-m",
        "components.platform.lineage",
        "--params",
        params_path,
        "--record",
    ]
    print("running:", " ".join(command), flush=True)
    checked = subprocess.run(command, env=step_environment("", mlflow_tracking_uri))
    return decision_of(checked.returncode)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def run_stage(
    stage: str,
    params_path: str,
    ray_address: str,
    mlflow_tracking_uri: str,
    variant: str = "",
    decision: str = "retrain",
) -> str:
    """One stage as a Ray job on the cluster (``ray_address`` empty: a local Ray instance).
    ``decision`` ``update``: pre-training warm-starts SISTA and keeps the baselines (unless
    ``retrain.baselines``)."""
    import subprocess
    import sys

    from pipeline.kubeflow_step import stage_arguments, step_environment

    arguments = stage_arguments(stage, variant, decision, params_path)
    if arguments is None:
        print(f"{stage} ({variant}): kept from the last run (update, retrain.baselines false)")
        return f"{stage}/{variant}"
    command = [sys.executable, "-m", "pipeline.launch", stage, "--params", params_path]
    command += arguments
    environment = step_environment(ray_address, mlflow_tracking_uri)
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, env=environment, check=True)
    return stage if not variant else f"{stage}/{variant}"


def _on_cluster(task: dsl.PipelineTask, name: str) -> dsl.PipelineTask:
    """What every step needs on Kubernetes: the parameters file, the credentials, a name,
    and no caching (a scheduled retraining must run, not reuse last week's outputs)."""
    task.set_display_name(name)
    task.set_caching_options(False)
    task.set_cpu_request("500m").set_memory_request("1Gi").set_memory_limit("2Gi")
    kubernetes.use_config_map_as_volume(task, PARAMS_CONFIG_MAP, mount_path=PARAMS_MOUNT)
    kubernetes.use_secret_as_env(
        task, CREDENTIALS_SECRET, secret_key_to_env={key: key for key in CREDENTIAL_KEYS}
    )
    kubernetes.use_secret_as_env(
        task, RAY_TOKEN_SECRET, secret_key_to_env={"token": "RAY_AUTH_TOKEN"}
    )
    task.set_env_variable("RAY_AUTH_MODE", "token")
    kubernetes.set_image_pull_policy(task, "IfNotPresent")
    return task


@dsl.pipeline(
    name="sista-retraining",
    description="SISTA pre-training and evaluation on the Ray cluster; publish promotes the "
    "new encoder to @champion only when it beats the current champion.",
)
def sista_pipeline(
    params_path: str = f"{PARAMS_MOUNT}/params.yaml",
    ray_address: str = RAY_DASHBOARD,
    mlflow_tracking_uri: str = MLFLOW_SERVER,
) -> None:
    check = _on_cluster(
        check_inputs(params_path=params_path, mlflow_tracking_uri=mlflow_tracking_uri),
        "check inputs",
    )

    def stage(name: str, variant: str = "") -> dsl.PipelineTask:
        task = run_stage(
            stage=name,
            params_path=params_path,
            ray_address=ray_address,
            mlflow_tracking_uri=mlflow_tracking_uri,
            variant=variant,
            decision=check.output,
        )
        return _on_cluster(task, f"{name} ({variant})" if variant else name)

    with dsl.If(check.output != "skip", name="inputs-changed"):
        previous: list[dsl.PipelineTask] = []
        for name in STAGES:  # in order; pre-training runs its variants side by side
            variants = PRETRAIN_VARIANTS if name == "pretrain" else ("",)
            previous = [stage(name, variant).after(*previous) for variant in variants]


def compile_pipeline(path: Path = PIPELINE_FILE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(sista_pipeline, str(path))
    return path


# KFP's scheduler takes six cron fields: second minute hour day-of-month month day-of-week.
CRON = re.compile(r"^\S+( \S+){5}$")


def read_recurring_run(path: Path = RECURRING_RUN_FILE) -> dict[str, Any]:
    """The recurring run's definition, checked: six-field cron, one run at a time, and the
    pipeline's own parameter names."""
    definition = yaml.safe_load(path.read_text())
    problems = []
    if not CRON.match(str(definition.get("cron", ""))):
        problems.append("cron: needs six fields (second minute hour day month weekday)")
    if definition.get("max_concurrency") != 1:
        problems.append("max_concurrency: must be 1 (two retrainings must never overlap)")
    unknown = set(definition.get("parameters", {})) - set(_pipeline_inputs())
    if unknown:
        problems.append(f"parameters: the pipeline has no {sorted(unknown)}")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return definition


def _pipeline_inputs() -> list[str]:
    import inspect

    return list(inspect.signature(sista_pipeline.pipeline_func).parameters)


def recurring_run_arguments(definition: dict[str, Any], experiment_id: str) -> dict[str, Any]:
    """Keyword arguments of ``kfp.Client.create_recurring_run`` for the definition."""
    return {
        "experiment_id": experiment_id,
        "job_name": definition["name"],
        "description": definition.get("description"),
        "cron_expression": definition["cron"],
        "max_concurrency": definition["max_concurrency"],
        "no_catchup": definition.get("no_catchup", True),
        "params": definition.get("parameters", {}),
        "pipeline_package_path": definition.get("pipeline_package", str(PIPELINE_FILE)),
        "enabled": definition.get("enabled", True),
        "enable_caching": False,
        "service_account": definition.get("service_account"),
    }


def schedule(client: Any, definition: dict[str, Any]) -> Any:
    """Create the recurring run with a ``kfp.Client`` (its experiment made if missing)."""
    experiment = client.create_experiment(
        definition["experiment"], namespace=definition.get("namespace")
    )
    return client.create_recurring_run(
        **recurring_run_arguments(definition, experiment.experiment_id)
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.kubeflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("compile", help="write the pipeline's YAML")
    build.add_argument("--out", type=Path, default=PIPELINE_FILE)
    recurring = commands.add_parser("schedule", help="create the recurring run on a KFP server")
    recurring.add_argument("--host", required=True, help="the Kubeflow Pipelines API endpoint")
    recurring.add_argument("--definition", type=Path, default=RECURRING_RUN_FILE)
    args = parser.parse_args(argv)
    if args.command == "compile":
        print(f"wrote {compile_pipeline(args.out)}")
        return
    import kfp

    definition = read_recurring_run(args.definition)
    created = schedule(kfp.Client(host=args.host), definition)
    print(f"recurring run {created.recurring_run_id}: {definition['name']} at {definition['cron']}")


if __name__ == "__main__":
    main()
