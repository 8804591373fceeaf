"""The embedded default data: real report text, phantom images (labelled synthetic).

Pre-training pairs each real Open-I report with a phantom radiograph rendered from that
report's findings. The downstream set needs no reports: its label vectors are rows of the
real CheXpert label table (real prevalence and co-occurrence) rendered into phantoms, and
its labels are what was actually drawn. Its patients never overlap pre-training's.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
from collections.abc import Iterator

import numpy as np

from ..assets import CHEXPERT_LABELS, xrv_data_file
from ..findings import CHEXPERT_OBSERVATIONS, OBSERVATIONS, Finding
from ..phantom import render
from ..reports.labeler import label_report
from ..reports.openi import OpenIReport, read_openi_reports
from ..reports.sections import extract_sections
from .base import DatasetAdapter, RecordRef, Sample


def record_seed(seed: int, record_id: str) -> int:
    """A stable per-record seed: the same record renders the same image in every run."""
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def phantom_sample(
    ref: RecordRef, findings: list[Finding], seed: int, size: int, report: str | None = None
) -> Sample:
    """Render ``findings`` for ``ref`` (seeded by its id) and label it with what was drawn."""
    phantom = render(findings, seed=record_seed(seed, ref.record_id), size=size)
    return Sample(
        record_id=ref.record_id,
        patient_id=ref.patient_id,
        image=phantom.image,
        labels=drawn_labels(phantom.masks),
        report=report,
        view="PA",
    )


def drawn_labels(masks: dict[str, np.ndarray]) -> dict[str, float]:
    """1.0 for every observation the renderer actually drew, 0.0 for the rest."""
    drawn = {name for name, mask in masks.items() if mask.any()}
    labels = {name: float(name in drawn) for name in OBSERVATIONS}
    labels["No Finding"] = float(not (drawn - {"Support Devices"}))
    return labels


def as_free_text(report: OpenIReport) -> str:
    """An Open-I report in the free-text layout of MIMIC-CXR, so every source goes through
    the same section extraction."""
    sections = (("FINDINGS", report.findings), ("IMPRESSION", report.impression))
    return "\n".join(f"{name}: {body}" for name, body in sections if body)


class OpenIPhantomDataset(DatasetAdapter):
    """Real Open-I reports (torchxrayvision's NLMCXR_reports.tgz) with phantom images."""

    name = "openi_phantom"

    def __init__(self, image_size: int = 128, seed: int = 0, max_reports: int | None = None):
        self.image_size, self.seed, self.max_reports = image_size, seed, max_reports

    def records(self) -> Iterator[RecordRef]:
        reports = read_openi_reports()
        for report in reports[: self.max_reports]:
            yield RecordRef(
                report.report_id, report.report_id, meta={"report": as_free_text(report)}
            )

    def load(self, ref: RecordRef) -> Sample:
        report = ref.meta["report"]
        findings = label_report(extract_sections(report).text).findings
        return phantom_sample(ref, findings, self.seed, self.image_size, report)


def read_chexpert_label_rows(frontal_only: bool = True) -> list[dict[str, float]]:
    """The real CheXpert train label table as rows of observation -> 1/0/-1 (blank omitted)."""
    with gzip.open(xrv_data_file(CHEXPERT_LABELS), "rt", newline="") as handle:
        rows = []
        for row in csv.DictReader(handle):
            if frontal_only and row["Frontal/Lateral"] != "Frontal":
                continue
            rows.append({name: float(row[name]) for name in CHEXPERT_OBSERVATIONS if row[name]})
    return rows


class PhantomDownstreamDataset(DatasetAdapter):
    """Downstream images whose findings follow real CheXpert label rows (drawn at seed)."""

    name = "chexpert_phantom"

    def __init__(self, num_patients: int, image_size: int = 128, seed: int = 0):
        self.num_patients, self.image_size, self.seed = num_patients, image_size, seed

    def records(self) -> Iterator[RecordRef]:
        rows = read_chexpert_label_rows()
        rng = np.random.default_rng(self.seed)
        chosen = rng.choice(len(rows), size=min(self.num_patients, len(rows)), replace=False)
        for number, row_index in enumerate(chosen):
            record_id = f"ds-{number:05d}"
            yield RecordRef(record_id, record_id, meta={"chexpert_row": rows[int(row_index)]})

    def load(self, ref: RecordRef) -> Sample:
        findings = [
            Finding(name, "positive" if value == 1.0 else "uncertain")
            for name, value in ref.meta["chexpert_row"].items()
            if value in (1.0, -1.0) and name != "No Finding"
        ]
        return phantom_sample(ref, findings, self.seed, self.image_size)
