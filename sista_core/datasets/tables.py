"""Reading the sources' label tables (CSV, optionally gzip- or zip-compressed) without letting
one bad row stop a listing.

The rule every adapter follows: ``records()`` yields one ``RecordRef`` per record, including
records whose table rows are unusable; such a ref carries its problem (``broken_ref``) and
``load`` raises it as a ``RecordError`` (``raise_if_broken``). So a listing always completes,
ingest quarantines each bad record with its reason, and problems with files (missing,
truncated, ...) surface the same way, in ``load``. Only a problem with a whole table (file
absent, a required column absent from the header) raises at once: no record can be read.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from .base import RecordError, RecordRef

UncertainPolicy = Literal["keep", "ones", "zeros", "ignore"]
UNCERTAIN_POLICIES: tuple[str, ...] = ("keep", "ones", "zeros", "ignore")
ROW_ERROR = "row_error"
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # surrogateescape's stand-ins for undecodable bytes
"""``RecordRef.meta`` key of a broken ref: (reason, detail)."""


@dataclass
class Row:
    """One table row: ``line`` (1-based, the header is line 1), the fields by column name, and
    ``problem`` when the row is short or long (then some fields may be None)."""

    line: int
    fields: dict[str, str | None]
    problem: str | None = None


def open_table(path: Path) -> IO[str]:
    """Open a CSV as text; ``.gz`` is decompressed and a ``.zip`` must hold exactly one CSV
    (as torchxrayvision ships the RSNA table)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label table {path} not found")
    # Bytes that are not UTF-8 become lone surrogates: that row is flagged, the table read on.
    text = {"newline": "", "encoding": "utf-8", "errors": "surrogateescape"}
    if path.suffix == ".gz":
        return gzip.open(path, "rt", **text)
    if path.suffix == ".zip":
        archive = zipfile.ZipFile(path)
        members = [name for name in archive.namelist() if name.endswith(".csv")]
        if len(members) != 1:
            raise ValueError(f"{path} should hold exactly one .csv, holds {members}")
        return io.TextIOWrapper(archive.open(members[0]), **text)
    return open(path, **text)


def read_rows(path: Path, required: Sequence[str]) -> Iterator[Row]:
    """Rows of a CSV keyed by header names stripped of spaces (SIIM's header reads
    ``ImageId, EncodedPixels``). Raises ValueError when the header lacks a ``required`` column;
    a row with a missing or extra field comes back with ``problem`` set."""
    with open_table(path) as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        absent = [name for name in required if name not in header]
        if absent:
            raise ValueError(f"{path}: header {header} lacks required columns {absent}")
        line = 1  # the header's
        while True:
            line += 1
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as error:  # e.g. a field over csv.field_size_limit(): this row
                yield Row(line, dict.fromkeys(header), f"line {line}: {error}")
                continue
            if not values:  # blank line
                continue
            fields: dict[str, str | None] = dict(zip(header, values, strict=False))
            problem = None
            if any(_NOT_UTF8.search(value) for value in values):
                fields = dict.fromkeys(header)
                problem = f"line {line}: bytes that are not UTF-8"
            elif len(values) < len(header):
                missing = header[len(values) :]
                fields.update(dict.fromkeys(missing))
                problem = f"line {line}: missing columns {missing}"
            elif len(values) > len(header):
                problem = f"line {line}: {len(values)} fields for {len(header)} columns"
            yield Row(line, fields, problem)


def broken_ref(record_id: str, patient_id: str, reason: str, detail: str) -> RecordRef:
    """A ref whose record is known to be unusable: ``load`` raises ``reason`` for it."""
    return RecordRef(record_id, patient_id, meta={ROW_ERROR: (reason, detail)})


def raise_if_broken(ref: RecordRef) -> None:
    """Raise the ``RecordError`` that ``broken_ref`` stored, if any."""
    if ROW_ERROR in ref.meta:
        reason, detail = ref.meta[ROW_ERROR]
        raise RecordError(ref.record_id, reason, detail)


def row_id(table: Path, row: Row) -> str:
    """Stand-in record id for a row whose id column is empty or missing: ``table:line``."""
    return f"{Path(table).name}:{row.line}"


def group_rows(
    table: Path, rows: Iterable[Row], id_column: str
) -> tuple[dict[str, list[Row]], list[RecordRef]]:
    """Rows grouped by record id, in first-seen order (RSNA and SIIM write one row per box or
    mask part), and broken refs for rows that name no id at all."""
    groups: dict[str, list[Row]] = {}
    orphans: list[RecordRef] = []
    for row in rows:
        record_id = (row.fields.get(id_column) or "").strip()
        if not record_id:
            orphans.append(broken_ref(row_id(table, row), "", "bad_row", f"no {id_column}"))
            continue
        groups.setdefault(record_id, []).append(row)
    return groups, orphans


def index_rows(
    path: Path, key_columns: Sequence[str], required: Sequence[str]
) -> dict[tuple[str, ...], Row]:
    """Rows of an auxiliary table (labels, splits) by the tuple of their ``key_columns``;
    a row whose key is incomplete cannot belong to any record and is left out."""
    index: dict[tuple[str, ...], Row] = {}
    for row in read_rows(path, required):
        key = tuple((row.fields.get(column) or "").strip() for column in key_columns)
        if all(key):
            index[key] = row
    return index


def first_problem(rows: Iterable[Row]) -> str | None:
    """The first short/long-row problem among ``rows``, if any."""
    return next((row.problem for row in rows if row.problem), None)


def check_split(source: str, split: str, splits: dict[str, str]) -> str:
    """Validate a split name of ``source``; returns it as ``Sample.split`` spells it
    (``train``, ``validate``, ``test``)."""
    if split not in splits:
        raise ValueError(f"{source} split {split!r}; choose one of {tuple(splits)}")
    return splits[split]


def check_uncertain_policy(policy: str) -> UncertainPolicy:
    """Validate an uncertainty policy name (a clear error instead of silent mislabelling)."""
    if policy not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain policy {policy!r}; choose one of {UNCERTAIN_POLICIES}")
    return policy  # type: ignore[return-value]


_CHEXPERT_CELLS: dict[str, float | None] = {"": None, "1.0": 1.0, "0.0": 0.0, "-1.0": -1.0}


def chexpert_label(value: str | None, uncertain: UncertainPolicy) -> float | None:
    """One CheXpert-style cell: ``1.0`` positive, ``0.0`` negative, ``-1.0`` uncertain, blank
    not mentioned (None). Uncertain follows ``uncertain``: keep -1.0, map to 1.0 (U-Ones) or
    0.0 (U-Zeros), or drop the observation (None). ValueError for anything else."""
    if value in _CHEXPERT_CELLS:  # the spellings the real tables use, without parsing
        number = _CHEXPERT_CELLS[value]
        if number is None:
            return None
    else:
        text = (value or "").strip()
        if not text:
            return None
        number = float(text)
    if number == 1.0 or number == 0.0:
        return number
    if number != -1.0:
        raise ValueError(f"label value {text!r} is not 1, 0, -1 or blank")
    return {"keep": -1.0, "ones": 1.0, "zeros": 0.0, "ignore": None}[uncertain]


def chexpert_labels(
    fields: dict[str, str | None], observations: Iterable[str], uncertain: UncertainPolicy
) -> dict[str, float]:
    """Observation -> label for the columns of a CheXpert/MIMIC-CXR label row."""
    labels = {}
    for observation in observations:
        label = chexpert_label(fields.get(observation), uncertain)
        if label is not None:
            labels[observation] = label
    return labels
