"""Incremental ingest and similarity: a rerun decodes only the records that are new or whose
files changed and embeds only the new reports, merging their neighbours into the top-k lists;
it ends with the outputs a full run makes. A real MIMIC-CXR-JPG layout (real radiographs,
Open-I reports) with studies released later; the real MiniLM encoder."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from dataset_fixtures import build_mimic_with_every_problem, write_radiograph
from protocol_layouts import build_mimic_cxr_jpg, release_mimic_studies, withhold_mimic_studies

from components.platform.config import Params
from components.platform.lineage import code_version
from components.platform.shards import ShardImages, read_shard_masks
from components.platform.stage_storage import read_manifest
from components.stages.ingest import PreviousIngest
from components.stages.ingest import run as run_ingest
from components.stages.reports import run as run_reports
from components.stages.similarity import TEXT_STATES
from components.stages.similarity import run as run_similarity
from sista_core.similarity import topk_neighbours

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
            # the similarity stage keeps the first two text layers' states for pre-training
            "pretrain": {"text": {"freeze_layers": 2}},
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


def similarity_output(folder):
    """Per record id: its embedding, its frozen-layer states, its neighbours and their
    similarities."""
    ids = (folder / "record_ids.txt").read_text().split()
    vectors = np.load(folder / "embeddings.npy").astype(np.float32)
    offsets = np.load(folder / TEXT_STATES / "offsets.npy")
    states = np.load(folder / TEXT_STATES / "states.npy")
    table = {row["record_id"]: row for row in pq.read_table(folder / "topk.parquet").to_pylist()}
    return {
        record_id: (
            vectors[i],
            states[offsets[i] : offsets[i + 1]],
            table[record_id]["neighbour_ids"],
            np.array(table[record_id]["similarity"]),
        )
        for i, record_id in enumerate(ids)
    }


def test_new_studies_are_decoded_alone_and_the_result_is_a_full_ingest(tmp_path, local_ray):
    source = build_mimic_cxr_jpg(tmp_path / "mimic", studies=40)
    new_ids = withhold_mimic_studies(source, 6, tmp_path / "later")
    params = ingest_params(tmp_path, source)

    first = run_ingest(params)
    run_reports(params)
    run_similarity(params)
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
    run_reports(params)
    run_similarity(params)
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
    scratch_params = ingest_params(tmp_path, source, data="scratch")
    scratch = run_ingest(scratch_params)
    assert (scratch["pretrain_decoded"], scratch["pretrain_reused"]) == (40, 0)
    full = read_output(tmp_path / "scratch" / "ingest")
    assert sorted(full) == sorted(after)
    for record_id, (row, image, mask) in full.items():
        again_row, again_image, again_mask = after[record_id]
        assert json.dumps(again_row, sort_keys=True) == json.dumps(row, sort_keys=True)  # NaN too
        assert np.array_equal(again_image, image), record_id
        assert (mask is None and again_mask is None) or np.array_equal(mask, again_mask)

    # Similarity: the six new reports embedded alone, their neighbours merged into the lists.
    counts = read_manifest(tmp_path / "data" / "similarity")["counts"]
    assert counts == {"embedded": 6, "reused": 34, "topk": "merged"}
    run_reports(scratch_params)
    run_similarity(scratch_params)
    merged, rebuilt = (similarity_output(tmp_path / d / "similarity") for d in ("data", "scratch"))
    assert sorted(merged) == sorted(rebuilt)
    for record_id, (vector, states, neighbours, sims) in rebuilt.items():
        again = merged[record_id]
        np.testing.assert_allclose(again[0], vector, atol=2e-3)  # float16, other batches
        np.testing.assert_allclose(again[1], states, atol=1e-4)
        np.testing.assert_allclose(again[3], sims, atol=2e-3)
        close = np.abs(np.subtract.outer(sims, sims) + np.eye(len(sims))).min(1) > 2e-3
        assert [n for n, c in zip(neighbours, close, strict=True) if c] == [
            n for n, c in zip(again[2], close, strict=True) if c
        ], record_id
    # ... and the lists a rebuild over its own embeddings gives.
    folder = tmp_path / "data" / "similarity"
    vectors = torch.from_numpy(np.load(folder / "embeddings.npy"))
    indices, sims = topk_neighbours(vectors, 32)
    ids = (folder / "record_ids.txt").read_text().split()
    for i, record_id in enumerate(ids):
        _, _, neighbours, merged_sims = merged[record_id]
        np.testing.assert_allclose(merged_sims, sims[i].numpy(), atol=1e-6)
        close = np.abs(np.subtract.outer(merged_sims, merged_sims) + np.eye(32)).min(1) > 1e-6
        rebuilt_ids = [ids[j] for j in indices[i].tolist()]
        assert np.array(neighbours)[close].tolist() == np.array(rebuilt_ids)[close].tolist()

    # Other ingest settings: nothing of the previous output is reused.
    code = code_version()
    assert PreviousIngest.of(ingest_params(tmp_path, source, image_size=48), code) is None
    assert PreviousIngest.of(params, "other code") is None
    assert PreviousIngest.of(params, code) is not None


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
