"""Run the CI-profile pipeline in a scratch folder, the way `dvc repro` runs it: each stage
through pipeline.launch, in one process so one local Ray instance serves every stage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from components.platform.config import with_overrides
from components.platform.profiles import profile_data
from pipeline.launch import PIPELINE

ROOT = Path(__file__).resolve().parents[1]
STAGE_COMMANDS = [list(command) for command in PIPELINE]


def write_ci_params(folder: Path, only_sets: tuple[str, ...] | None = None, **overrides) -> Path:
    """The ci profile with every path inside ``folder`` (plus dotted-key overrides);
    ``only_sets``: the downstream sets kept, and the tasks only on them."""
    params = profile_data("ci")
    if only_sets is not None:
        downstream = params["ingest"]["downstream"]
        downstream["sets"] = {k: v for k, v in downstream["sets"].items() if k in only_sets}
        tasks = params["evaluate"]["tasks"]
        for task, names in list(tasks.items()):
            kept = [n for n in names if n in only_sets or n == "pretrain"]
            if kept:
                tasks[task] = kept
            else:
                del tasks[task]
    params = with_overrides(params, overrides)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def run_stages(
    folder: Path, commands: list[list[str]], timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    script = (
        "import sys\n"
        "from pipeline.launch import launch\n"
        f"for stage, *args in {commands!r}:\n"
        "    code = launch(stage, 'params.yaml', args)\n"
        "    if code: sys.exit(code)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=folder,
        env=stage_environment(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def stage_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """Offline, a local Ray instance, the folder's own MLflow store, quick failure detection."""
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
        **(env or {}),
    }
    environment.pop("MLFLOW_TRACKING_URI", None)
    environment.pop("RAY_ADDRESS", None)
    return environment


def start_stage(
    folder: Path, args: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """``python -m pipeline.launch ARGS`` in the background, as the leader of its own process
    group (a job a scheduler could kill as a whole), output into ``log``."""
    with log.open("wb") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.launch", *args],
            cwd=folder,
            env=stage_environment(env),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def kill_job(process: subprocess.Popen) -> None:
    """SIGKILL a stage's whole process group and any descendant that left it (the local Ray
    instance's daemons and workers), as a preempted node would."""
    import psutil

    family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    os.killpg(process.pid, signal.SIGKILL)
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)
    process.wait()


def local_s3_environment(s3_server, folder: Path) -> dict[str, str]:
    """os.environ for a process that must talk to the local S3 server only: its endpoint
    and fake credentials, no AWS config files, proxies or instance metadata."""
    from s3_helpers import AWS_VARIABLES_REMOVED

    environment = {k: v for k, v in os.environ.items() if k not in AWS_VARIABLES_REMOVED}
    environment.update(
        AWS_CONFIG_FILE=str(folder / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(folder / "no-aws-credentials"),
        **s3_server.env,
    )
    return environment


def dvc_yaml_for(stages: tuple[str, ...]) -> dict:
    """The repository's dvc.yaml, these stages only, without the code dependencies (the
    work folder holds no code; the installed package runs)."""
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    kept = {name: pipeline["stages"][name] for name in stages}
    for stage in kept.values():
        stage["deps"] = [dep for dep in stage.get("deps", []) if dep.startswith("data/")]
        stage["cmd"] = stage["cmd"].replace("python ", f"{sys.executable} ", 1)
    return {"stages": kept}


def sh(command: list[str], folder: Path, env: dict, timeout: int = 900):
    result = subprocess.run(
        command, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{command}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result


# A commit author for the scratch repositories the DVC tests make.
GIT_IDENTITY = {
    "DVC_NO_ANALYTICS": "1",
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}


def dvc_executable() -> str:
    return str(Path(sys.executable).with_name("dvc"))


def init_dvc_repository(folder: Path, env: dict, message: str) -> None:
    """``folder`` as a git + DVC repository with everything in it committed (``env`` holds
    ``GIT_IDENTITY``)."""
    dvc = dvc_executable()
    for command in (
        ["git", "init", "-q"],
        [dvc, "init", "-q"],
        [dvc, "config", "core.analytics", "false"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", message],
    ):
        sh(command, folder, env)


def wait_for(condition, job, what: str, timeout: float = 900):
    """Poll ``condition()`` until it returns something truthy; fail if the job ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        assert job.poll() is None, f"the job ended (exit {job.returncode}) before {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
