"""Broken records of every kind go to quarantine with their reason; good ones all reach the
manifest; the counts add up. Real layouts (MIMIC-CXR-JPG, RSNA DICOMs), real radiographs."""

from __future__ import annotations

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from dataset_fixtures import build_mimic_with_every_problem, build_rsna, check_counts_add_up

from components.platform.config import Params
from components.platform.shards import read_shard_masks, row_boxes
from components.platform.stage_storage import read_manifest
from components.stages.ingest import QuarantineLimitExceeded, ingest_dataset, patient_fractions
from components.stages.ingest import run as run_ingest
from sista_core.datasets import MimicCxrJpg, RsnaPneumonia
from sista_core.datasets.embedded_tasks import PhantomPneumothoraxSegmentation
from sista_core.datasets.images import resize_boxes, resize_mask


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_every_broken_mimic_record_is_quarantined_with_its_reason(tmp_path, local_ray):
    expected = build_mimic_with_every_problem(tmp_path / "mimic")
    source = {"source": "mimic_cxr", "source_path": str(tmp_path / "mimic"), "image_size": 64}
    config = Params(ingest=source).ingest
    out = tmp_path / "out"
    out.mkdir()
    mimic = MimicCxrJpg(tmp_path / "mimic")  # files on this disk: read by tasks on this node
    result = ingest_dataset(
        mimic, "pretrain", config, out, patient_fractions(0.2, 0.0, 0), local_files=True
    )
    check_counts_add_up(result, expected, duplicates=1)
    duplicates = [r for r in result.quarantine_rows if r["reason"] == "duplicate_id"]
    assert [r["record_id"] for r in duplicates] == ["good-1-dicom"]
    shards = sorted((out / "shards").glob("*.npy"))
    assert sum(len(np.load(s)) for s in shards) == len(result.manifest_rows)


def stage_params(tmp_path, max_quarantine_fraction: float) -> Params:
    """The ingest stage on the broken MIMIC folder plus a small phantom downstream set."""
    return Params.model_validate(
        {
            "storage": {"uri": str(tmp_path / "data")},
            "mlflow": {
                "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                "artifact_root": str(tmp_path / "mlartifacts"),
            },
            "ingest": {
                "source": "mimic_cxr",
                "source_path": str(tmp_path / "mimic"),
                "image_size": 32,
                "max_quarantine_fraction": max_quarantine_fraction,
                "downstream": {
                    "sets": {
                        "phantoms": {"adapter": "phantom_classification", "patients": 50},
                    },
                    "seeds": [0],
                },
            },
            "evaluate": {"tasks": {"classification": ["phantoms"]}},
            "publish": {"metric": "classification/phantoms/auroc@0.01"},
        }
    )


@pytest.mark.slow
def test_the_stage_counts_every_quarantined_record_and_writes_the_list(tmp_path, local_ray):
    expected = build_mimic_with_every_problem(tmp_path / "mimic")
    summary = run_ingest(stage_params(tmp_path, max_quarantine_fraction=1.0))
    out = tmp_path / "data" / "ingest"
    quarantine = pq.read_table(out / "quarantine.parquet").to_pylist()
    listed = {(r["record_id"], r["reason"]) for r in quarantine if r["dataset"] == "pretrain"}
    bad = {(i, reason) for i, reason in expected.items() if reason}
    assert listed == bad | {("good-1-dicom", "duplicate_id")}
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    kept = {r["record_id"] for r in manifest if r["dataset"] == "pretrain"}
    assert kept == {i for i, reason in expected.items() if reason is None}
    counts = read_manifest(out)["counts"]
    assert counts["pretrain_kept"] + counts["pretrain_quarantined"] == len(expected) + 1
    assert (counts["pretrain_kept"], counts["pretrain_quarantined"]) == (len(kept), len(listed))
    assert counts["phantoms_kept"] == 50 and summary["pretrain_quarantined"] == len(listed)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(read_manifest(out)["mlflow_run_id"])
    assert run.data.metrics["pretrain_quarantined"] == len(listed)


