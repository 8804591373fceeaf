"""infra/ as a cluster receives it: every manifest validates offline against Kubernetes and
KubeRay schemas, every entry point it names exists in the code, the committed Kubeflow
pipeline is what the code compiles, and the recurring run is what KFP's client is given."""

import copy
import importlib
import json
import re
import shlex

import pytest
import yaml
from infra_schemas import ROOT, manifests, validation_errors

from components.platform.config import Params
from components.platform.stage import JOBS, STAGES
from pipeline import kubeflow
from pipeline.kubeflow_step import decision_of, stage_arguments
from pipeline.launch import stage_runs

MANIFESTS = manifests()


def test_infra_holds_the_cluster_the_pipeline_needs():
    kinds = {(path.name, document["kind"]) for path, document in MANIFESTS}
    assert ("raycluster.yaml", "RayCluster") in kinds
    assert {name for name, kind in kinds if kind == "RayJob"} >= {
        "rayjob-pipeline.yaml",
        "rayjob-sweep.yaml",
    }
    assert {kind for _, kind in kinds} >= {"Namespace", "PersistentVolumeClaim", "Deployment"}


@pytest.mark.parametrize(
    "path, document",
    MANIFESTS,
    ids=[f"{p.relative_to(ROOT)}:{d['kind']}/{d['metadata']['name']}" for p, d in MANIFESTS],
)
def test_every_manifest_validates(path, document):
    assert validation_errors(document) == []


def _ray_cluster():
    return copy.deepcopy(next(d for _, d in MANIFESTS if d["kind"] == "RayCluster"))


@pytest.mark.parametrize(
    "break_it, message",
    [
        (
            lambda c: c["spec"].update(workerGroupSpec=c["spec"].pop("workerGroupSpecs")),
            "'workerGroupSpec' was unexpected",
        ),
        (lambda c: c["spec"]["workerGroupSpecs"][0].pop("groupName"), "'groupName' is a required"),
        (
            lambda c: c["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(
                imagePullPolicyy="Always"
            ),
            "'imagePullPolicyy' was unexpected",
        ),
        (lambda c: c["spec"]["autoscalerOptions"].update(upscalingMode="Eager"), "'Eager' is not"),
    ],
    ids=["kuberay-field", "required", "pod-template-field", "enum"],
)
def test_a_broken_ray_cluster_fails_validation(break_it, message):
    """The schemas are strict where kubectl's server-side validation is, down into the pod
    templates (Kubernetes' own schema behind KubeRay's)."""
    cluster = _ray_cluster()
    assert validation_errors(cluster) == []
    break_it(cluster)
    assert any(message in error for error in validation_errors(cluster))


def test_a_broken_core_manifest_fails_validation():
    deployment = copy.deepcopy(next(d for _, d in MANIFESTS if d["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagee"] = "x"
    assert any("'imagee' was unexpected" in e for e in validation_errors(deployment))


def test_gpu_workers_ask_for_gpus_and_every_ray_pod_gets_storage_and_params():
    cluster = _ray_cluster()
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == gpu["requests"]["nvidia.com/gpu"] == "1"
    pods = [cluster["spec"]["headGroupSpec"]] + list(groups.values())
    for pod in pods:
        container = pod["template"]["spec"]["containers"][0]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/etc/sista", "/shared"} <= mounts
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in container["env"]
        assert container["envFrom"] == [{"secretRef": {"name": "sista-s3"}}]


# --- entry points -------------------------------------------------------------------------


def _launched(text: str) -> list[list[str]]:
    """Each ``python -m pipeline.launch STAGE [args]`` command in ``text``."""
    commands = []
    for match in re.finditer(r"python -m pipeline\.launch ([^&\n'\"]+)", text):
        commands.append(shlex.split(match.group(1)))
    return commands


def _stage_exists(stage: str) -> None:
    assert stage in JOBS, f"{stage!r} is not a job pipeline.launch runs ({JOBS})"
    module = importlib.import_module(f"components.stages.{stage}")
    assert callable(module.main) and callable(module.run)


def test_the_image_entry_point_and_its_files_exist():
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M).group(1))
    assert entrypoint == ["python", "-m", "pipeline.launch"]
    assert callable(importlib.import_module("pipeline.launch").main)
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, re.M):
        for name in source.split():
            assert (ROOT / name).exists(), f"Dockerfile copies {name}, which is not in the repo"
    assert "-c requirements.lock" in dockerfile  # the same pins as `make venv`
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.M)


