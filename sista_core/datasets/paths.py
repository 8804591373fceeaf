"""Paths built from outside input (table columns, ids from XML or DICOM headers, object keys)
stay inside the folder they are joined onto: another project's files never become records."""

from __future__ import annotations

import re
from pathlib import Path

from .base import RecordError, RecordRef

OUTSIDE_ROOT = "path_outside_root"
_DRIVE = re.compile(r"^[A-Za-z]:")


class PathOutsideRoot(ValueError):
    """A relative path from outside input would leave its root."""


def inside(root: Path | str, relative: str) -> Path:
    """``root / relative`` for a ``/``-separated relative path from outside input. Refuses an
    absolute path, a drive, a backslash, and empty, ``.`` or ``..`` segments (so ``a//b`` and
    ``a/../b`` too) with ``PathOutsideRoot`` naming it. Symlinks are checked at read time
    (``check_contained``): the file need not exist yet."""
    if "\\" in relative or relative.startswith("/") or _DRIVE.match(relative):
        raise PathOutsideRoot(f"{relative!r} is not a relative path below {root}")
    segments = relative.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        raise PathOutsideRoot(f"{relative!r} has an empty, '.' or '..' segment")
    return Path(root).joinpath(*segments)


def check_contained(ref: RecordRef, root: Path | str, path: Path | None = None) -> None:
    """Raise ``RecordError(path_outside_root)`` when ``path`` (default the ref's image)
    resolves, symlinks followed, outside ``root``."""
    target = Path(path if path is not None else ref.image_path)
    if not target.resolve().is_relative_to(Path(root).resolve()):
        raise RecordError(ref.record_id, OUTSIDE_ROOT, f"{target} resolves outside {root}")
