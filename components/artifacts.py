"""Stage outputs: written atomically, with a manifest of content hashes.

A stage writes into a hidden temporary folder beside its output folder and renames it into
place only when everything (manifest last) is written, so neither DVC nor the next stage can
ever take a half-written output for a complete one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


def replace_dir(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``, replacing it; the old copy goes only after the swap."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(source, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a completed stage output; a clear error when the stage has not run."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {MANIFEST}: run its stage first")
    return json.loads(path.read_text())
