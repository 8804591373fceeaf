import json

import pytest

from components.platform.stage_storage import MANIFEST, atomic_output_dir, read_manifest


def test_a_failed_stage_leaves_the_previous_output_untouched(tmp_path):
    final = tmp_path / "ingest"
    with atomic_output_dir(final, "ingest") as (out, _):
        (out / "manifest.parquet").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(final, "ingest") as (out, _):
            (out / "manifest.parquet").write_text("half of v2")
            raise RuntimeError("killed mid-write")
    assert (final / "manifest.parquet").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ingest"]


def test_manifest_holds_content_hashes_and_extra_info(tmp_path):
    with atomic_output_dir(tmp_path / "reports", "reports", {"mlflow_run_id": "abc"}) as (
        out,
        extra,
    ):
        (out / "reports.parquet").write_bytes(b"x")
        extra["count"] = 1
    manifest = read_manifest(tmp_path / "reports")
    assert manifest["stage"] == "reports" and manifest["mlflow_run_id"] == "abc"
    assert manifest["count"] == 1
    assert manifest["files"]["reports.parquet"] == (
        "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
    )


def test_leftovers_of_a_killed_run_are_cleared(tmp_path):
    stale = tmp_path / ".ingest.tmp-deadbeef"
    stale.mkdir()
    (stale / "shard.npy").write_text("partial")
    replaced = tmp_path / ".ingest.old-deadbeef"  # killed between replace_dir's two renames
    replaced.mkdir()
    with atomic_output_dir(tmp_path / "ingest", "ingest") as (out, _):
        (out / "a").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ingest"]
    assert json.loads((tmp_path / "ingest" / MANIFEST).read_text())["files"] == {
        "a": "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"
    }


def test_reading_an_output_that_was_never_written_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="run its stage first"):
        read_manifest(tmp_path / "similarity")
