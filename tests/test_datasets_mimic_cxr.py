"""MIMIC-CXR-JPG + reports adapter on a fixture in the PhysioNet layout."""

from __future__ import annotations

import pytest
from dataset_fixtures import MIMIC_REPORT, Layout, build_mimic_cxr, load_all

from sista_core.datasets import MimicCxrJpg
from sista_core.datasets.tables import ROW_ERROR


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Layout:
    return build_mimic_cxr(tmp_path_factory.mktemp("mimic-cxr-jpg"))


def test_frontal_images_load_and_each_broken_record_names_its_reason(layout):
    samples, reasons = load_all(MimicCxrJpg(layout.root))
    assert set(samples) == layout.good
    assert reasons == layout.broken  # truncated, missing, zero-byte, tiny, no report, short row


def test_sample_pairs_the_image_with_its_raw_study_report(layout):
    adapter = MimicCxrJpg(layout.root)
    ref = next(r for r in adapter.records() if r.record_id == layout.notes["labelled_study"])
    sample = adapter.load(ref)
    assert sample.patient_id == "10000032"
    assert ref.meta["study_id"] == "50414267"
    assert sample.report == MIMIC_REPORT
    assert (sample.view, sample.split) == ("PA", "train")
    assert sample.image.dtype.name == "uint8" and sample.image.ndim == 2


@pytest.mark.parametrize(
    ("uncertain", "atelectasis"), [("keep", -1.0), ("ones", 1.0), ("zeros", 0.0), ("ignore", None)]
)
def test_study_labels_follow_the_uncertainty_policy(layout, uncertain, atelectasis):
    adapter = MimicCxrJpg(layout.root, uncertain=uncertain)
    refs = {ref.record_id: ref for ref in adapter.records()}
    labels = adapter.load(refs[layout.notes["labelled_study"]]).labels
    assert labels.get("Atelectasis") == atelectasis
    assert labels["Pleural Effusion"] == 1.0 and labels["Pneumothorax"] == 0.0
    assert "Cardiomegaly" not in labels  # blank: not mentioned
    assert adapter.load(refs[layout.notes["unlabelled"]]).labels == {}


def test_lateral_views_are_left_out_unless_asked_for(layout):
    lateral = layout.notes["lateral"]
    assert lateral not in {ref.record_id for ref in MimicCxrJpg(layout.root).records()}
    samples, _ = load_all(MimicCxrJpg(layout.root, views=None))
    assert samples[lateral].view == "LATERAL"
    samples, _ = load_all(MimicCxrJpg(layout.root, views=("LATERAL",)))
    assert set(samples) == {lateral}


def test_official_split_filter(layout):
    refs = list(MimicCxrJpg(layout.root, splits=("validate", "test")).records())
    listed = [ref for ref in refs if ROW_ERROR not in ref.meta]
    assert [ref.meta["split"] for ref in listed] == ["validate", "test"]
    assert [ref.record_id for ref in refs if ROW_ERROR in ref.meta] == [
        "0c4eb1e1-b801903c-bcebe8a4-3da9cd3c-3b94a27c"  # a short row is quarantined, never filtered
    ]


def test_missing_report_is_allowed_when_not_required(layout):
    adapter = MimicCxrJpg(layout.root, require_report=False)
    samples, _ = load_all(adapter)
    assert samples[layout.notes["no_report"]].report is None


def test_reports_may_live_under_another_root(layout, tmp_path):
    samples, reasons = load_all(MimicCxrJpg(layout.root, reports_root=tmp_path))
    assert not samples and set(reasons.values()) >= {"missing_report"}


def test_unknown_uncertainty_policy_is_refused(layout):
    with pytest.raises(ValueError, match="uncertain policy"):
        MimicCxrJpg(layout.root, uncertain="maybe")


def test_a_report_file_over_the_cap_is_never_read(layout, tmp_path):
    import shutil

    from sista_core.datasets.mimic_cxr import MAX_REPORT_BYTES

    reports = tmp_path / "reports"
    shutil.copytree(layout.root / "files", reports / "files")
    adapter = MimicCxrJpg(layout.root, reports_root=reports)
    ref = next(r for r in adapter.records() if r.record_id == layout.notes["labelled_study"])
    ref.meta["report_path"].write_bytes(b"FINDINGS: " + b"x" * MAX_REPORT_BYTES)
    samples, reasons = load_all(adapter)
    assert reasons[ref.record_id] == "report_too_large"
    assert set(samples) == layout.good - {ref.record_id}  # the others load as before
