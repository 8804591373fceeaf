"""Stage ``ingest``: source -> manifest (parquet) + uint8 image shards + quarantine + splits.

Images are decoded, checked and resized once here (nanoGPT's "prepare once"), so training
never decodes a JPEG. Unusable records are quarantined with a reason and counted; the stage
fails only when more than ``ingest.max_quarantine_fraction`` of a dataset is unusable.

Incremental: each record's fingerprint (its listing entry and the size and modification time,
or ETag, of each of its files) is kept in the manifest. When the previous output was made with
the same ``ingest`` settings by the same code, a record with an unchanged fingerprint takes its
pixels, targets and labels (or its quarantine reason) from there; only new or changed records
are decoded. The manifest counts both (``<set>_decoded``, ``<set>_reused``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from components.platform import lineage, storage
from components.platform.config import PRETRAIN_SET, IngestSection, Params
from components.platform.remote_sources import RemoteSource, mirrored, prepare
from components.platform.runtime import ensure_ray, on_this_node
from components.platform.shards import ShardImages, ShardWriter, read_shard_masks, subset_file_name
from components.platform.stage import stage_main
from components.platform.stage_storage import previous_output, settings_for, stage_output
from components.platform.tracking import stage_run
from components.stages.downstream_sets import SetLabels, SetPlan, Split, plan_sets
from sista_core.datasets import (
    DatasetAdapter,
    MimicCxrJpg,
    OpenIDataset,
    RecordError,
    RecordRef,
)
from sista_core.datasets.embedded import OpenIPhantomDataset
from sista_core.datasets.images import boxes_mask, resize_boxes, resize_mask, resize_uint8
from sista_core.datasets.splits import nested_subsets, patient_splits
from sista_core.datasets.tables import ROW_ERROR
from sista_core.findings import OBSERVATIONS
from sista_core.reports.sections import extract_sections

RECORDS_PER_TASK = 64  # per-record work is milliseconds: amortise Ray's per-task overhead
_DEID_ONLY = re.compile(r"^[\sX_.,;:-]*$")  # Open-I's XXXX and MIMIC's ___ placeholders


class QuarantineLimitExceeded(RuntimeError):
    """Too large a share of a source is unusable: something is wrong with the source."""


def report_problem(report: Any) -> str | None:
    """Why a report cannot be used for pre-training, or None."""
    if report is None:
        return None
    if isinstance(report, bytes):
        try:
            report = report.decode("utf-8")
        except UnicodeDecodeError:
            return "non_utf8_report"
    if not str(report).strip():
        return "empty_report"
    if _DEID_ONLY.match(extract_sections(str(report)).text):
        return "report_only_deid"
    return None


def build_pretrain_source(config: IngestSection) -> DatasetAdapter:
    if config.source == "embedded":
        return OpenIPhantomDataset(config.image_size, config.seed, config.pretrain.max_reports)
    if config.source == "mimic_cxr":
        return MimicCxrJpg(Path(config.source_path))
    return OpenIDataset(Path(config.source_path))


Assign = Callable[[list[RecordRef]], list[tuple[RecordRef, Split]]]
# MIMIC-CXR's official split names -> the manifest's
OFFICIAL_SPLITS = {"train": "train", "validate": "val", "test": "test"}


def pretrain_splits(val_fraction: float, seed: int) -> Assign:
    """The pre-training split: the source's official one when its records carry it (MIMIC-CXR:
    train pre-trains, validate validates, test serves retrieval), else ``val_fraction`` of the
    patients, seeded."""

    def assign(refs: list[RecordRef]) -> list[tuple[RecordRef, Split]]:
        if any(ref.meta.get("split") in OFFICIAL_SPLITS for ref in refs):
            kept = [ref for ref in refs if ref.meta.get("split") in OFFICIAL_SPLITS]
            if len(kept) < len(refs):
                print(
                    f"[ingest] pretrain: {len(refs) - len(kept)} records without an official "
                    "split left out"
                )
            return [(ref, OFFICIAL_SPLITS[ref.meta["split"]]) for ref in kept]
        return patient_fractions(val_fraction, 0.0, seed)(refs)

    return assign


def patient_fractions(val_fraction: float, test_fraction: float, seed: int) -> Assign:
    """A seeded patient-level split with these validation and test fractions."""

    def assign(refs: list[RecordRef]) -> list[tuple[RecordRef, Split]]:
        split = patient_splits([r.patient_id for r in refs], val_fraction, test_fraction, seed)
        return [(ref, split[ref.patient_id]) for ref in refs]

    return assign


MANIFEST_SCHEMA = pa.schema(
    [
        ("record_id", pa.string()),
        ("patient_id", pa.string()),
        ("dataset", pa.string()),
        ("split", pa.string()),
        ("shard", pa.string()),
        ("index", pa.int64()),
        ("report", pa.string()),
        ("boxes", pa.list_(pa.float64())),  # x0, y0, x1, y1 per box, flattened
        ("labels", pa.list_(pa.float64())),  # a downstream set's own labels
        *((name, pa.float64()) for name in OBSERVATIONS),
        ("fingerprint", pa.string()),  # record_fingerprint: reused when unchanged
    ]
)
ROWS_PER_PART = 1024  # manifest rows turned columnar together: a few bytes a field, not objects


@dataclass
class IngestResult:
    """The manifest rows (held as Arrow tables) and the quarantined records of a dataset."""

    manifest_parts: list[pa.Table] = field(default_factory=list)
    quarantine_rows: list[dict[str, Any]] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)
    decoded: int = 0  # records read from the source
    reused: int = 0  # records taken from the previous output (unchanged fingerprint)

    def add_row(self, row: dict[str, Any]) -> None:
        self.pending.append(row)
        if len(self.pending) >= ROWS_PER_PART:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.manifest_parts.append(pa.Table.from_pylist(self.pending, MANIFEST_SCHEMA))
            self.pending = []

    def manifest(self) -> pa.Table:
        self.flush()
        return pa.concat_tables([MANIFEST_SCHEMA.empty_table(), *self.manifest_parts])

    @property
    def kept(self) -> int:
        return sum(part.num_rows for part in self.manifest_parts) + len(self.pending)

    @property
    def manifest_rows(self) -> list[dict[str, Any]]:
        """The rows as dicts (a downstream set's, or a test's: small)."""
        return self.manifest().to_pylist()


FileVersion = Callable[[Path], str]


def local_version(path: Path) -> str:
    """A local file's size and modification time ("missing" when absent)."""
    try:
        stat = os.stat(path)
    except OSError:
        return "missing"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def record_fingerprint(ref: RecordRef, version: FileVersion = local_version) -> str:
    """What a record's decoded content depends on besides the ingest settings: its listing
    entry (ids, paths, labels, split, view...) and the version of each file it reads. Equal
    fingerprints: the previous decode still holds."""
    meta = {
        key: str(value) if isinstance(value, Path) else value for key, value in ref.meta.items()
    }
    files = {str(path): version(path) for path in ref.files()}
    described = [ref.record_id, ref.patient_id, str(ref.image_path), meta, files]
    text = json.dumps(described, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def source_versions(remote: RemoteSource | None, settings: storage.StorageSettings) -> FileVersion:
    """How to version a record's files: local ones by size and mtime; those of a dataset on S3
    (read from its local listing copy) by their object's ETag, listed once."""
    if remote is None:
        return local_version
    etags = storage.object_versions(remote.uri, settings=settings)

    def version(path: Path) -> str:
        if path.is_relative_to(remote.root):
            return etags.get(remote.key(path), "missing")
        return local_version(path)

    return version


class PreviousIngest:
    """The last completed ingest output, read record by record: its manifest and quarantine
    rows by (dataset, record id) and its shards memory-mapped. Used only when it was made with
    the same ``ingest`` settings by the same code (``lineage.code_version``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.manifest = pq.read_table(folder / "manifest.parquet")
        quarantine = pq.read_table(folder / "quarantine.parquet")
        self.quarantined = {
            (row["dataset"], row["record_id"]): row
            for row in quarantine.to_pylist()
            if row.get("fingerprint")
        }
        keys = zip(
            self.manifest.column("dataset").to_pylist(),
            self.manifest.column("record_id").to_pylist(),
            self.manifest.column("fingerprint").to_pylist(),
            strict=True,
        )
        # (dataset, record id) -> (fingerprint, row): a few dozen bytes per record
        self.position = {(d, r): (f, i) for i, (d, r, f) in enumerate(keys)}

    @classmethod
    def of(cls, params: Params, code: str) -> PreviousIngest | None:
        """The previous output of this pipeline's ingest, when there is one made with the
        current ``ingest`` settings and ``code`` (``lineage.code_version``; anything else
        decodes every record again)."""
        previous = previous_output(params, "ingest")
        if previous is None:
            return None
        folder, manifest = previous
        if manifest.get("ingest_settings") != params.ingest.model_dump(mode="json"):
            print("[ingest] the previous output used other ingest settings: decoding everything")
            return None
        if manifest.get("code") != code:
            print("[ingest] the previous output was made by other code: decoding everything")
            return None
        try:
            return cls(folder)
        except (OSError, KeyError, pa.ArrowException) as error:
            print(
                f"[ingest] the previous output in {folder} is unreadable ({error}): decoding "
                "everything"
            )
            return None

    def has(self, dataset: str, record_id: str, fingerprint: str) -> bool:
        found = self.position.get((dataset, record_id))
        if found is not None:
            return found[0] == fingerprint
        quarantined = self.quarantined.get((dataset, record_id))
        return quarantined is not None and quarantined["fingerprint"] == fingerprint

    def loaded(
        self, dataset: str, refs: list[RecordRef], image_size: int, with_targets: bool, width: int
    ) -> dict[str, np.ndarray]:
        """``load_records``' arrays for ``refs`` (all of them ``has``), from this output."""
        kept = [self.position.get((dataset, ref.record_id)) for ref in refs]
        rows = self.manifest.take([found[1] for found in kept if found]).to_pylist()
        images = ShardImages(self.folder, rows)[:] if rows else None
        masks = read_shard_masks(self.folder, rows) if rows and with_targets else None
        blank = np.zeros((image_size, image_size), np.uint8)
        loaded: dict[str, list[Any]] = {key: [] for key in LOADED_KEYS}
        taken = 0
        for ref, found in zip(refs, kept, strict=True):
            if found is None:
                problem = self.quarantined[(dataset, ref.record_id)]
                row, image, mask = None, blank, blank.astype(bool)
            else:
                problem, row = None, rows[taken]
                image = images[taken]
                mask = masks[taken] if masks is not None else blank.astype(bool)
                taken += 1
            loaded["image"].append(image)
            loaded["mask"].append(mask)
            loaded["ok"].append(problem is None)
            loaded["reason"].append(problem["reason"] if problem else "")
            loaded["detail"].append(problem["detail"] if problem else "")
            observed = [row[name] for name in OBSERVATIONS] if row else [None] * len(OBSERVATIONS)
            loaded["labels"].append(np.array(observed, np.float64).astype(np.float32))
            loaded["report"].append((row["report"] or "") if row else "")
            loaded["boxes"].append(list(row["boxes"] or []) if row else [])
            own = row["labels"] if row and row["labels"] is not None else [0.0] * width
            loaded["set_labels"].append(np.asarray(own, np.float32).reshape(width))
        return {
            "image": np.stack(loaded["image"]),
            "ok": np.array(loaded["ok"]),
            "reason": np.array(loaded["reason"], dtype=object),
            "detail": np.array(loaded["detail"], dtype=object),
            "labels": np.stack(loaded["labels"]),
            "report": np.array(loaded["report"], dtype=object),
            "set_labels": np.stack(loaded["set_labels"]).reshape(len(refs), width),
            **(
                {"mask": np.stack(loaded["mask"]), "boxes": _object_array(loaded["boxes"])}
                if with_targets
                else {}
            ),
        }


LOADED_KEYS = ("image", "mask", "ok", "reason", "detail", "labels", "report", "boxes", "set_labels")


def _object_array(items: list[Any]) -> np.ndarray:
    """A 1-D object array of ``items`` (lists, kept as they are)."""
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def combined_blocks(
    parts: list[tuple[list[int], dict[str, np.ndarray]]], size: int
) -> dict[str, np.ndarray]:
    """One block's arrays from parts that each hold some of its rows (their positions)."""
    first = parts[0][1]
    combined: dict[str, np.ndarray] = {}
    for key, values in first.items():
        shape = (size, *values.shape[1:]) if values.dtype != object else (size,)
        combined[key] = np.empty(shape, dtype=values.dtype)
    for positions, arrays in parts:
        for key, values in arrays.items():
            if values.dtype == object:
                for position, value in zip(positions, values, strict=True):
                    combined[key][position] = value
            else:
                combined[key][positions] = values
    return combined


def _screen(refs: list[RecordRef], dataset: str, result: IngestResult) -> list[RecordRef]:
    """Drop duplicate ids and bad reports before any pixel is read; quarantine them."""
    seen: set[str] = set()
    usable = []
    for ref in refs:
        reason = "duplicate_id" if ref.record_id in seen else report_problem(ref.meta.get("report"))
        seen.add(ref.record_id)
        if reason:
            result.quarantine_rows.append(
                {"record_id": ref.record_id, "dataset": dataset, "reason": reason, "detail": ""}
            )
        else:
            usable.append(ref)
    return usable


def load_records(
    adapter: DatasetAdapter,
    refs: list[RecordRef],
    image_size: int,
    with_targets: bool,
    set_labels: SetLabels | None,
    remote: RemoteSource | None = None,
) -> dict[str, np.ndarray]:
    """One ingest task: load, check and resize ``refs`` (their files fetched from
    ``remote`` first when the dataset is on S3); failures become rows too.
    ``with_targets``: also the mask and boxes, mapped onto the resized image;
    ``set_labels``: a downstream set's labels (its own names and order)."""
    if remote is not None:
        with remote.fetched(adapter, refs) as (local_adapter, local_refs, folder):
            loaded = load_records(local_adapter, local_refs, image_size, with_targets, set_labels)
        loaded["detail"] = np.array([remote.named(d, folder) for d in loaded["detail"]], object)
        return loaded
    width = len(set_labels.names) if set_labels else 0
    images, ok, reasons, details, labels, reports = [], [], [], [], [], []
    masks, boxes, own_labels = [], [], []
    for ref in refs:
        vector = np.full(len(OBSERVATIONS), np.nan, dtype=np.float32)
        mask = np.zeros((image_size, image_size), bool)
        record_boxes = np.zeros((0, 4), np.float32)
        try:
            sample = adapter.load(ref)
            image = resize_uint8(sample.image, image_size)
            if with_targets and sample.boxes is not None:
                record_boxes = resize_boxes(sample.boxes, sample.image.shape, image_size)
            if with_targets and sample.mask is not None:
                mask = resize_mask(sample.mask, image_size)
            elif with_targets:  # boxes only: their union is the segmentation target
                mask = boxes_mask(record_boxes, image_size)
            for name, value in sample.labels.items():
                if name in OBSERVATIONS:
                    vector[OBSERVATIONS.index(name)] = value
            own = set_labels.vector(sample) if set_labels else np.zeros(0, np.float32)
            problem = report_problem(sample.report)
            if problem:
                raise RecordError(ref.record_id, problem)
            images.append(image)
            ok.append(True)
            reasons.append("")
            details.append("")
            reports.append(sample.report or "")
            own_labels.append(own)
        except RecordError as error:
            images.append(np.zeros((image_size, image_size), np.uint8))
            ok.append(False)
            reasons.append(error.reason)
            details.append(error.detail[:300])
            reports.append("")
            own_labels.append(np.zeros(width, np.float32))
        labels.append(vector)
        masks.append(mask)
        boxes.append(record_boxes.ravel().tolist())
    targets = {}
    if with_targets:
        targets = {"mask": np.stack(masks), "boxes": _object_array(boxes)}
    return {
        **targets,
        "image": np.stack(images),
        "ok": np.array(ok),
        "reason": np.array(reasons, dtype=object),
        "detail": np.array(details, dtype=object),
        "labels": np.stack(labels),
        "report": np.array(reports, dtype=object),
        "set_labels": np.stack(own_labels).reshape(len(own_labels), width),
    }


def loaded_blocks(
    kept: deque[tuple[RecordRef, Split]],
    load: Callable[[list[RecordRef]], Any],
    in_flight: int,
    resolve: Callable[[Any], dict[str, np.ndarray]] = ray.get,
) -> Iterator[tuple[list[tuple[RecordRef, Split]], dict[str, np.ndarray]]]:
    """Blocks of the records in ``kept`` (consumed as they are sent: a loaded record's
    reference is let go) with their loaded arrays, in order, at most ``in_flight`` Ray tasks
    ahead of the reader: the driver holds a few blocks of pixels, never the dataset's.
    ``load`` starts a block's loading, ``resolve`` turns what it returned into the arrays."""
    pending: deque[tuple[list[tuple[RecordRef, Split]], Any]] = deque()
    while kept:
        block = [kept.popleft() for _ in range(min(RECORDS_PER_TASK, len(kept)))]
        pending.append((block, load([ref for ref, _ in block])))
        if len(pending) >= in_flight:
            done, future = pending.popleft()
            yield done, resolve(future)
    while pending:
        done, future = pending.popleft()
        yield done, resolve(future)


def ingest_dataset(
    adapter: DatasetAdapter,
    dataset: str,
    config: IngestSection,
    out: Path,
    assign: Assign,
    *,
    with_targets: bool = False,
    set_labels: SetLabels | None = None,
    local_files: bool = False,
    remote: RemoteSource | None = None,
    previous: PreviousIngest | None = None,
    version: FileVersion = local_version,
) -> IngestResult:
    """Read the records of ``adapter`` that ``assign`` keeps (each with its split) into shards
    under ``out/shards``; returns the rows. ``local_files``: the adapter reads files on this
    node's disk, so its Ray tasks run here (another node of a cluster has no such files);
    ``remote``: the files are on S3, each task fetches its records' own, on any node.
    ``previous``: the last output, whose records with an unchanged fingerprint (their files
    versioned by ``version``) are copied instead of decoded."""
    result = IngestResult()
    usable = _screen(list(adapter.records()), dataset, result)
    # A broken listing is quarantined by its load, whatever the protocol would do with it.
    broken = [ref for ref in usable if ROW_ERROR in ref.meta]
    kept = deque(assign([ref for ref in usable if ROW_ERROR not in ref.meta]))
    kept += [(ref, "train") for ref in broken]
    del usable, broken
    total = len(kept)
    (out / "shards").mkdir(exist_ok=True)
    writer = ShardWriter(out / "shards", dataset, config.shard_size)

    task = ray.remote(load_records).options(
        num_cpus=1, **(on_this_node() if local_files and remote is None else {})
    )
    adapter_ref = ray.put(adapter)  # stored once, not once per task
    in_flight = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    width = len(set_labels.names) if set_labels else 0
    fingerprints: dict[str, str] = {}

    def load(block: list[RecordRef]) -> Any:
        """The block's records to decode go to a Ray task; the unchanged ones are read from
        the previous output when the block is consumed."""
        for ref in block:
            fingerprints[ref.record_id] = record_fingerprint(ref, version)
        same, new = [], []
        for i, ref in enumerate(block):
            unchanged = previous is not None and previous.has(
                dataset, ref.record_id, fingerprints[ref.record_id]
            )
            (same if unchanged else new).append(i)
        future = None
        if new:
            future = task.remote(
                adapter_ref,
                [block[i] for i in new],
                config.image_size,
                with_targets,
                set_labels,
                remote,
            )
        return block, same, new, future

    def resolve(handle: Any) -> dict[str, np.ndarray]:
        block, same, new, future = handle
        parts = []
        if new:
            parts.append((new, ray.get(future)))
        if same:
            reused = previous.loaded(
                dataset, [block[i] for i in same], config.image_size, with_targets, width
            )
            parts.append((same, reused))
        result.decoded += len(new)
        result.reused += len(same)
        return combined_blocks(parts, len(block))

    for block, batch in tqdm(
        loaded_blocks(kept, load, in_flight, resolve),
        desc=f"ingest {dataset}",
        total=-(-total // RECORDS_PER_TASK),
        unit="block",
        disable=None,
    ):
        for row, (ref, split) in enumerate(block):
            if not batch["ok"][row]:
                result.quarantine_rows.append(
                    {
                        "record_id": ref.record_id,
                        "dataset": dataset,
                        "reason": str(batch["reason"][row]),
                        "detail": str(batch["detail"][row]),
                        "fingerprint": fingerprints.pop(ref.record_id),
                    }
                )
                continue
            mask = batch["mask"][row] if with_targets else None
            shard, index = writer.add(split, batch["image"][row], mask)
            manifest_row = {
                "record_id": ref.record_id,
                "patient_id": ref.patient_id,
                "dataset": dataset,
                "split": split,
                "shard": shard,
                "index": index,
                "report": str(batch["report"][row]) or None,
                # x0, y0, x1, y1 per box, flattened, in pixels of the stored image
                "boxes": list(batch["boxes"][row]) if with_targets else None,
                "labels": batch["set_labels"][row].tolist() if set_labels else None,
                "fingerprint": fingerprints.pop(ref.record_id),
            }
            manifest_row.update(zip(OBSERVATIONS, batch["labels"][row].tolist(), strict=True))
            result.add_row(manifest_row)
    writer.close()
    result.flush()
    return result


def write_subsets(
    rows: list[dict[str, Any]], config: IngestSection, folder: Path, dataset: str
) -> int:
    """Saved id lists of a downstream set's training subsets (patient level, nested per
    seed): evaluation reads these, it never re-samples."""
    folder.mkdir(exist_ok=True)
    train = [row for row in rows if row["dataset"] == dataset and row["split"] == "train"]
    records_of: dict[str, list[str]] = {}
    for row in train:
        records_of.setdefault(row["patient_id"], []).append(row["record_id"])
    written = 0
    for seed in config.downstream.seeds:
        subsets = nested_subsets(list(records_of), config.downstream.label_fractions, seed)
        for fraction, patients in subsets.items():
            ids = sorted(r for p in patients for r in records_of[p])
            (folder / subset_file_name(fraction, seed, dataset)).write_text("\n".join(ids) + "\n")
            written += 1
    return written


def _check_quarantine(result: IngestResult, dataset: str, total: int, limit: float) -> None:
    bad = sum(1 for row in result.quarantine_rows if row["dataset"] == dataset)
    if total and bad / total > limit:
        reasons = Counter(row["reason"] for row in result.quarantine_rows)
        raise QuarantineLimitExceeded(
            f"{dataset}: {bad} of {total} records unusable ({bad / total:.1%} > "
            f"ingest.max_quarantine_fraction={limit:.1%}); reasons: {dict(reasons)}"
        )


def _write_table(rows: list[dict[str, Any]], path: Path, schema: pa.Schema | None = None) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path, compression="zstd")


QUARANTINE_SCHEMA = pa.schema(
    [
        ("record_id", pa.string()),
        ("dataset", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("fingerprint", pa.string()),  # of a record whose load failed: reused when unchanged
    ]
)


def set_description(plan: SetPlan, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What evaluation needs to know of a set, beside its rows (``sets.json``)."""
    splits = Counter(row["split"] for row in rows if row["dataset"] == plan.name)
    return {
        "adapter": plan.spec.adapter,
        "images": plan.images,
        "labels": list(plan.labels.names),
        "single_label": plan.labels.single_label,
        "with_targets": plan.with_targets,
        "records": {split: splits[split] for split in ("train", "val", "test")},
        "excluded_by_protocol": dict(plan.excluded),
    }


def run(params: Params, args: argparse.Namespace | None = None) -> dict[str, Any]:
    config = mirrored(params)  # datasets on S3: listed from a local copy of their tables
    ensure_ray(params)
    plans = plan_sets(config)
    source = build_pretrain_source(config)
    pretrain_remote = prepare(params, params.ingest.source_path, source)
    remotes = {
        name: prepare(params, params.ingest.downstream.sets[name].path, plan.adapter)
        for name, plan in plans.items()
    }
    # Listed before any record is read: a study added while ingest runs makes the next
    # scheduled run see a change.
    inputs = lineage.current(params)
    with (
        stage_run(params, "ingest", logged={"ingest": params.ingest.model_dump()}) as mlflow_run,
        stage_output(params, "ingest", {"mlflow_run_id": mlflow_run.info.run_id}) as (out, extra),
    ):
        mlflow.set_tags(inputs.tags())
        extra["lineage"] = asdict(inputs)
        extra["ingest_settings"] = params.ingest.model_dump(mode="json")
        extra["code"] = inputs.code
        previous = PreviousIngest.of(params, inputs.code)
        settings = settings_for(params.storage)
        combined = IngestResult()
        counts: dict[str, int] = {}
        set_rows: dict[str, list[dict[str, Any]]] = {}  # downstream sets' rows (small)

        def add(dataset: str, result: IngestResult) -> None:
            total = result.kept + len(result.quarantine_rows)
            _check_quarantine(result, dataset, total, config.max_quarantine_fraction)
            combined.manifest_parts += result.manifest_parts
            combined.quarantine_rows += result.quarantine_rows
            counts[f"{dataset}_kept"] = result.kept
            counts[f"{dataset}_quarantined"] = len(result.quarantine_rows)
            counts[f"{dataset}_decoded"] = result.decoded
            counts[f"{dataset}_reused"] = result.reused
            if dataset != PRETRAIN_SET:
                set_rows[dataset] = result.manifest_rows

        pretrain = pretrain_splits(config.pretrain.val_fraction, config.seed)
        local = config.source != "embedded"
        pretrain_rows = ingest_dataset(
            source,
            PRETRAIN_SET,
            config,
            out,
            pretrain,
            local_files=local,
            remote=pretrain_remote,
            previous=previous,
            version=source_versions(pretrain_remote, settings),
        )
        add(PRETRAIN_SET, pretrain_rows)
        for name, plan in plans.items():
            result = ingest_dataset(
                plan.adapter,
                name,
                config,
                out,
                lambda refs, plan=plan: plan.assign(refs, config.seed),
                with_targets=plan.with_targets,
                set_labels=plan.labels,
                local_files=plan.file_backed,
                remote=remotes[name],
                previous=previous,
                version=source_versions(remotes[name], settings),
            )
            add(name, result)
        pq.write_table(combined.manifest(), out / "manifest.parquet", compression="zstd")
        _write_table(combined.quarantine_rows, out / "quarantine.parquet", QUARANTINE_SCHEMA)
        counts["subset_files"] = sum(
            write_subsets(set_rows[name], config, out / "subsets", name) for name in plans
        )
        sets = {name: set_description(plan, set_rows[name]) for name, plan in plans.items()}
        (out / "sets.json").write_text(json.dumps(sets, indent=1))
        reasons = Counter(row["reason"] for row in combined.quarantine_rows)
        extra["counts"] = counts
        extra["quarantine_reasons"] = dict(sorted(reasons.items()))
        mlflow.log_metrics({k: float(v) for k, v in counts.items()})
    return {**counts, "quarantine_reasons": dict(reasons)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return stage_main("ingest", run, argv)


if __name__ == "__main__":
    main()