@pytest.mark.slow
def test_a_source_mostly_broken_stops_the_stage_naming_the_reasons(tmp_path, local_ray):
    build_mimic_with_every_problem(tmp_path / "mimic")
    with pytest.raises(
        QuarantineLimitExceeded, match=r"pretrain: 10 of 14 records unusable .*report_only_deid"
    ):
        run_ingest(stage_params(tmp_path, max_quarantine_fraction=0.05))
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == []  # nothing half-written


def test_every_broken_dicom_is_quarantined_with_its_reason(tmp_path, local_ray):
    layout = build_rsna(tmp_path / "rsna")
    expected = {record_id: None for record_id in layout.good} | layout.broken
    config = Params(ingest={"image_size": 64}).ingest
    out = tmp_path / "out"
    out.mkdir()
    result = ingest_dataset(
        RsnaPneumonia(layout.root), "rsna", config, out, patient_fractions(0.2, 0.2, 0)
    )
    check_counts_add_up(result, expected)
    manifest_ids = {row["record_id"] for row in result.manifest_rows}
    assert manifest_ids == layout.good
    assert "no_pixel_data" in {r["reason"] for r in result.quarantine_rows}
    assert "unsupported_photometric" in {r["reason"] for r in result.quarantine_rows}


def test_detection_boxes_and_segmentation_masks_are_stored_with_their_images(tmp_path, local_ray):
    """Targets travel with their images: boxes in the manifest, masks in shards beside the
    image shards, both mapped onto the resized image exactly as the adapter's sample is."""
    layout = build_rsna(tmp_path / "rsna")
    config = Params(ingest={"image_size": 64}).ingest
    out = tmp_path / "out"
    out.mkdir()
    adapter = RsnaPneumonia(layout.root)
    result = ingest_dataset(
        adapter, "rsna", config, out, patient_fractions(0.2, 0.2, 0), with_targets=True
    )
    refs = {ref.record_id: ref for ref in adapter.records()}
    with_boxes = 0
    for row in result.manifest_rows:
        sample = adapter.load(refs[row["record_id"]])
        expected = resize_boxes(sample.boxes, sample.image.shape, 64)
        np.testing.assert_allclose(row_boxes(row), expected, atol=1e-4)
        with_boxes += len(expected) > 0
    assert with_boxes > 0

    segmentation = PhantomPneumothoraxSegmentation(12, image_size=96, seed=0, positive_fraction=1)
    result = ingest_dataset(
        segmentation, "pneumothorax", config, out, patient_fractions(0.2, 0.2, 0), with_targets=True
    )
    masks = read_shard_masks(out, result.manifest_rows)
    refs = {ref.record_id: ref for ref in segmentation.records()}
    for row, mask in zip(result.manifest_rows, masks, strict=True):
        expected = resize_mask(segmentation.load(refs[row["record_id"]]).mask, 64)
        assert mask.shape == (64, 64) and (mask == expected).all()
    assert masks.any(axis=(1, 2)).sum() > 0


def test_resize_mask_and_boxes_follow_the_letterbox():
    mask = np.zeros((100, 200), bool)
    mask[40:60, 100:150] = True  # a 20 x 50 block
    resized = resize_mask(mask, 50)  # scale 0.25, image 25 x 50 placed at y offset 12 or 13
    rows, cols = np.nonzero(resized)
    assert cols.min() == 25 and cols.max() == 36  # pixels 25..36 cover x in [25, 37.5)
    boxes = resize_boxes(np.array([[100, 40, 150, 60]], np.float32), (100, 200), 50)
    offset_y = (50 - 25) // 2
    np.testing.assert_allclose(boxes, [[25, 10 + offset_y, 37.5, 15 + offset_y]])
    assert rows.min() == 10 + offset_y
