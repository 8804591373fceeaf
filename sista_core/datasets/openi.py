"""Open-I (Indiana University chest X-ray collection): XML reports (a folder, or the
``NLMCXR_reports.tgz`` archive) and PNG images named ``<image id>.png`` (as in NLMCXR_png).

One record per image. Open-I has no patient id, so the report id (``CXR123``) stands in for
it: the frontal and lateral images of one report stay on the same side of any split.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ..reports.labeler import label_report
from ..reports.openi import read_openi_reports
from .base import DatasetAdapter, RecordError, RecordRef, Sample
from .images import MIN_IMAGE_SIDE, read_image
from .paths import OUTSIDE_ROOT, PathOutsideRoot, check_contained, inside
from .tables import broken_ref, raise_if_broken


class OpenIDataset(DatasetAdapter):
    """Open-I image-report pairs; labels come from the rule-based report labeler."""

    name = "openi"
    listing_files = ()

    def __init__(
        self,
        images: Path | str,
        reports: Path | str | None = None,
        min_size: int = MIN_IMAGE_SIDE,
    ) -> None:
        """``images``: folder of ``<image id>.png``; ``reports``: folder of XML files or the
        tgz archive (default: the archive torchxrayvision ships)."""
        self.images = Path(images)
        self.too_large: list[tuple[str, int]] = []  # report files left unread: quarantined
        self.reports = read_openi_reports(reports, self.too_large)
        self.min_size = min_size

    def records(self) -> Iterator[RecordRef]:
        for name, size in self.too_large:
            yield broken_ref(name, name, "report_too_large", f"{name}: {size} bytes")
        for report in self.reports:
            for image_id in report.image_ids:
                try:
                    image_path = inside(self.images, f"{image_id}.png")
                except PathOutsideRoot as error:
                    yield broken_ref(image_id, report.report_id, OUTSIDE_ROOT, str(error))
                    continue
                yield RecordRef(
                    record_id=image_id,
                    patient_id=report.report_id,
                    image_path=image_path,
                    meta={
                        "report_id": report.report_id,
                        "report": report.text,
                        "indication": report.indication,
                        "mesh_major": list(report.mesh_major),
                    },
                )

    def load(self, ref: RecordRef) -> Sample:
        """Image (uint8, decoded by ``images.read_image``, whose ``RecordError`` reasons it
        keeps), report text and its labeler labels; a report without text is
        ``empty_report``."""
        raise_if_broken(ref)
        check_contained(ref, self.images)
        report = ref.meta.get("report", "")
        if not report:
            raise RecordError(ref.record_id, "empty_report", ref.patient_id)
        return Sample(
            record_id=ref.record_id,
            patient_id=ref.patient_id,
            image=read_image(ref.image_path, ref.record_id, self.min_size),
            labels=label_report(report).labels(),
            report=report,
        )
