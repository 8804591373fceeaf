"""COVIDx CXR adapter on a fixture in COVID-Net's split-file layout."""

from __future__ import annotations

import pytest
from dataset_fixtures import Layout, build_covidx, load_all, write_radiograph

from sista_core.datasets import COVIDX_BINARY_CLASSES, COVIDX_CLASSES, Covidx


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Layout:
    return build_covidx(tmp_path_factory.mktemp("covidx"))


def test_images_load_and_each_broken_line_names_its_reason(layout):
    samples, reasons = load_all(Covidx(layout.root))
    assert set(samples) == layout.good
    assert reasons == layout.broken  # truncated, missing, unknown class, short line


def test_labels_are_one_hot_over_the_classes(layout):
    adapter = Covidx(layout.root)
    assert adapter.classes == COVIDX_CLASSES
    samples, _ = load_all(adapter)
    for filename, label in layout.notes["classes"].items():
        labels = samples[filename].labels
        assert labels == {name: float(name == label) for name in COVIDX_CLASSES}
    refs = {ref.record_id: ref for ref in adapter.records()}
    assert refs["jkms-35-e79-g001-l-a.jpg"].meta == {"class_index": 2, "source": "cohen"}
    assert samples["jkms-35-e79-g001-l-a.jpg"].patient_id == "17"


def test_test_split(layout):
    samples, reasons = load_all(Covidx(layout.root, split="test"))
    assert not reasons and samples["test-1.png"].split == "test"
    assert samples["test-1.png"].labels["normal"] == 1.0


def test_binary_release(tmp_path):
    write_radiograph(tmp_path / "train" / "a b.png", 0)  # a filename with a space
    (tmp_path / "train.txt").write_text("p1 a b.png positive bimcv\n")
    samples, reasons = load_all(Covidx(tmp_path, classes=COVIDX_BINARY_CLASSES))
    assert not reasons
    assert samples["a b.png"].labels == {"negative": 0.0, "positive": 1.0}


def test_unknown_split_is_refused(layout):
    with pytest.raises(ValueError, match="split"):
        Covidx(layout.root, split="validation")
