"""Where stage folders live: ``storage.uri``, a local folder or an S3 prefix.

With ``storage.uri: s3://bucket/prefix`` the S3 prefix is the source of truth and
``storage.local_dir`` a local copy: a stage pulls the output folders it reads (checked
against their manifests' content hashes) and pushes its own when complete, manifest last,
so no reader takes a half-uploaded folder for a complete one. Every node of a cluster pulls
what it reads; Ray Train and Tune write checkpoints straight to S3 (:func:`ray_storage`).
With a local ``storage.uri`` nothing is copied: the folder is read and written in place.

The few small files DVC compares experiments by (``dvc exp show``, ``dvc metrics diff``,
``dvc plots diff``) are exported from the stage folders into ``metrics/``, which git tracks
(:func:`export_tracked`): dvc.yaml's ``cache: false`` metrics, plots and outputs.

A stage output is written atomically, with a manifest of content hashes: the stage writes into
a hidden temporary folder beside its output folder and renames it into place only when
everything (manifest last) is written, so neither DVC nor the next stage can ever take a
half-written output for a complete one (:func:`atomic_output_dir`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from components.platform import storage
from components.platform.config import Params, StorageSection
from components.platform.storage import replace_dir

MANIFEST = "_stage.json"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def content_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` (except the manifest), by relative path."""
    return {
        str(path.relative_to(folder)): file_sha256(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


@contextmanager
def atomic_output_dir(
    final: str | Path, stage: str, info: dict[str, Any] | None = None
) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield ``(temp_folder, manifest_extra)``; on success write the manifest and swap the
    folder into ``final``. On any error the temporary folder is removed and ``final`` is
    untouched. Leftovers of a killed run (``.NAME.tmp-*``, and ``.NAME.old-*`` when it died
    between the two renames of ``replace_dir``) are cleared on the next run."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in (
        *final.parent.glob(f".{final.name}.tmp-*"),
        *final.parent.glob(f".{final.name}.old-*"),
    ):
        shutil.rmtree(stale, ignore_errors=True)
    temp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    temp.mkdir()
    extra: dict[str, Any] = dict(info or {})
    started = time.time()
    try:
        yield temp, extra
        manifest = {
            "stage": stage,
            "seconds": round(time.time() - started, 2),
            **extra,
            "files": content_hashes(temp),
        }
        (temp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        replace_dir(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a completed stage output; a clear error when the stage has not run."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {MANIFEST}: run its stage first")
    return json.loads(path.read_text())


# Where the launcher exports the files git versions for DVC (relative to the folder `dvc repro`
# runs in, the repository root): dvc.yaml's `cache: false` metrics, plots and outputs.
TRACKED_DIR = Path("metrics")
# SISTA's last-epoch means of its loss terms (unweighted) and of the share of in-batch negatives
# SIA flagged as false negatives: name in metrics/ -> key of pretrain's metrics.json. All in
# metrics/full/pretrain.json; the ones `dvc exp show` lists (a column each) in pretrain.json.
PRETRAIN_TERMS = {
    "loss_sia": "epoch_loss_sia",
    "loss_sta": "epoch_loss_sta",
    "loss_intra": "epoch_loss_intra",
    "flag_rate": "epoch_fraction_negatives_eliminated",
}
PRETRAIN_HEADLINE = ("loss_sia", "flag_rate")
# The tracked files `dvc exp show` does not list, `dvc metrics diff -R --targets metrics` does.
FULL_DIR = Path("full")

# The output folders each stage reads (dvc.yaml's data deps); pretrain's are also read by
# every Ray Train worker, on whichever node it runs.
PRETRAIN_INPUTS = ("ingest", "reports", "similarity")


class StageOutputMissing(storage.ObjectNotFound):
    """A stage's input folder has no manifest on storage: its stage has not run there."""


def settings_for(section: StorageSection) -> storage.StorageSettings:
    return storage.StorageSettings(endpoint_url=section.endpoint_url)


def on_s3(section: StorageSection) -> bool:
    return storage.is_s3(section.uri)


def data_root(section: StorageSection) -> Path:
    """The absolute local folder that holds the stage folders (the copy, with S3)."""
    return Path(section.local_dir if on_s3(section) else section.uri).resolve()


def stage_dir(params: Params, stage: str) -> Path:
    """Local folder of a stage's outputs (``<root>/<stage>``)."""
    return data_root(params.storage) / stage


def absolute(section: StorageSection) -> StorageSection:
    """The section with local paths made absolute, for processes in other folders (Ray
    workers, jobs): they then read and write the same places as this process."""
    uri = section.uri if on_s3(section) else str(Path(section.uri).resolve())
    return section.model_copy(update={"uri": uri, "local_dir": str(data_root(section))})


def input_folders(params: Params, stage: str) -> list[str]:
    """The output folders ``stage`` reads, relative to the root."""
    pretrained = [f"pretrain/{init}" for init in params.evaluate.inits if init != "random"]
    return {
        "ingest": [],
        "reports": ["ingest"],
        "similarity": ["reports"],
        "pretrain": list(PRETRAIN_INPUTS),
        "evaluate": [*PRETRAIN_INPUTS, *pretrained],  # retrieval reads the held-out pairs
        "publish": ["evaluate"],
        "sweep": list(PRETRAIN_INPUTS),  # trials pre-train; the signal reads ingest's subsets
    }[stage]


def output_folders(params: Params, stage: str, variant: str | None = None) -> list[str]:
    """The folders one run of ``stage`` writes: pre-training one per variant, every variant
    unless ``--variant`` names one."""
    if stage != "pretrain":
        return [stage]
    variants = ["sista", *params.pretrain.baselines] if variant in (None, "all") else [variant]
    return [f"pretrain/{v}" for v in variants]


def check_access(params: Params) -> None:
    """One-line StorageError now, before any work, when an S3 location of the run (stage
    folders, MLflow artifacts) has no bucket, no endpoint or no valid credentials."""
    settings = settings_for(params.storage)
    for uri in (params.storage.uri, params.mlflow.artifact_root):
        storage.check_access(uri, settings=settings)


def pull(section: StorageSection, folders: list[str] | tuple[str, ...]) -> Path:
    """Make the local copy of each folder match storage (nothing is copied for a local uri
    or for a copy whose manifest is already the stored one); returns the local root. A
    folder without its manifest is StageOutputMissing, naming the stage to run first."""
    root = data_root(section)
    for folder in folders:
        if on_s3(section):
            _pull_folder(section, folder, root)
        elif not (root / folder / MANIFEST).is_file():
            raise _output_missing(root / folder, folder)
    return root


def _output_missing(location: Path | str, folder: str, also: str = "") -> StageOutputMissing:
    """The one-line error for an input folder without its manifest, local or on S3."""
    stage = folder.split("/")[0]
    return StageOutputMissing(
        f"{location} has no {MANIFEST}: stage {stage!r} has not completed there{also} "
        f"(run it first: dvc repro, or python -m pipeline.launch {stage})"
    )


def _pull_folder(section: StorageSection, folder: str, root: Path) -> None:
    settings = settings_for(section)
    remote = storage.join(section.uri, folder)
    local = root / folder
    try:
        stored = storage.read_bytes(storage.join(remote, MANIFEST), settings=settings)
    except storage.ObjectNotFound:
        also = f", or is writing it now (storage.uri {section.uri})"
        raise _output_missing(remote, folder, also) from None
    copy = local / MANIFEST
    if copy.is_file() and copy.read_bytes() == stored:
        return
    root.mkdir(parents=True, exist_ok=True)
    # Workers on one node share the copy: one downloads, the others find it done.
    with open(root / f".{folder.replace('/', '__')}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if copy.is_file() and copy.read_bytes() == stored:
            return
        storage.download_dir(remote, local, settings=settings)
        manifest = json.loads((local / MANIFEST).read_text())
        if content_hashes(local) != manifest["files"]:
            shutil.rmtree(local)  # never leave a mixed copy that looks current
            raise storage.StorageError(
                f"{remote} changed while it was copied (its files do not match its "
                f"{MANIFEST}): is a stage writing it now? Run again once it has finished"
            )


def push(section: StorageSection, folder: str) -> None:
    """Upload a completed local folder to storage: the old manifest goes first, the new one
    last, and objects the new output no longer has are removed."""
    if not on_s3(section):
        return
    settings = settings_for(section)
    local = data_root(section) / folder
    remote = storage.join(section.uri, folder)
    manifest = storage.join(remote, MANIFEST)
    storage.delete(manifest, settings=settings)
    written = {manifest}
    for path in sorted(p for p in local.rglob("*") if p.is_file() and p.name != MANIFEST):
        target = storage.join(remote, path.relative_to(local).as_posix())
        storage.copy_file(str(path), target, settings=settings)
        written.add(target)
    for stale in set(storage.list_prefix(remote, settings=settings)) - written:
        storage.delete(stale, settings=settings)
    storage.copy_file(str(local / MANIFEST), manifest, settings=settings)


def previous_output(params: Params, folder: str) -> tuple[Path, dict[str, Any]] | None:
    """A stage folder's last completed output (pulled when on S3) and its manifest, for a
    stage that reuses what it made before; None when there is none or it is unreadable."""
    try:
        local = pull(params.storage, [folder]) / folder
        return local, read_manifest(local)
    except (storage.ObjectNotFound, OSError, ValueError):  # StageOutputMissing included
        return None


@contextmanager
def stage_output(
    params: Params, folder: str, info: dict[str, Any] | None = None
) -> Iterator[tuple[Path, dict[str, Any]]]:
    """:func:`atomic_output_dir` for the stage folder ``folder``, pushed to storage once
    complete. Yields ``(temp_folder, manifest_extra)``."""
    with atomic_output_dir(data_root(params.storage) / folder, folder.split("/")[0], info) as (
        out,
        extra,
    ):
        yield out, extra
    push(params.storage, folder)


def ray_storage(params: Params, name: str) -> dict[str, Any]:
    """``storage_path`` (and ``storage_filesystem`` for S3) of a Ray Train / Tune run, as
    keyword arguments of its ``RunConfig``: ``<storage.uri>/<name>``."""
    section = params.storage
    if not on_s3(section):
        return {"storage_path": str(data_root(section) / name)}
    path = storage.join(section.uri, name)[len(storage.S3_SCHEME) :]
    return {
        "storage_path": path,
        "storage_filesystem": storage.arrow_filesystem(settings_for(section)),
    }


def export_tracked(
    params: Params, stage: str, variant: str | None = None, root: Path = Path(".")
) -> list[Path]:
    """Copy what DVC versions in git from a completed stage's folder into ``root/metrics``:
    evaluate's headline (``evaluate.json``: SISTA's score per task) and every init's score per
    (task, set) (``full/evaluate.json``); each pre-trained variant's loss history
    (``history/<variant>.json``, one record a line), and SISTA's loss terms and flag rate
    (``full/pretrain.json``; ``pretrain.json`` the two ``dvc exp show`` lists). Run where
    `dvc repro` runs, after the stage (a job on a cluster included). Returns the files
    written."""
    data = data_root(params.storage)
    written: dict[Path, str] = {}
    if stage == "evaluate":
        written[Path("evaluate.json")] = (data / "evaluate" / "headline.json").read_text()
        written[FULL_DIR / "evaluate.json"] = (data / "evaluate" / "scores.json").read_text()
    elif stage == "pretrain":
        for folder in output_folders(params, stage, variant):
            name = folder.split("/")[-1]
            history = json.loads((data / folder / "history.json").read_text())
            lines = ",\n".join(json.dumps(record) for record in history)
            written[Path("history") / f"{name}.json"] = f"[\n{lines}\n]\n"
            if name == "sista":
                metrics = json.loads((data / folder / "metrics.json").read_text())
                terms = {
                    key: round(metrics[source], 4)
                    for key, source in PRETRAIN_TERMS.items()
                    if isinstance(metrics.get(source), int | float)
                }
                shown = {key: terms[key] for key in PRETRAIN_HEADLINE if key in terms}
                written[Path("pretrain.json")] = json.dumps(shown, indent=1) + "\n"
                written[FULL_DIR / "pretrain.json"] = json.dumps(terms, indent=1) + "\n"
    paths = []
    for relative, text in written.items():
        path = root / TRACKED_DIR / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(text)
        temporary.replace(path)  # a reader never sees half a file
        paths.append(path)
    return paths