def test_every_stage_the_manifests_run_exists():
    entrypoints = {
        path.name: document["spec"]["entrypoint"]
        for path, document in MANIFESTS
        if document["kind"] == "RayJob"
    }
    commands = [command for text in entrypoints.values() for command in _launched(text)]
    assert len(commands) > len(entrypoints) > 0
    for stage, *arguments in commands:
        _stage_exists(stage)
        if "--variant" in arguments:
            variant = arguments[arguments.index("--variant") + 1]
            assert variant == "sista" or variant in Params().pretrain.baselines
    assert _launched(entrypoints["rayjob-sweep.yaml"])[0][0] == "sweep"


def test_the_rayjob_and_dvc_yaml_run_the_declared_stages_in_order():
    """The stage list is declared once (components.platform.stage.STAGES, the variants by the base
    params.yaml's pretrain.baselines); the files that spell it out follow it."""
    variants = ("sista", *Params().pretrain.baselines)
    (rayjob,) = [d for p, d in MANIFESTS if p.name == "rayjob-pipeline.yaml"]
    launched = [tuple(c[: c.index("--params")]) for c in _launched(rayjob["spec"]["entrypoint"])]
    assert launched == stage_runs(variants)
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert list(dvc["stages"]) == list(STAGES)
    pretrain, evaluate = dvc["stages"]["pretrain"], dvc["stages"]["evaluate"]
    outputs = [out for out in pretrain["outs"] if isinstance(out, str)]
    assert outputs == [f"data/pretrain/{variant}" for variant in variants]
    plots = [next(iter(plot)) for plot in pretrain["plots"]]
    assert plots == [f"metrics/history/{variant}.json" for variant in variants]
    models = [dep for dep in evaluate["deps"] if dep.startswith("data/pretrain/")]
    assert models == [f"data/pretrain/{variant}/model" for variant in variants]


def _compiled(path) -> tuple[dict, dict]:
    """A compiled pipeline: its pipeline spec and its Kubernetes platform spec."""
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform


def _stage_dag(spec: dict) -> dict[str, dict]:
    """The tasks that run the stages: those of the branch taken when the inputs changed."""
    (branch,) = [t for t in spec["root"]["dag"]["tasks"].values() if "triggerPolicy" in t]
    return spec["components"][branch["componentRef"]["name"]]["dag"]["tasks"]


def _compiled_tasks(path) -> dict[str, dict[str, str]]:
    """stage task name -> its constant string inputs, from a compiled pipeline."""
    spec, _ = _compiled(path)
    return {
        name: {
            key: value["runtimeValue"]["constant"]
            for key, value in task["inputs"]["parameters"].items()
            if "runtimeValue" in value
        }
        for name, task in _stage_dag(spec).items()
    }


def test_the_committed_kubeflow_pipeline_is_a_fresh_compile(tmp_path):
    fresh = kubeflow.compile_pipeline(tmp_path / "sista_pipeline.yaml")
    committed = ROOT / kubeflow.PIPELINE_FILE
    assert fresh.read_text() == committed.read_text(), "run `make kubeflow` and commit"


