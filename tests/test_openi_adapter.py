"""OpenIDataset on a fixture in Open-I's layout: real report XML files and PNGs made from
real chest radiographs, named by Open-I image id."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
from PIL import Image

from sista_core.assets import OPENI_REPORTS, real_radiograph_files, xrv_data_file
from sista_core.datasets import RecordError
from sista_core.datasets.openi import OpenIDataset

REPORT_NUMBERS = (1, 2, 3, 4)
CXR2_MISSING = "CXR2_IM-0652-2001"
CXR3_TRUNCATED = "CXR3_IM-1384-1001"
CXR3_SIXTEEN_BIT = "CXR3_IM-1384-2001"
CXR4_NOT_AN_IMAGE = "CXR4_IM-2050-1001"


@pytest.fixture(scope="module")
def openi_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("openi")
    reports, images = root / "ecgen-radiology", root / "NLMCXR_png"
    reports.mkdir()
    images.mkdir()
    with tarfile.open(xrv_data_file(OPENI_REPORTS)) as archive:
        for number in REPORT_NUMBERS:
            member = archive.getmember(f"ecgen-radiology/{number}.xml")
            (reports / f"{number}.xml").write_bytes(archive.extractfile(member).read())
    radiographs = iter(real_radiograph_files())
    for image_id in ("CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001", "CXR2_IM-0652-1001"):
        Image.open(next(radiographs)).convert("L").save(images / f"{image_id}.png")
    png = images / "truncated.png"
    Image.open(next(radiographs)).convert("L").save(png)
    (images / f"{CXR3_TRUNCATED}.png").write_bytes(png.read_bytes()[:2000])
    png.unlink()
    pixels = np.asarray(Image.open(next(radiographs)).convert("L"), dtype=np.uint16) * 100
    Image.fromarray(pixels).save(images / f"{CXR3_SIXTEEN_BIT}.png")
    (images / f"{CXR4_NOT_AN_IMAGE}.png").write_text("<html>not found</html>")
    return root


@pytest.fixture(scope="module")
def dataset(openi_folder):
    return OpenIDataset(openi_folder / "NLMCXR_png", reports=openi_folder / "ecgen-radiology")


def test_one_record_per_image_with_the_report_as_patient(dataset):
    refs = list(dataset.records())[:6]
    assert [r.record_id for r in refs] == [
        "CXR1_1_IM-0001-3001",
        "CXR1_1_IM-0001-4001",
        "CXR2_IM-0652-1001",
        CXR2_MISSING,
        CXR3_TRUNCATED,
        CXR3_SIXTEEN_BIT,
    ]
    assert [r.patient_id for r in refs] == ["CXR1", "CXR1", "CXR2", "CXR2", "CXR3", "CXR3"]
    assert refs[2].meta["report"].startswith("Borderline cardiomegaly.")
    assert refs[2].image_path.name == "CXR2_IM-0652-1001.png"


def test_load_reads_the_png_and_labels_the_report(dataset):
    ref = next(r for r in dataset.records() if r.record_id == "CXR2_IM-0652-1001")
    sample = dataset.load(ref)
    source = Image.open(real_radiograph_files()[2])
    assert sample.image.dtype == np.uint8
    assert sample.image.shape == (source.height, source.width)
    assert np.array_equal(sample.image, np.asarray(source.convert("L")))
    assert sample.labels["Cardiomegaly"] == 1.0
    assert "No Finding" not in sample.labels
    assert sample.report == ref.meta["report"] and sample.patient_id == "CXR2"


def test_normal_report_is_labelled_no_finding(dataset):
    sample = dataset.load(next(dataset.records()))
    assert sample.labels["No Finding"] == 1.0
    assert sample.labels["Pneumothorax"] == 0.0


def test_sixteen_bit_png_is_scaled_to_uint8(dataset):
    ref = next(r for r in dataset.records() if r.record_id == CXR3_SIXTEEN_BIT)
    image = dataset.load(ref).image
    source = np.asarray(Image.open(real_radiograph_files()[4]).convert("L"), dtype=np.float32)
    assert image.dtype == np.uint8
    # Clipping (PIL's convert("L")) instead of scaling would turn most pixels white.
    assert (image == 255).mean() < 0.05
    assert np.corrcoef(image.ravel(), source.ravel())[0, 1] > 0.99


@pytest.mark.parametrize(
    "record_id, reason",
    [
        (CXR2_MISSING, "missing_file"),
        (CXR3_TRUNCATED, "truncated_image"),
        (CXR4_NOT_AN_IMAGE, "undecodable_image"),
    ],
)
def test_bad_records_raise_with_a_reason(dataset, record_id, reason):
    ref = next(r for r in dataset.records() if r.record_id == record_id)
    with pytest.raises(RecordError) as error:
        dataset.load(ref)
    assert (error.value.record_id, error.value.reason) == (record_id, reason)


def test_an_oversized_report_file_is_quarantined_unread_and_the_rest_listed(tmp_path):
    from sista_core.reports.openi import MAX_REPORT_XML_BYTES

    reports = tmp_path / "ecgen-radiology"
    reports.mkdir()
    with tarfile.open(xrv_data_file(OPENI_REPORTS)) as archive:
        xml = archive.extractfile(archive.getmember("ecgen-radiology/1.xml")).read()
    (reports / "1.xml").write_bytes(xml)
    (reports / "2.xml").write_bytes(b"<eCitation>" + b" " * MAX_REPORT_XML_BYTES + b"</eCitation>")
    dataset = OpenIDataset(tmp_path / "png", reports=reports)
    refs = list(dataset.records())
    assert [r.patient_id for r in refs[1:]] == ["CXR1", "CXR1"]  # report 1's two images
    with pytest.raises(RecordError) as error:
        dataset.load(refs[0])
    assert (error.value.record_id, error.value.reason) == ("2.xml", "report_too_large")
