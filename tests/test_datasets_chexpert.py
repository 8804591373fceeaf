"""CheXpert adapter on a fixture made of real train.csv rows, and on the whole real table."""

from __future__ import annotations

import pytest
from dataset_fixtures import Layout, build_chexpert, load_all, real_table_rows

from sista_core.assets import CHEXPERT_LABELS, xrv_data_file
from sista_core.datasets import CheXpert
from sista_core.datasets.tables import ROW_ERROR
from sista_core.findings import CHEXPERT_OBSERVATIONS


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Layout:
    return build_chexpert(tmp_path_factory.mktemp("chexpert"))


def test_frontal_images_load_and_each_broken_record_names_its_reason(layout):
    samples, reasons = load_all(CheXpert(layout.root))
    assert set(samples) == layout.good
    assert reasons == layout.broken  # truncated, zero-byte, missing, tiny, short row, bad label


def test_patient_and_view_come_from_the_row(layout):
    samples, _ = load_all(CheXpert(layout.root))
    sample = samples["patient00004/study1/view1_frontal"]
    assert (sample.patient_id, sample.view, sample.split) == ("patient00004", "PA", "train")


@pytest.mark.parametrize(
    ("uncertain", "expected"),
    [("keep", -1.0), ("ones", 1.0), ("zeros", 0.0), ("ignore", None)],
)
def test_uncertain_labels_follow_the_policy(layout, uncertain, expected):
    # Real row: patient00002/study2 has Cardiomegaly -1.0, Lung Opacity 1.0, blanks elsewhere.
    samples, _ = load_all(CheXpert(layout.root, uncertain=uncertain))
    labels = samples["patient00002/study2/view1_frontal"].labels
    assert labels.get("Cardiomegaly") == expected
    assert labels["Lung Opacity"] == 1.0
    assert "No Finding" not in labels  # blank: not mentioned


def test_labels_match_the_real_rows(layout):
    header, rows = real_table_rows(CHEXPERT_LABELS, 11)
    samples, _ = load_all(CheXpert(layout.root))
    for row in rows:
        record_id = "/".join(row[0].split("/")[2:5])[: -len(".jpg")]
        if record_id in samples:
            expected = {
                name: float(row[header.index(name)])
                for name in CHEXPERT_OBSERVATIONS
                if row[header.index(name)]
            }
            assert samples[record_id].labels == expected


def test_laterals_are_kept_when_frontal_only_is_off(layout):
    samples, _ = load_all(CheXpert(layout.root, frontal_only=False))
    assert layout.notes["laterals"] <= set(samples)
    assert {samples[i].view for i in layout.notes["laterals"]} == {"Lateral"}


def test_valid_split(layout):
    samples, reasons = load_all(CheXpert(layout.root, split="valid"))
    assert not reasons and len(samples) == 2
    sample = samples["patient64541/study1/view1_frontal"]
    assert sample.split == "validate" and sample.labels["Cardiomegaly"] == 1.0


@pytest.mark.slow
def test_whole_real_table_lists_every_frontal_image_without_reading_pixels(tmp_path):
    adapter = CheXpert(tmp_path / "CheXpert-v1.0-small", labels_csv=xrv_data_file(CHEXPERT_LABELS))
    refs = list(adapter.records())
    assert len(refs) == 191027
    assert not [ref for ref in refs if ROW_ERROR in ref.meta]
    assert len({ref.patient_id for ref in refs}) > 60000
    assert refs[0].image_path == tmp_path.joinpath(
        "CheXpert-v1.0-small", "train", "patient00001", "study1", "view1_frontal.jpg"
    )