def test_the_kubeflow_pipeline_runs_every_stage_on_the_cluster_in_dvc_order():
    tasks = _compiled_tasks(ROOT / kubeflow.PIPELINE_FILE)
    stages = [inputs["stage"] for inputs in tasks.values()]
    for stage in stages:
        _stage_exists(stage)
    assert sorted(set(stages)) == sorted(STAGES)
    variants = sorted(i["variant"] for i in tasks.values() if i["stage"] == "pretrain")
    assert variants == sorted(kubeflow.PRETRAIN_VARIANTS)
    spec, platform = _compiled(ROOT / kubeflow.PIPELINE_FILE)
    # First the input check; the stages run unless it says skip, and each step is told what
    # it said (retrain or update).
    root = spec["root"]["dag"]["tasks"]
    (branch,) = [t for t in root.values() if "triggerPolicy" in t]
    assert branch["dependentTasks"] == ["check-inputs"]
    condition = branch["triggerPolicy"]["condition"]
    assert condition == "inputs.parameter_values['pipelinechannel--check-inputs-Output'] != 'skip'"
    dag = _stage_dag(spec)
    for task in dag.values():
        decision = task["inputs"]["parameters"]["decision"]
        assert decision == {"componentInputParameter": "pipelinechannel--check-inputs-Output"}
    by_stage = {}
    for name, inputs in tasks.items():
        by_stage.setdefault(inputs["stage"], []).append(name)
    (publish,) = by_stage["publish"]
    (evaluate,) = by_stage["evaluate"]
    assert dag[publish]["dependentTasks"] == [evaluate]
    assert sorted(dag[evaluate]["dependentTasks"]) == sorted(by_stage["pretrain"])
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["ray_address"]["defaultValue"].endswith(":8265")  # the KubeRay head
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert len(executors) == len(dag) + 1  # and the input check
    for executor in executors.values():  # params, S3 and Ray token on every step
        assert executor["configMapAsVolume"][0]["configMapName"] == "sista-params"
        assert {s["secretName"] for s in executor["secretAsEnv"]} == {
            "sista-s3",
            "sista-ray-token",
        }
    for task in [*dag.values(), root["check-inputs"]]:
        assert task["cachingOptions"] == {}  # caching off: the check decides, not KFP's cache


class RecordingClient:
    """Stands in for kfp.Client: records what a KFP server would be asked."""

    def __init__(self):
        self.calls = []

    def create_experiment(self, name, namespace=None):
        self.calls.append(("create_experiment", {"name": name, "namespace": namespace}))
        return type("Experiment", (), {"experiment_id": "exp-1"})()

    def create_recurring_run(self, **arguments):
        self.calls.append(("create_recurring_run", arguments))
        return type("RecurringRun", (), {"recurring_run_id": "run-1"})()


def test_the_recurring_run_retrains_weekly_one_run_at_a_time():
    definition = kubeflow.read_recurring_run(ROOT / kubeflow.RECURRING_RUN_FILE)
    client = RecordingClient()
    kubeflow.schedule(client, definition)
    (_, experiment), (_, arguments) = client.calls
    assert experiment["name"] == "sista"
    assert arguments["experiment_id"] == "exp-1"
    assert arguments["cron_expression"] == "0 0 3 * * 0"
    assert arguments["max_concurrency"] == 1
    assert arguments["no_catchup"] is True and arguments["enable_caching"] is False
    assert (ROOT / arguments["pipeline_package_path"]).is_file()
    compiled, _ = _compiled(ROOT / arguments["pipeline_package_path"])
    assert set(arguments["params"]) == set(compiled["root"]["inputDefinitions"]["parameters"])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"max_concurrency": 2}, "max_concurrency: must be 1"),
        ({"cron": "0 3 * * 0"}, "cron: needs six fields"),
        ({"parameters": {"param_path": "x"}}, "the pipeline has no ['param_path']"),
    ],
)
def test_a_bad_recurring_run_definition_is_refused(tmp_path, change, message):
    definition = yaml.safe_load((ROOT / kubeflow.RECURRING_RUN_FILE).read_text()) | change
    path = tmp_path / "recurring_run.yaml"
    path.write_text(yaml.safe_dump(definition))
    with pytest.raises(ValueError, match=re.escape(message)):
        kubeflow.read_recurring_run(path)


