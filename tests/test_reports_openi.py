"""Open-I reports read straight from the archive torchxrayvision ships."""

from __future__ import annotations

import tarfile

import pytest

from sista_core.assets import OPENI_REPORTS, xrv_data_file
from sista_core.reports import OpenIReport, parse_openi_xml, read_openi_reports


@pytest.fixture(scope="module")
def reports() -> list[OpenIReport]:
    return read_openi_reports()


def test_reads_all_3955_reports_with_unique_ids(reports):
    assert len(reports) == 3955
    assert len({r.report_id for r in reports}) == 3955


def test_reports_come_in_report_number_order(reports):
    assert [r.report_id for r in reports[:3]] == ["CXR1", "CXR2", "CXR3"]
    assert reports[-1].report_id == "CXR3999"


def test_known_report_has_its_sections_mesh_terms_and_images(reports):
    cxr2 = next(r for r in reports if r.report_id == "CXR2")
    assert cxr2.indication == "Preop bariatric surgery."
    assert cxr2.comparison == "None."
    assert cxr2.findings.startswith("Borderline cardiomegaly. Midline sternotomy XXXX.")
    assert cxr2.impression == "No acute pulmonary findings."
    assert cxr2.mesh_major == ("Cardiomegaly/borderline", "Pulmonary Artery/enlarged")
    assert cxr2.mesh_automatic == ("sternotomy",)
    assert cxr2.image_ids == ("CXR2_IM-0652-1001", "CXR2_IM-0652-2001")
    assert cxr2.text == f"{cxr2.findings} {cxr2.impression}"


def test_most_reports_have_images_and_text(reports):
    assert sum(bool(r.image_ids) for r in reports) > 3800
    assert sum(bool(r.text) for r in reports) > 3900
    assert sum(r.mesh_major == ("normal",) for r in reports) > 1300


def test_a_folder_of_xml_files_reads_like_the_archive(tmp_path, reports):
    with tarfile.open(xrv_data_file(OPENI_REPORTS)) as archive:
        for number in (10, 2):
            member = archive.getmember(f"ecgen-radiology/{number}.xml")
            (tmp_path / f"{number}.xml").write_bytes(archive.extractfile(member).read())
    from_folder = read_openi_reports(tmp_path)
    assert [r.report_id for r in from_folder] == ["CXR2", "CXR10"]
    assert from_folder[0] == next(r for r in reports if r.report_id == "CXR2")


def test_report_without_uid_is_rejected():
    with pytest.raises(ValueError, match="uId"):
        parse_openi_xml("<eCitation><MeSH><major>normal</major></MeSH></eCitation>")
