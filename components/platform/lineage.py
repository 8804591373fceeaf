"""What a model was made from: the data it read, the parameters and the code, as three hashes.

- **data**: the listing of every source the pipeline reads (the pre-training source and each
  downstream set's folder): each file's path with its size and modification time, or each
  object's key with its ETag on S3. The embedded data ships inside pinned packages: their
  names and versions stand for it. A new study, a replaced image or a deleted report changes
  the hash; reading the files does not.
- **params**: the validated parameters that decide what is computed (every section except
  where things run and are stored, ``storage``, ``ray``, ``mlflow``, and how a scheduled run
  retrains, ``retrain``), as canonical JSON.
- **code**: the project's Python sources (``sista_core``, ``components``, ``pipeline``) and
  the pinned dependency list, as found next to this package.

Pre-training tags each registered model version with them (``lineage.*``), publish records
them on its run, and the scheduled retraining compares the current ones with those of the last
run that finished (``python -m components.platform.lineage``), deciding:

- ``skip``: nothing changed, nothing to retrain;
- ``update``: only the data changed, and the @champion was made with the current params and
  code: ingest decodes only the new records, SISTA warm-starts from the champion for
  ``retrain.epochs`` (``retrain.start: champion``);
- ``retrain``: anything else (params or code changed, no champion, ``retrain.start:
  scratch``): the whole pipeline, as the first time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from components.platform import storage
from components.platform.config import ConfigError, Params, load_params, tracking_uri
from components.platform.stage_storage import read_manifest, settings_for, stage_dir

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CODE_FOLDERS = ("sista_core", "components", "pipeline")
CODE_FILES = ("requirements.lock",)
# The packages the embedded source and the phantom sets read their real assets from.
EMBEDDED_PACKAGES = ("torchxrayvision", "pneumonia-model-package", "pydicom-data")
# Where things run and how a scheduled run retrains, not what the pipeline computes.
NOT_RESULTS = ("storage", "ray", "mlflow", "retrain")
TAG_PREFIX = "lineage."
# components.platform.lineage's exit code for each decision
EXIT_CODES = {"retrain": 0, "skip": 3, "update": 4}


@dataclass(frozen=True)
class Lineage:
    data: str
    params: str
    code: str
    sources: int  # files or objects listed for ``data``

    def tags(self) -> dict[str, str]:
        """As MLflow tags (``lineage.data`` ...)."""
        return {f"{TAG_PREFIX}{key}": str(value) for key, value in asdict(self).items()}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Lineage | None:
        """The lineage recorded in ``tags``; None when any of it is missing."""
        try:
            return cls(
                data=tags[f"{TAG_PREFIX}data"],
                params=tags[f"{TAG_PREFIX}params"],
                code=tags[f"{TAG_PREFIX}code"],
                sources=int(tags[f"{TAG_PREFIX}sources"]),
            )
        except (KeyError, ValueError):
            return None

    def changes_from(self, before: Lineage | None) -> list[str]:
        """Which of data, params and code differ from ``before`` (all three without one)."""
        if before is None:
            return ["data", "params", "code"]
        return [
            key for key in ("data", "params", "code") if getattr(self, key) != getattr(before, key)
        ]


def _digest(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def source_paths(params: Params) -> list[str]:
    """Every folder or prefix the pipeline reads data from (sorted, each once)."""
    paths = {params.ingest.source_path} if params.ingest.source != "embedded" else set()
    paths |= {spec.path for spec in params.ingest.downstream.sets.values() if spec.path}
    return sorted(p for p in paths if p)


def source_listing(params: Params) -> list[str]:
    """One line per file or object: ``path<TAB>size:mtime`` (local) or ``key<TAB>ETag`` (S3),
    and one per embedded package: ``package<TAB>version``."""
    settings = settings_for(params.storage)
    lines = []
    for root in source_paths(params):
        if not storage.is_s3(root) and not Path(root).is_dir():
            raise FileNotFoundError(f"lineage: the source folder {root} does not exist")
        found = storage.object_versions(root, settings=settings)
        if not found:
            raise FileNotFoundError(f"lineage: the source {root} lists no file")
        lines += [f"{path}\t{version}" for path, version in sorted(found.items())]
    for package in EMBEDDED_PACKAGES:
        try:
            lines.append(f"{package}\t{metadata.version(package)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{package}\tnot installed")
    return lines


def params_hash(params: Params) -> str:
    decided = params.model_dump(mode="json", exclude=set(NOT_RESULTS))
    return _digest([json.dumps(decided, sort_keys=True)])


def code_version(root: Path = PROJECT_ROOT) -> str:
    """The hash of the project's sources, read file by file (a file's path and bytes)."""
    files = sorted(
        path
        for folder in CODE_FOLDERS
        for path in (root / folder).rglob("*.py")
        if "__pycache__" not in path.parts
    ) + [root / name for name in CODE_FILES if (root / name).is_file()]
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def current(params: Params) -> Lineage:
    listing = source_listing(params)
    return Lineage(
        data=_digest(listing), params=params_hash(params), code=code_version(), sources=len(listing)
    )


def of_ingested(params: Params) -> Lineage:
    """The lineage of this pipeline's outputs: the data ingest listed before it read (kept in
    its manifest) with the current params and code."""
    manifest = read_manifest(stage_dir(params, "ingest"))
    if "lineage" not in manifest:
        raise KeyError(
            f"{stage_dir(params, 'ingest')}: ingest's manifest records no lineage; run ingest again"
        )
    listed = manifest["lineage"]
    return Lineage(
        data=listed["data"],
        params=params_hash(params),
        code=code_version(),
        sources=listed["sources"],
    )


def last_finished(params: Params) -> tuple[str, Lineage | None] | None:
    """The newest finished publish run (its id and recorded lineage), or None: the last run
    of the whole pipeline that reached its end."""
    import mlflow

    from components.platform.tracking import experiment_name

    client = mlflow.MlflowClient(tracking_uri(params))
    experiment = client.get_experiment_by_name(experiment_name(params, "publish"))
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string="attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    return runs[0].info.run_id, Lineage.from_tags(runs[0].data.tags)


def champion(params: Params) -> tuple[str, Lineage | None] | None:
    """The registered model's @champion (its version and recorded lineage), or None when no
    version holds the alias. Any other registry error propagates: a check that cannot read
    the registry must not decide."""
    from components.platform.tracking import champion_version

    version = champion_version(params)
    return None if version is None else (str(version.version), Lineage.from_tags(version.tags))


def decide(
    now: Lineage, before: Lineage | None, champion_lineage: Lineage | None, start: str
) -> str:
    """``skip``, ``update`` or ``retrain`` (module docstring)."""
    changed = now.changes_from(before)
    if not changed:
        return "skip"
    warm = (
        changed == ["data"]
        and start == "champion"
        and champion_lineage is not None
        and (champion_lineage.params, champion_lineage.code) == (now.params, now.code)
    )
    return "update" if warm else "retrain"


def compare(params: Params) -> dict[str, Any]:
    """The current lineage, the last finished run's, what changed between them, the
    champion and the decision."""
    now = current(params)
    last = last_finished(params)
    run_id, before = last if last else (None, None)
    held = champion(params)
    version, champion_lineage = held if held else (None, None)
    return {
        "lineage": asdict(now),
        "last_run": run_id,
        "last_lineage": asdict(before) if before else None,
        "changed": now.changes_from(before),
        "champion": version,
        "decision": decide(now, before, champion_lineage, params.retrain.start),
    }


def record_decision(params: Params, result: dict[str, Any]) -> str:
    """A run of ``<prefix>-schedule`` named ``skipped``, ``update`` or ``retrain``, tagged
    with the current lineage, what changed and the run compared with; returns its id."""
    import mlflow

    from components.platform.tracking import experiment_for

    experiment_for(params, "schedule")
    decision = result["decision"]
    with mlflow.start_run(run_name="skipped" if decision == "skip" else decision) as run:
        mlflow.set_tags(
            {
                **Lineage(**result["lineage"]).tags(),
                "schedule.decision": decision,
                "schedule.changed": ",".join(result["changed"]) or "nothing",
                "schedule.compared_with": result["last_run"] or "none",
                "schedule.champion": result["champion"] or "none",
            }
        )
    return run.info.run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m components.platform.lineage",
        description="Hash the pipeline's inputs and compare them with the last finished run's; "
        "exit 0: retrain everything, 3: nothing changed (skip), 4: only the data changed "
        "(update: warm-start from @champion).",
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", help="also write the comparison here (JSON)")
    parser.add_argument(
        "--record",
        action="store_true",
        help="record the decision (retrain or skipped) as a run of the experiment "
        "<prefix>-schedule",
    )
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    result = compare(params)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    now = result["lineage"]
    print(
        f"inputs: data {now['data']} ({now['sources']} files or objects), params "
        f"{now['params']}, code {now['code']}"
    )
    if args.record:
        record_decision(params, result)
    decision = result["decision"]
    if decision == "skip":
        print(f"nothing changed since run {result['last_run']}: nothing to retrain")
        return EXIT_CODES[decision]
    since = f"since run {result['last_run']}" if result["last_run"] else "(no finished run yet)"
    print(f"changed {since}: {', '.join(result['changed'])}")
    if decision == "update":
        print(
            f"only the data changed: update (new records only, SISTA warm-started from "
            f"@champion version {result['champion']} for {params.retrain.epochs} epochs)"
        )
    else:
        print("retrain: the whole pipeline from scratch")
    return EXIT_CODES[decision]


if __name__ == "__main__":
    raise SystemExit(main())
