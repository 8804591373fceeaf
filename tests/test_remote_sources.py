"""Datasets on S3 are read in place: the driver copies the tables its adapter lists from, each
ingest task fetches its own records' objects, and the result is the local ingest's, byte for
byte (moto's S3 server as a real process, real Ray tasks)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import ray
from dataset_fixtures import build_mimic_with_every_problem, check_counts_add_up

from components.platform import storage
from components.platform.config import Params
from components.platform.remote_sources import listed, mirrored, prepare
from components.stages.downstream_sets import OfficialSplits
from components.stages.ingest import ingest_dataset, patient_fractions
from sista_core.datasets import CheXpert, MimicCxrJpg, RecordRef


def test_listing_patterns_match_at_their_own_depth():
    tables = ("*.csv", "*.csv.gz")
    assert listed("mimic-cxr-2.0.0-split.csv.gz", tables)
    assert not listed("files/p10/p10000032/s50414267.txt", tables)
    assert not listed("files/a.csv", tables)  # only the tables at the top
    assert listed("reports/1.xml", ("reports/*.xml",))
    assert listed("files/p10/x.jpg", ("**",))
    assert not listed("train.csv", ())


def test_a_relocated_adapter_and_reference_read_below_the_new_root(tmp_path):
    old, new = tmp_path / "copy", tmp_path / "fetched"
    chexpert = OfficialSplits({"train": CheXpert(old, "train"), "test": CheXpert(old, "valid")})
    moved = chexpert.relocated(old, new)
    assert moved.parts["test"].labels_csv == new / "valid.csv"
    assert chexpert.parts["test"].labels_csv == old / "valid.csv"  # the original is untouched
    assert moved.listing_files == ("*.csv",)
    ref = RecordRef("d1", "p1", old / "files/a.jpg", {"report_path": old / "a.txt", "view": "PA"})
    assert ref.relocated(old, new).files() == [new / "files/a.jpg", new / "a.txt"]
    assert ref.relocated(old, new).meta["view"] == "PA"
    elsewhere = RecordRef("d2", "p2", tmp_path / "other.jpg")
    assert elsewhere.relocated(old, new).image_path == tmp_path / "other.jpg"


@pytest.fixture
def s3_ray(s3_env):
    """A local Ray instance started after the S3 variables are set: its workers inherit them."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_mimic_on_s3_ingests_like_the_local_copy_without_copying_its_images(
    tmp_path, s3_ray, monkeypatch
):
    local_root = tmp_path / "mimic"
    expected = build_mimic_with_every_problem(local_root)
    uri = f"s3://sista/datasets-{uuid.uuid4().hex[:6]}/mimic-cxr-jpg/2.0.0"
    storage.upload_dir(local_root, uri)
    params = Params.model_validate(
        {
            "storage": {"uri": str(tmp_path / "data"), "local_dir": str(tmp_path / "data")},
            "ingest": {"source": "mimic_cxr", "source_path": uri, "image_size": 64},
        }
    )
    config = mirrored(params)
    copy = Path(config.source_path)
    assert copy == tmp_path / "data" / "sources" / uri[len("s3://") :]
    remote_adapter = MimicCxrJpg(copy)
    remote = prepare(params, uri, remote_adapter)
    assert remote is not None and remote.root == copy
    assert sorted(p.name for p in copy.rglob("*") if p.is_file()) == sorted(
        p.name for p in local_root.glob("*.csv.gz")
    )

    splits = patient_fractions(0.2, 0.0, 0)
    results = {}
    for where, adapter, source in (
        ("local", MimicCxrJpg(local_root), None),
        ("s3", remote_adapter, remote),
    ):
        out = tmp_path / f"out-{where}"
        out.mkdir()
        results[where] = ingest_dataset(
            adapter, "pretrain", config, out, splits, local_files=True, remote=source
        )
    check_counts_add_up(results["s3"], expected, duplicates=1)
    missing = next(r for r in results["s3"].quarantine_rows if r["reason"] == "missing_file")
    assert missing["detail"].startswith(f"{uri}/files/")  # the object, not a temporary copy
    for rows in ("manifest_rows", "quarantine_rows"):  # as JSON: unlabelled findings are NaN
        # Fingerprints differ by design: ETags on S3, sizes and modification times here.
        s3_rows, local_rows = (
            [{k: v for k, v in row.items() if k != "fingerprint"} for row in getattr(result, rows)]
            for result in (results["s3"], results["local"])
        )
        assert json.dumps(s3_rows) == json.dumps(local_rows).replace(str(local_root), uri)
    assert all(row["fingerprint"] for row in results["s3"].manifest_rows)
    shards = sorted(p.name for p in (tmp_path / "out-local" / "shards").iterdir())
    assert shards == sorted(p.name for p in (tmp_path / "out-s3" / "shards").iterdir())
    for name in shards:
        local_bytes = (tmp_path / "out-local" / "shards" / name).read_bytes()
        assert (tmp_path / "out-s3" / "shards" / name).read_bytes() == local_bytes
    assert not [p for p in copy.rglob("*") if p.suffix in (".jpg", ".txt")]  # nothing kept

    monkeypatch.setattr(storage, "copy_file", lambda *_, **__: pytest.fail("copied again"))
    assert prepare(params, uri, remote_adapter) == remote  # unchanged on S3: the copy is used