def _pod_specs(node):
    """Every pod spec (a mapping with ``containers``) anywhere in a manifest."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield node
        for value in node.values():
            yield from _pod_specs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _pod_specs(value)


def test_every_pod_runs_unprivileged_without_a_service_account_token():
    specs = [
        (path.name, spec)
        for path, document in MANIFESTS
        if path.parent.name in ("kubernetes", "kuberay")
        for spec in _pod_specs(document)
    ]
    assert len(specs) >= 6  # MLflow, the Ray head and 2 worker groups, the RayJob submitters
    for name, spec in specs:
        assert spec["automountServiceAccountToken"] is False, name
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["seccompProfile"] == {"type": "RuntimeDefault"}
        mounts_tmp = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, (name, container["name"])
            assert context["readOnlyRootFilesystem"] is True, (name, container["name"])
            assert context["capabilities"]["drop"] == ["ALL"], (name, container["name"])
            writable = {
                m["mountPath"] for m in container["volumeMounts"] if m["name"] in mounts_tmp
            }
            assert "/tmp" in writable, (name, container["name"])  # the root filesystem is not


def test_mlflow_asks_for_a_login_and_only_the_pipelines_pods_reach_it():
    documents = [d for p, d in MANIFESTS if p.name == "mlflow.yaml"]
    server = next(d for d in documents if d["kind"] == "Deployment")
    container = server["spec"]["template"]["spec"]["containers"][0]
    assert "--app-name=basic-auth" in container["args"]
    policy = next(d for d in documents if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "mlflow"}
    sources = policy["spec"]["ingress"][0]["from"]
    assert sources == [{"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "sista"}}}]
    ray = next(d for p, d in MANIFESTS if d["kind"] == "RayCluster")
    env = ray["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= {e["name"] for e in env}


def test_the_image_code_belongs_to_root():
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    assert "chown -R" not in dockerfile and "USER 1000" in dockerfile


@pytest.mark.parametrize(
    "ray_address, mlflow_uri",
    [
        ("http://attacker.example:8265", ""),
        ("http://sista-head-svc.other-team.svc.cluster.local:8265", ""),
        ("", "http://mlflow.attacker.example:5000"),
    ],
)
def test_a_step_sends_its_tokens_only_to_the_sista_namespace(ray_address, mlflow_uri):
    with pytest.raises(ValueError, match="is not a service of the sista namespace"):
        kubeflow.run_stage.python_func(
            stage="ingest",
            params_path="params.yaml",
            ray_address=ray_address,
            mlflow_tracking_uri=mlflow_uri,
        )


def test_the_input_check_sends_mlflows_login_only_to_the_sista_namespace():
    with pytest.raises(ValueError, match="mlflow_tracking_uri: 'mlflow.attacker.example' is not"):
        kubeflow.check_inputs.python_func(
            params_path="params.yaml", mlflow_tracking_uri="http://mlflow.attacker.example:5000"
        )


def test_each_step_runs_what_the_input_check_decided(tmp_path):
    assert [decision_of(code) for code in (0, 3, 4)] == ["retrain", "skip", "update"]
    with pytest.raises(RuntimeError, match="exit code 2"):
        decision_of(2)  # a bad params file or an unreachable registry: the run fails
    keep, again = tmp_path / "keep.yaml", tmp_path / "again.yaml"
    keep.write_text("retrain: {baselines: false}\n")
    again.write_text("retrain: {baselines: true}\n")
    assert stage_arguments("ingest", "", "update", str(keep)) == []
    assert stage_arguments("pretrain", "sista", "retrain", str(keep)) == ["--variant", "sista"]
    assert stage_arguments("pretrain", "sista", "update", str(keep)) == [
        "--variant",
        "sista",
        "--warm-start",
    ]
    assert stage_arguments("pretrain", "convirt", "update", str(keep)) is None  # kept
    assert stage_arguments("pretrain", "convirt", "update", str(again)) == ["--variant", "convirt"]
    assert stage_arguments("pretrain", "dense", "retrain", str(keep)) == ["--variant", "dense"]
