"""Datasets on S3, read in place: listed from a copy of their tables, loaded record by record.

An adapter lists its records from a few files (``DatasetAdapter.listing_files``: MIMIC-CXR's
csv.gz tables, CheXpert's csv); only those are copied below ``<local_dir>/sources/``. Each
ingest task then fetches the objects of its own records (image, report) into a private
folder, decodes them and deletes them, on whichever node of the cluster it runs, so no node
ever holds the dataset and the nodes share the reading. An adapter whose listing reads every
file (``**``: SIIM reads each DICOM's header) gets a whole copy instead, read on this node.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from components.platform import storage
from components.platform.config import IngestSection, Params, StorageSection
from components.platform.stage_storage import data_root, settings_for
from sista_core.datasets import DatasetAdapter, RecordRef
from sista_core.datasets.paths import PathOutsideRoot, inside

FETCH_THREADS = 8  # object reads are latency-bound: a few in flight per task
EVERYTHING = "**"


def mirror_path(section: StorageSection, path: str | None) -> str | None:
    """Where a dataset's local copy lives (``path`` itself when it is not on S3)."""
    if not path or not storage.is_s3(path):
        return path
    bucket, key = storage.split_s3(path)
    return str(data_root(section) / "sources" / bucket / key.strip("/"))


def mirrored(params: Params) -> IngestSection:
    """The ingest section with every ``s3://`` dataset replaced by its local copy's path
    (nothing is copied here: :func:`prepare` does, once the adapter says what it lists)."""
    config = params.ingest
    sets = {
        name: spec.model_copy(update={"path": mirror_path(params.storage, spec.path)})
        for name, spec in config.downstream.sets.items()
    }
    return config.model_copy(
        update={
            "source_path": mirror_path(params.storage, config.source_path),
            "downstream": config.downstream.model_copy(update={"sets": sets}),
        }
    )


def listed(relative: str, patterns: tuple[str, ...]) -> bool:
    """Whether the object at ``relative`` (``a/b.csv``) is one of the listing files:
    a pattern matches at its own depth (``*.csv`` only at the top)."""
    if EVERYTHING in patterns:
        return True
    depth = relative.count("/")
    return any(p.count("/") == depth and fnmatch.fnmatch(relative, p) for p in patterns)


@dataclass(frozen=True)
class RemoteSource:
    """A dataset on S3 (``uri``) whose listing files are copied to ``root``: ``fetch``
    brings the files of some records to a private folder."""

    uri: str
    root: Path
    endpoint_url: str | None = None

    def key(self, path: Path) -> str:
        return storage.join(self.uri, path.relative_to(self.root).as_posix())

    def named(self, text: str, folder: Path) -> str:
        """``text`` (a load error's detail) naming objects instead of their fetched copies."""
        return text.replace(str(folder), self.uri.rstrip("/"))

    @contextmanager
    def fetched(
        self, adapter: DatasetAdapter, refs: list[RecordRef]
    ) -> Iterator[tuple[DatasetAdapter, list[RecordRef], Path]]:
        """The records' files in a private folder (deleted on exit), with the adapter and
        the references moved there, and the folder. A missing object stays missing:
        ``load`` says so."""
        folder = Path(tempfile.mkdtemp(prefix="sista-fetch-"))
        try:
            wanted = {
                path for ref in refs for path in ref.files() if path.is_relative_to(self.root)
            }
            settings = storage.StorageSettings(endpoint_url=self.endpoint_url)

            def fetch(path: Path) -> None:
                target = folder / path.relative_to(self.root)
                try:
                    storage.copy_file(self.key(path), target, settings=settings)
                except storage.ObjectNotFound:
                    pass

            list(_fetch_pool().map(fetch, sorted(wanted)))
            moved = [ref.relocated(self.root, folder) for ref in refs]
            yield adapter.relocated(self.root, folder), moved, folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)


@functools.cache
def _fetch_pool() -> ThreadPoolExecutor:
    """One pool per worker process, reused by its tasks (threads made per task would each
    leave a malloc arena behind)."""
    return ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="sista-fetch")


def prepare(params: Params, uri: str | None, adapter: DatasetAdapter) -> RemoteSource | None:
    """Copy what ``adapter`` lists from (a dataset at ``uri``) to its local copy; returns the
    :class:`RemoteSource` its records are fetched from, or None when its files are local
    (not on S3, or copied whole because its listing reads every file). A copy is refreshed
    only when an object below the prefix was added, removed or changed."""
    if not uri or not storage.is_s3(uri):
        return None
    section = params.storage
    settings = settings_for(section)
    target = Path(mirror_path(section, uri))
    versions = storage.object_versions(uri, settings=settings)
    if not versions:
        raise storage.ObjectNotFound(f"nothing below {uri}")
    patterns = tuple(adapter.listing_files)
    stamp = target.parent / f".{target.name}.objects.json"
    listing = json.dumps({"listing_files": patterns, "objects": versions}, sort_keys=True)
    if not (target.is_dir() and stamp.is_file() and stamp.read_text() == listing):
        prefix = uri.rstrip("/") + "/"
        keep = [key for key in versions if listed(key[len(prefix) :], patterns)]
        if EVERYTHING in patterns:
            storage.download_dir(uri, target, settings=settings)
        else:
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            for key in keep:
                try:
                    local = inside(target, key[len(prefix) :])
                except PathOutsideRoot as error:
                    raise storage.UnsafeObjectKey(f"object {key}: {error}") from None
                storage.copy_file(key, local, settings=settings)
        stamp.write_text(listing)
    if EVERYTHING in patterns:
        return None
    return RemoteSource(uri, target, section.endpoint_url)
