"""Open-I (Indiana University) radiology reports, read straight from the ``NLMCXR_reports.tgz``
that torchxrayvision ships: one XML file per report, parsed in memory (no extraction)."""

from __future__ import annotations

import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from sista_core.assets import OPENI_REPORTS, xrv_data_file


@dataclass(frozen=True)
class OpenIReport:
    """One Open-I report. Sections are "" when the report leaves them empty; ``image_ids``
    are the ``parentImage`` ids, which name the PNGs of NLMCXR_png (``<image id>.png``)."""

    report_id: str
    indication: str
    comparison: str
    findings: str
    impression: str
    mesh_major: tuple[str, ...]
    mesh_automatic: tuple[str, ...]
    image_ids: tuple[str, ...]

    @property
    def text(self) -> str:
        """Findings then impression: the part of the report that describes the image."""
        return " ".join(part for part in (self.findings, self.impression) if part)


def parse_openi_xml(xml: bytes | str) -> OpenIReport:
    """Parse one Open-I XML report (the ``eCitation`` document)."""
    root = ET.fromstring(xml)
    sections = {
        (node.get("Label") or "").upper(): " ".join((node.text or "").split())
        for node in root.iter("AbstractText")
    }
    uid = root.find("uId")
    if uid is None or not uid.get("id"):
        raise ValueError("Open-I report without a uId")
    mesh = root.find("MeSH")

    def terms(tag: str) -> tuple[str, ...]:
        if mesh is None:
            return ()
        return tuple(node.text.strip() for node in mesh.findall(tag) if node.text)

    return OpenIReport(
        report_id=uid.get("id", ""),
        indication=sections.get("INDICATION", ""),
        comparison=sections.get("COMPARISON", ""),
        findings=sections.get("FINDINGS", ""),
        impression=sections.get("IMPRESSION", ""),
        mesh_major=terms("major"),
        mesh_automatic=terms("automatic"),
        image_ids=tuple(node.get("id", "") for node in root.findall("parentImage")),
    )


MAX_REPORT_XML_BYTES = 256 * 1024
"""An Open-I report's XML is a few kilobytes; a file far larger is not one (left unread)."""


def read_openi_reports(
    path: Path | str | None = None, too_large: list[tuple[str, int]] | None = None
) -> list[OpenIReport]:
    """All reports of an Open-I archive (default: the one torchxrayvision ships), or of a
    folder of its XML files, in report-number order (CXR1, CXR2, ...). Files over
    ``MAX_REPORT_XML_BYTES`` are not read: their (name, size) go to ``too_large``."""
    path = Path(path) if path is not None else xrv_data_file(OPENI_REPORTS)
    skipped = too_large if too_large is not None else []
    reports = []
    if path.is_dir():
        for xml in sorted(path.rglob("*.xml")):
            size = xml.stat().st_size
            if size > MAX_REPORT_XML_BYTES:
                skipped.append((xml.name, size))
            else:
                reports.append(parse_openi_xml(xml.read_bytes()))
    else:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                if not (member.isfile() and member.name.endswith(".xml")):
                    continue
                if member.size > MAX_REPORT_XML_BYTES:
                    skipped.append((Path(member.name).name, member.size))
                else:
                    reports.append(parse_openi_xml(archive.extractfile(member).read()))
    return sorted(reports, key=_report_number)


def _report_number(report: OpenIReport) -> tuple[int, str]:
    digits = "".join(ch for ch in report.report_id if ch.isdigit())
    return (int(digits) if digits else -1, report.report_id)
