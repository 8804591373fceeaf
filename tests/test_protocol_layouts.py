"""The clean layouts of ``protocol_layouts``: every record loads through its adapter, with the
counts and proportions the end-to-end protocol test relies on."""

from __future__ import annotations

import csv
import gzip
from collections import Counter, defaultdict

import numpy as np
import pytest
from dataset_fixtures import load_all
from protocol_layouts import build_all

from sista_core.datasets import (
    FOREIGN_OBJECT,
    CheXpert,
    Covidx,
    MimicCxrJpg,
    ObjectCxr,
    RsnaPneumonia,
    SiimPneumothorax,
)
from sista_core.datasets.object_cxr import parse_annotation
from sista_core.findings import CHEXPERT_COMPETITION, CHEXPERT_OBSERVATIONS
from sista_core.reports.sections import extract_sections


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return build_all(tmp_path_factory.mktemp("protocol"))


def load_clean(adapter):
    samples, reasons = load_all(adapter)
    assert reasons == {}
    return samples


def test_build_all_returns_each_adapter_root(roots):
    assert set(roots) == {"mimic_cxr", "chexpert", "rsna", "siim", "covidx", "object_cxr"}
    assert roots["chexpert"].name == "CheXpert-v1.0-small"
    assert all(root.is_dir() for root in roots.values())


def test_mimic_cxr_studies_subjects_splits_and_reports(roots):
    adapter = MimicCxrJpg(roots["mimic_cxr"])
    refs = list(adapter.records())
    samples = load_clean(adapter)
    assert len(samples) == 64
    studies = Counter(ref.meta["study_id"] for ref in refs)
    assert len(studies) == 64 and set(studies.values()) == {1}  # one frontal image per study
    per_subject = Counter(ref.patient_id for ref in refs)
    assert set(per_subject.values()) <= {1, 2, 3} and max(per_subject.values()) > 1
    subject_splits = defaultdict(set)
    for sample in samples.values():
        subject_splits[sample.patient_id].add(sample.split)
        assert sample.view in ("PA", "AP")
    assert all(len(splits) == 1 for splits in subject_splits.values())
    by_split = Counter(next(iter(s)) for s in subject_splits.values())
    assert set(by_split) == {"train", "validate", "test"}
    assert by_split["train"] / len(subject_splits) == pytest.approx(0.8, abs=0.1)
    reports = [sample.report for sample in samples.values()]
    assert len(set(reports)) == 64
    for report in reports:
        assert report.lstrip().startswith("FINAL REPORT")
        sections = extract_sections(report)
        assert sections.source == "findings_impression"
        assert sections.findings and sections.impression
    labelled = [s for s in samples.values() if s.labels]
    assert len(labelled) == 64
    assert any(s.labels.get("No Finding") == 1.0 for s in labelled)
    assert any(v == 1.0 for s in labelled for k, v in s.labels.items() if k != "No Finding")


def test_chexpert_train_rows_support_5x200_sampling(roots):
    samples = load_clean(CheXpert(roots["chexpert"], split="train"))
    assert len(samples) == 80
    everything = load_clean(CheXpert(roots["chexpert"], split="train", frontal_only=False))
    laterals = set(everything) - set(samples)
    assert len(laterals) == 8
    frontal_patients = {s.patient_id for s in samples.values()}
    assert {everything[r].patient_id for r in laterals} <= frontal_patients
    for finding in CHEXPERT_COMPETITION:  # 5x200: the finding alone positive (No Finding aside)
        others = [f for f in CHEXPERT_OBSERVATIONS if f not in (finding, "No Finding")]
        pure = [
            s
            for s in samples.values()
            if s.labels.get(finding) == 1.0 and all(s.labels.get(f, 0.0) == 0.0 for f in others)
        ]
        assert len(pure) >= 4, finding
    assert any(-1.0 in s.labels.values() for s in samples.values())
    assert {s.split for s in samples.values()} == {"train"}


