"""Incremental ingest: a rerun decodes only the records that are new or whose files changed,
takes the others from the previous output, and ends with the output a full ingest makes.
A real MIMIC-CXR-JPG layout (real radiographs, Open-I reports) with studies released later."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from dataset_fixtures import build_mimic_with_every_problem, write_radiograph
from protocol_layouts import build_mimic_cxr_jpg, release_mimic_studies, withhold_mimic_studies

from components.artifacts import read_manifest
from components.config import Params
from components.ingest import PreviousIngest, ShardImages, read_shard_masks
from components.ingest import run as run_ingest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def ingest_params(tmp_path, source, data: str = "data", **ingest) -> Params:
    """Ingest of a MIMIC-CXR-JPG folder with a phantom segmentation set (masks) beside it."""
    return Params.model_validate(
        {
            "storage": {"uri": str(tmp_path / data)},
            "mlflow": {
                "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                "artifact_root": str(tmp_path / "mlartifacts"),
            },
            "ingest": {
                "source": "mimic_cxr",
                "source_path": str(source),
                "image_size": 32,
                "shard_size": 8,
                "max_quarantine_fraction": 1.0,
                "downstream": {
                    "sets": {"lungs": {"adapter": "phantom_pneumothorax", "patients": 24}},
                    "seeds": [0],
                },
                **ingest,
            },
            "evaluate": {"tasks": {"segmentation": ["lungs"]}},
            "publish": {"metric": "segmentation/lungs/dice@1"},
        }
    )


def read_output(folder):
    """The manifest rows by record id, each with its image (and mask, where the set has one)."""
    rows = pq.read_table(folder / "manifest.parquet").to_pylist()
    images = ShardImages(folder, rows)[:]
    lungs = [row for row in rows if row["dataset"] == "lungs"]
    masks = dict(zip([r["record_id"] for r in lungs], read_shard_masks(folder, lungs), strict=True))
    return {
        row["record_id"]: ({**row}, image, masks.get(row["record_id"]))
        for row, image in zip(rows, images, strict=True)
    }


def test_new_studies_are_decoded_alone_and_the_result_is_a_full_ingest(tmp_path, local_ray):
    source = build_mimic_cxr_jpg(tmp_path / "mimic", studies=40)
    new_ids = withhold_mimic_studies(source, 6, tmp_path / "later")
    params = ingest_params(tmp_path, source)

    first = run_ingest(params)
    assert (first["pretrain_decoded"], first["pretrain_reused"]) == (34, 0)
    assert (first["lungs_decoded"], first["lungs_reused"]) == (24, 0)

    # The next release: six new studies, and one image of the first release replaced.
    release_mimic_studies(source, tmp_path / "later")
    before = read_output(tmp_path / "data" / "ingest")
    replaced_id, (replaced_row, replaced_image, _) = next(
        (i, v) for i, v in before.items() if v[0]["dataset"] == "pretrain"
    )
    replaced = next(source.rglob(f"{replaced_id}.jpg"))
    write_radiograph(replaced, index=11)

    second = run_ingest(params)
    manifest = read_manifest(tmp_path / "data" / "ingest")
    assert manifest["counts"]["pretrain_decoded"] == second["pretrain_decoded"] == 7
    assert (second["pretrain_reused"], second["lungs_decoded"], second["lungs_reused"]) == (
        33,
        0,
        24,
    )
    after = read_output(tmp_path / "data" / "ingest")
    assert set(new_ids) <= set(after) and not set(new_ids) & set(before)
    assert not np.array_equal(after[replaced_id][1], replaced_image)
    assert after[replaced_id][0]["fingerprint"] != replaced_row["fingerprint"]

    # The same folder ingested from nothing: the same rows, pixels and masks, record by record.
    scratch = run_ingest(ingest_params(tmp_path, source, data="scratch"))
    assert (scratch["pretrain_decoded"], scratch["pretrain_reused"]) == (40, 0)
    full = read_output(tmp_path / "scratch" / "ingest")
    assert sorted(full) == sorted(after)
    for record_id, (row, image, mask) in full.items():
        again_row, again_image, again_mask = after[record_id]
        assert json.dumps(again_row, sort_keys=True) == json.dumps(row, sort_keys=True)  # NaN too
        assert np.array_equal(again_image, image), record_id
        assert (mask is None and again_mask is None) or np.array_equal(mask, again_mask)

    # Other ingest settings: nothing of the previous output is reused.
    assert PreviousIngest.of(ingest_params(tmp_path, source, image_size=48)) is None
    assert PreviousIngest.of(params) is not None


def test_quarantined_records_are_not_read_again_until_they_change(tmp_path, local_ray):
    expected = build_mimic_with_every_problem(tmp_path / "mimic")
    params = ingest_params(tmp_path, tmp_path / "mimic")
    first = run_ingest(params)
    quarantine = pq.read_table(tmp_path / "data" / "ingest" / "quarantine.parquet").to_pylist()

    second = run_ingest(params)
    # Duplicates and bad reports are screened before any file is read; every other record
    # (kept or quarantined by its load) comes from the previous output.
    screened = sum(1 for r in quarantine if r["fingerprint"] is None)
    assert second["pretrain_decoded"] == 0
    assert second["pretrain_reused"] == len(expected) + 1 - screened
    again = pq.read_table(tmp_path / "data" / "ingest" / "quarantine.parquet").to_pylist()
    assert again == quarantine
    assert first["pretrain_quarantined"] == second["pretrain_quarantined"]
