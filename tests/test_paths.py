"""Paths from outside input stay inside their root: a table row, an id or a symlink that
points elsewhere is quarantined as ``path_outside_root``, never read."""

from __future__ import annotations

import os

import pytest
from dataset_fixtures import load_all, write_csv, write_kaggle_dicom, write_radiograph

from sista_core.datasets import CheXpert, Covidx, ObjectCxr, RsnaPneumonia
from sista_core.datasets.paths import PathOutsideRoot, inside
from sista_core.findings import CHEXPERT_OBSERVATIONS


@pytest.mark.parametrize(
    "relative",
    ["../x.jpg", "a/../../x.jpg", "/etc/passwd", "a//b.jpg", "./a.jpg", "C:x", "a\\..\\b"],
)
def test_inside_refuses_paths_that_could_leave_the_root(tmp_path, relative):
    with pytest.raises(PathOutsideRoot):
        inside(tmp_path, relative)


def test_inside_joins_plain_relative_paths(tmp_path):
    assert inside(tmp_path, "train/p1/view1.jpg") == tmp_path / "train" / "p1" / "view1.jpg"
    assert inside(tmp_path, "a..b.png") == tmp_path / "a..b.png"  # dots inside a name are fine


def chexpert_with(root, paths: list[str]):
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBSERVATIONS]
    labels = ["1.0"] + [""] * (len(CHEXPERT_OBSERVATIONS) - 1)
    rows = [[path, "Male", "60", "Frontal", "AP", *labels] for path in paths]
    write_csv(root / "train.csv", header, rows)
    return CheXpert(root, "train")


def test_table_paths_outside_the_root_are_quarantined(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    outside = tmp_path / "other-project" / "study1" / "view1_frontal.jpg"
    write_radiograph(outside, 0)
    write_radiograph(root / "train" / "patient1" / "study1" / "view1_frontal.jpg", 1)
    adapter = chexpert_with(
        root,
        [
            "CheXpert-v1.0-small/train/patient1/study1/view1_frontal.jpg",
            "CheXpert-v1.0-small/../other-project/study1/view1_frontal.jpg",
            "CheXpert-v1.0-small/train//patient2/study1/view1_frontal.jpg",
        ],
    )
    samples, reasons = load_all(adapter)
    assert list(samples) == ["patient1/study1/view1_frontal"]
    assert sorted(reasons.values()) == ["path_outside_root", "path_outside_root"]


def test_a_symlink_leaving_the_root_is_not_followed(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    secret = tmp_path / "elsewhere.jpg"
    write_radiograph(secret, 0)
    link = root / "train" / "patient1" / "study1" / "view1_frontal.jpg"
    link.parent.mkdir(parents=True)
    os.symlink(secret, link)
    adapter = chexpert_with(root, ["CheXpert-v1.0-small/train/patient1/study1/view1_frontal.jpg"])
    assert load_all(adapter) == ({}, {"patient1/study1/view1_frontal": "path_outside_root"})


def test_ids_and_file_names_with_dot_dot_are_quarantined(tmp_path):
    rsna = tmp_path / "rsna"
    write_kaggle_dicom(tmp_path / "escaped.dcm", "escaped", side=128)
    write_csv(
        rsna / "stage_2_train_labels.csv",
        ["patientId", "x", "y", "width", "height", "Target"],
        [["../../escaped", "", "", "", "", "0"]],
    )
    assert load_all(RsnaPneumonia(rsna))[1] == {"../../escaped": "path_outside_root"}
    covidx = tmp_path / "covidx"
    covidx.mkdir()
    write_radiograph(tmp_path / "escaped.png", 0)
    (covidx / "train.txt").write_text("1 ../../escaped.png normal rsna\n")
    assert load_all(Covidx(covidx))[1] == {"../../escaped.png": "path_outside_root"}
    objects = tmp_path / "object-CXR"
    write_csv(objects / "train.csv", ["image_name", "annotation"], [["../escaped.png", ""]])
    assert set(load_all(ObjectCxr(objects))[1].values()) == {"path_outside_root"}
