"""Before any compute: every location ``params.yaml`` names answers, or one line says which.

Local dataset folders and weight files must exist; ``s3://`` locations must answer through
the storage service (bucket present, credentials found and accepted; transient failures are
retried first). A failure is a ``ResourceError`` (a ``ConfigError``): the launcher prints it
and exits 2 before Ray, MLflow or any output folder is touched.
"""

from __future__ import annotations

from pathlib import Path

from components.platform.config import ConfigError, Params


class ResourceError(ConfigError):
    """A location named in params.yaml is missing or unreachable."""


def stage_resources(params: Params, stage: str) -> dict[str, tuple[str, bool]]:
    """``{dotted key: (location, must already hold data)}`` that ``stage`` reads or writes."""
    named: dict[str, tuple[str | None, bool]] = {
        "storage.uri": (params.storage.uri, False),
        "mlflow.artifact_root": (params.mlflow.artifact_root, False),
    }
    if stage == "ingest":
        ingest = params.ingest
        named["ingest.source_path"] = (ingest.source_path, True)
        for name, spec in ingest.downstream.sets.items():
            named[f"ingest.downstream.sets.{name}.path"] = (spec.path, True)
    if stage in ("pretrain", "sweep"):  # a sweep pre-trains in every trial
        named["pretrain.image.checkpoint"] = (params.pretrain.image.checkpoint, True)
    return {key: (where, required) for key, (where, required) in named.items() if where}


def check_resources(params: Params, stage: str, source: str = "params.yaml") -> None:
    """Raise ``ResourceError`` naming the key and the location of the first that fails."""
    for key, (where, required) in stage_resources(params, stage).items():
        if where.startswith("s3://"):
            problem = _s3_problem(params, where, required)
        elif required and not Path(where).exists():
            problem = f"no such file or folder: {where}"
        else:
            problem = None
        if problem:
            raise ResourceError(f"{source}: {key}: {problem}")


def _s3_problem(params: Params, uri: str, required: bool) -> str | None:
    # Imported here: boto3 costs half a second that a local-only run need not pay.
    from components.platform.storage import StorageError, StorageSettings, exists

    try:
        found = exists(uri, settings=StorageSettings(endpoint_url=params.storage.endpoint_url))
    except StorageError as error:
        return str(error)
    return f"nothing at {uri}" if required and not found else None