def test_chexpert_valid_rows_are_binary_and_other_patients(roots):
    train = load_clean(CheXpert(roots["chexpert"], split="train", frontal_only=False))
    valid = load_clean(CheXpert(roots["chexpert"], split="valid"))
    assert len(valid) == 20
    assert {s.patient_id for s in valid.values()}.isdisjoint(s.patient_id for s in train.values())
    for record_id, sample in valid.items():
        assert record_id.endswith("/study1/view1_frontal")
        assert set(sample.labels) == set(CHEXPERT_OBSERVATIONS)
        assert set(sample.labels.values()) <= {0.0, 1.0}
        assert sample.split == "validate"
    for finding in CHEXPERT_COMPETITION:
        assert {s.labels[finding] for s in valid.values()} == {0.0, 1.0}, finding
    with open(roots["chexpert"] / "valid.csv", newline="") as handle:
        paths = [row["Path"] for row in csv.DictReader(handle)]
    assert all(p.startswith("CheXpert-v1.0-small/valid/patient") for p in paths)


def test_rsna_boxes_and_positive_share(roots):
    samples = load_clean(RsnaPneumonia(roots["rsna"]))
    assert len(samples) == 60
    positives = [s for s in samples.values() if s.labels["Pneumonia"] == 1.0]
    assert len(positives) == 20
    assert {len(s.boxes) for s in samples.values()} == {0, 1, 2, 3}
    for sample in samples.values():
        assert sample.image.shape == (1024, 1024)
        assert (len(sample.boxes) > 0) == (sample.labels["Pneumonia"] == 1.0)
        assert (sample.boxes >= 0).all() and (sample.boxes <= 1024).all()
        assert sample.patient_id == sample.record_id


def test_siim_masks_and_patients(roots):
    adapter = SiimPneumothorax(roots["siim"])
    samples = load_clean(adapter)
    assert len(samples) == 60
    positives = [s for s in samples.values() if s.labels["Pneumothorax"] == 1.0]
    assert len(positives) == 30
    assert all(s.mask.any() for s in positives)
    negatives = [s for s in samples.values() if s.labels["Pneumothorax"] == 0.0]
    assert len(negatives) == 30 and not any(s.mask.any() for s in negatives)
    assert any(len(ref.meta["rle"]) >= 2 for ref in adapter.records())
    assert len({s.patient_id for s in samples.values()}) == 60
    for image_id, path in adapter.dicom_paths().items():
        assert path.relative_to(adapter.images).parts[2] == f"{image_id}.dcm"
    assert {s.image.shape for s in samples.values()} == {(1024, 1024)}
    header = (roots["siim"] / "train-rle.csv").read_text().splitlines()[0]
    assert header == "ImageId, EncodedPixels"


@pytest.mark.parametrize(("split", "per_class"), [("train", 15), ("test", 5)])
def test_covidx_classes_and_patients(roots, split, per_class):
    samples = load_clean(Covidx(roots["covidx"], split=split))
    classes = Counter(max(s.labels, key=s.labels.get) for s in samples.values())
    assert classes == dict.fromkeys(("normal", "pneumonia", "COVID-19"), per_class)
    patients = {
        line.split()[0]
        for name in ("train.txt", "test.txt")
        for line in (roots["covidx"] / name).read_text().splitlines()
    }
    assert len(patients) == 60


@pytest.mark.parametrize(("split", "count"), [("train", 40), ("dev", 10)])
def test_object_cxr_shapes_inside_images(roots, split, count):
    adapter = ObjectCxr(roots["object_cxr"], split=split)
    samples = load_clean(adapter)
    assert len(samples) == count
    positives = [s for s in samples.values() if s.labels[FOREIGN_OBJECT] == 1.0]
    assert len(positives) == pytest.approx(count / 2, abs=1)
    kinds = set()
    for ref in adapter.records():
        sample = samples[ref.record_id]
        shapes = parse_annotation(ref.meta["annotation"])
        kinds |= {shape.kind for shape in shapes}
        height, width = sample.image.shape
        raw = np.asarray([shape.box for shape in shapes], np.float32).reshape(-1, 4)
        assert (raw >= 0).all() and (raw[:, 0::2] < width).all() and (raw[:, 1::2] < height).all()
        np.testing.assert_array_equal(sample.boxes, raw)  # nothing needed clipping
        assert sample.mask.any() == bool(shapes)
    assert kinds == {0, 1, 2}


def test_mimic_tables_are_gzipped_with_upstream_headers(roots):
    root = roots["mimic_cxr"]
    with gzip.open(root / "mimic-cxr-2.0.0-split.csv.gz", "rt") as handle:
        assert handle.readline().strip() == "dicom_id,study_id,subject_id,split"
    with gzip.open(root / "mimic-cxr-2.0.0-chexpert.csv.gz", "rt") as handle:
        assert handle.readline().startswith("subject_id,study_id,Atelectasis,Cardiomegaly")
