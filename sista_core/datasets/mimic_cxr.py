"""MIMIC-CXR-JPG 2.x images with MIMIC-CXR free-text reports: the pre-training pairs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from ..findings import CHEXPERT_OBSERVATIONS
from .base import DatasetAdapter, RecordError, RecordRef, Sample
from .images import MIN_IMAGE_SIDE, read_image
from .paths import OUTSIDE_ROOT, PathOutsideRoot, check_contained, inside
from .tables import (
    UncertainPolicy,
    broken_ref,
    check_uncertain_policy,
    chexpert_labels,
    first_problem,
    index_rows,
    raise_if_broken,
    read_rows,
    row_id,
)

METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv.gz"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv.gz"
LABEL_CSV = "mimic-cxr-2.0.0-{labeler}.csv.gz"
# The metadata table's header (the adapter reads dicom_id, subject_id, study_id, ViewPosition).
METADATA_COLUMNS = [
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]
FRONTAL_VIEWS = ("PA", "AP")


def study_folder(subject_id: str, study_id: str) -> Path:
    """``files/p10/p10000032/s50414267``: the layout MIMIC-CXR and MIMIC-CXR-JPG share."""
    return Path("files", f"p{subject_id[:2]}", f"p{subject_id}", f"s{study_id}")


MAX_REPORT_BYTES = 256 * 1024
"""A radiology report is a few kilobytes; a file far larger is not one (quarantined)."""


class MimicCxrJpg(DatasetAdapter):
    """MIMIC-CXR-JPG 2.0.0/2.1.0 and the MIMIC-CXR report files, as downloaded from PhysioNet::

        mimic-cxr-jpg/2.0.0/                          <- root
          mimic-cxr-2.0.0-metadata.csv.gz   dicom_id,subject_id,study_id,...,ViewPosition,...
          mimic-cxr-2.0.0-split.csv.gz      dicom_id,study_id,subject_id,split
          mimic-cxr-2.0.0-chexpert.csv.gz   subject_id,study_id,<14 observations>
          files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg
        mimic-cxr/2.0.0/                              <- reports_root (default: root)
          files/p10/p10000032/s50414267.txt           (unpacked mimic-cxr-reports.zip)

    One record per image (``dicom_id``), patient = ``subject_id``; labels are per study
    (``labeler`` ``chexpert`` or ``negbio``; a study without a label row has no labels) with
    the ``uncertain`` policy of CheXpert. Views ``PA`` and ``AP`` by default (``views=None``
    keeps all, including images with no ViewPosition). ``splits`` keeps only those official
    splits (``train``, ``validate``, ``test``). The report is returned raw; a missing or
    empty one is ``missing_report``/``empty_report`` unless ``require_report`` is False.
    """

    name = "mimic_cxr"
    listing_files = ("*.csv", "*.csv.gz")

    def __init__(
        self,
        root: Path,
        reports_root: Path | None = None,
        views: Sequence[str] | None = FRONTAL_VIEWS,
        uncertain: UncertainPolicy = "keep",
        labeler: str = "chexpert",
        splits: Sequence[str] | None = None,
        require_report: bool = True,
        min_size: int = MIN_IMAGE_SIDE,
    ) -> None:
        self.root = Path(root)
        self.reports_root = Path(reports_root) if reports_root else self.root
        self.views = tuple(views) if views is not None else None
        self.uncertain = check_uncertain_policy(uncertain)
        self.label_csv = self.root / LABEL_CSV.format(labeler=labeler)
        self.splits = tuple(splits) if splits is not None else None
        self.require_report = require_report
        self.min_size = min_size

    def records(self) -> Iterator[RecordRef]:
        split_csv = self.root / SPLIT_CSV
        split_rows = index_rows(split_csv, ("dicom_id",), ("dicom_id", "split"))
        label_rows = index_rows(
            self.label_csv, ("subject_id", "study_id"), ("subject_id", "study_id")
        )
        metadata_csv = self.root / METADATA_CSV
        for row in read_rows(metadata_csv, ("dicom_id", "subject_id", "study_id", "ViewPosition")):
            fields = row.fields
            dicom_id = (fields["dicom_id"] or "").strip() or row_id(metadata_csv, row)
            subject_id = (fields["subject_id"] or "").strip()
            study_id = (fields["study_id"] or "").strip()
            view = (fields["ViewPosition"] or "").strip()
            if row.problem or not (subject_id.isdigit() and study_id.isdigit()):
                detail = row.problem or f"subject_id {subject_id!r}, study_id {study_id!r}"
                yield broken_ref(dicom_id, subject_id, "bad_row", detail)
                continue
            if self.views is not None and view not in self.views:
                continue
            split_row = split_rows.get((dicom_id,))
            split = (split_row.fields["split"] or "").strip() if split_row else None
            if self.splits is not None and split not in self.splits:
                continue
            label_row = label_rows.get((subject_id, study_id))
            problem = first_problem(r for r in (split_row, label_row) if r is not None)
            if problem:
                yield broken_ref(dicom_id, subject_id, "bad_row", problem)
                continue
            try:
                labels = (
                    chexpert_labels(label_row.fields, CHEXPERT_OBSERVATIONS, self.uncertain)
                    if label_row
                    else {}
                )
            except ValueError as error:
                yield broken_ref(dicom_id, subject_id, "bad_row", f"{self.label_csv}: {error}")
                continue
            folder = study_folder(subject_id, study_id)
            try:
                image_path = inside(self.root, f"{folder.as_posix()}/{dicom_id}.jpg")
            except PathOutsideRoot as error:
                yield broken_ref(dicom_id, subject_id, OUTSIDE_ROOT, str(error))
                continue
            yield RecordRef(
                dicom_id,
                subject_id,
                image_path,
                meta={
                    "study_id": study_id,
                    "report_path": self.reports_root / folder.with_suffix(".txt"),
                    "labels": labels,
                    "view": view or None,
                    "split": split,
                },
            )

    def read_report(self, ref: RecordRef) -> str | None:
        """The study's raw report text (sections are ``sista_core.reports``' business)."""
        path: Path = ref.meta["report_path"]
        if not path.is_file():
            if self.require_report:
                raise RecordError(ref.record_id, "missing_report", str(path))
            return None
        size = path.stat().st_size
        if size > MAX_REPORT_BYTES:
            raise RecordError(ref.record_id, "report_too_large", f"{path}: {size} bytes")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as error:
            raise RecordError(ref.record_id, "non_utf8_report", f"{path}: {error}") from None
        if not text.strip():
            if self.require_report:
                raise RecordError(ref.record_id, "empty_report", str(path))
            return None
        return text

    def load(self, ref: RecordRef) -> Sample:
        raise_if_broken(ref)
        check_contained(ref, self.root)
        check_contained(ref, self.reports_root, ref.meta["report_path"])
        report = self.read_report(ref)
        return Sample(
            record_id=ref.record_id,
            patient_id=ref.patient_id,
            image=read_image(ref.image_path, ref.record_id, self.min_size),
            labels=dict(ref.meta["labels"]),
            report=report,
            view=ref.meta["view"],
            split=ref.meta["split"],
        )
