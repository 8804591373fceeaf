"""Stage folders on S3 (moto's server process on 127.0.0.1): pushed complete with their
manifest last, pulled and checked, and a stage that cannot reach its storage or its inputs
stops before any work with one line."""

import json
import threading
import uuid

import pyarrow.fs
import pytest
import yaml

from components.platform import remote_sources, stage_storage, storage
from components.platform.config import Params
from components.platform.stage import stage_main
from components.platform.stage_storage import MANIFEST, StageOutputMissing, content_hashes
from sista_core.datasets import SiimPneumothorax


@pytest.fixture
def s3_params(s3_env, tmp_path) -> Params:
    """Params whose stage folders live below a fresh prefix of the local S3 server."""
    prefix = f"s3://sista/test-{uuid.uuid4().hex[:8]}"
    return Params.model_validate({"storage": {"uri": prefix, "local_dir": str(tmp_path / "copy")}})


def write_stage(params: Params, folder: str, files: dict[str, bytes]) -> None:
    """A completed stage output with these files, pushed the way every stage pushes."""
    with stage_storage.stage_output(params, folder, {"mlflow_run_id": "run"}) as (out, _):
        for name, data in files.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data)


def test_a_pushed_output_pulls_back_identical_on_another_machine(s3_params, tmp_path):
    write_stage(s3_params, "reports", {"reports.parquet": b"rows", "sub/counts.json": b"{}"})
    remote = storage.list_prefix(f"{s3_params.storage.uri}/reports")
    assert [uri.rsplit("/reports/", 1)[1] for uri in remote] == [
        MANIFEST,
        "reports.parquet",
        "sub/counts.json",
    ]
    elsewhere = s3_params.storage.model_copy(update={"local_dir": str(tmp_path / "node2")})
    root = stage_storage.pull(elsewhere, ["reports"])
    assert root == tmp_path / "node2"
    assert (root / "reports" / "reports.parquet").read_bytes() == b"rows"
    manifest = json.loads((root / "reports" / MANIFEST).read_text())
    assert manifest["files"] == content_hashes(root / "reports")


def test_a_new_output_replaces_the_old_one_without_leftovers(s3_params):
    write_stage(s3_params, "similarity", {"old.npy": b"1", "kept.txt": b"a"})
    write_stage(s3_params, "similarity", {"kept.txt": b"b"})
    remote = storage.list_prefix(f"{s3_params.storage.uri}/similarity")
    assert [uri.rsplit("/", 1)[1] for uri in remote] == [MANIFEST, "kept.txt"]
    assert storage.read_bytes(f"{s3_params.storage.uri}/similarity/kept.txt") == b"b"


def test_an_up_to_date_copy_is_not_downloaded_again(s3_params, monkeypatch):
    write_stage(s3_params, "ingest", {"manifest.parquet": b"m"})
    stage_storage.pull(s3_params.storage, ["ingest"])  # the writer's copy is current

    def no_download(*_, **__):
        raise AssertionError("downloaded a copy that was already current")

    monkeypatch.setattr(storage, "download_dir", no_download)
    stage_storage.pull(s3_params.storage, ["ingest"])


def test_workers_pulling_at_once_share_one_copy(s3_params, tmp_path):
    write_stage(s3_params, "ingest", {f"shards/{i}.npy": bytes([i]) * 1000 for i in range(20)})
    node = s3_params.storage.model_copy(update={"local_dir": str(tmp_path / "node")})
    errors = []

    def pull():
        try:
            stage_storage.pull(node, ["ingest"])
        except Exception as error:  # reported by the assertion below
            errors.append(error)

    workers = [threading.Thread(target=pull) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert not errors
    assert len(list((tmp_path / "node" / "ingest" / "shards").iterdir())) == 20


def test_an_input_that_was_never_written_names_its_stage(s3_params):
    with pytest.raises(StageOutputMissing, match="stage 'pretrain' has not completed") as caught:
        stage_storage.pull(s3_params.storage, ["pretrain/sista"])
    assert "\n" not in str(caught.value)


def test_an_output_half_replaced_on_s3_is_refused(s3_params, tmp_path):
    write_stage(s3_params, "reports", {"reports.parquet": b"complete"})
    # Another writer replaced a file but has not written its manifest yet.
    storage.write_bytes(f"{s3_params.storage.uri}/reports/reports.parquet", b"newer")
    node = s3_params.storage.model_copy(update={"local_dir": str(tmp_path / "node")})
    with pytest.raises(storage.StorageError, match="changed while it was copied"):
        stage_storage.pull(node, ["reports"])
    assert not (tmp_path / "node" / "reports").exists()  # no copy that would pass as current


def test_ray_checkpoints_go_to_s3_through_a_pyarrow_filesystem(s3_params):
    settings = stage_storage.ray_storage(s3_params, "checkpoints")
    bucket_path = f"{s3_params.storage.uri}/checkpoints"[len("s3://") :]
    assert settings["storage_path"] == bucket_path
    filesystem = settings["storage_filesystem"]
    with filesystem.open_output_stream(f"{bucket_path}/run/checkpoint_0/state.json") as out:
        out.write(b"{}")
    assert storage.read_bytes(f"s3://{bucket_path}/run/checkpoint_0/state.json") == b"{}"
    info = filesystem.get_file_info(pyarrow.fs.FileSelector(bucket_path, recursive=True))
    assert any(entry.path.endswith("state.json") for entry in info)


def test_local_storage_keeps_ray_storage_in_the_data_folder(tmp_path):
    params = Params.model_validate({"storage": {"uri": str(tmp_path / "data")}})
    assert stage_storage.ray_storage(params, "tune") == {
        "storage_path": str(tmp_path / "data/tune")
    }
    (tmp_path / "data/ingest").mkdir(parents=True)
    (tmp_path / "data/ingest" / MANIFEST).write_text("{}")
    assert stage_storage.pull(params.storage, ["ingest"]) == tmp_path / "data"  # nothing to copy


def run_stage(folder, stage: str, storage_section: dict, capsys) -> tuple[int, str]:
    """``python -m components.stages.<stage>`` as the stage's main runs it (in this process: the
    checks under test run before the stage's own code); returns exit status and stderr."""
    (folder / "params.yaml").write_text(yaml.safe_dump({"storage": storage_section}))
    ran = []
    try:
        stage_main(
            stage, lambda params, args: ran.append(stage), ["--params", str(folder / "params.yaml")]
        )
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    assert not ran, "the stage's work started"
    return status, capsys.readouterr().err


@pytest.mark.parametrize(
    "problem, message",
    [
        ("no bucket", "bucket 'no-such-bucket' does not exist"),
        ("no credentials", "no AWS credentials"),
    ],
)
def test_a_stage_with_unusable_storage_stops_before_any_work(
    s3_env, tmp_path, monkeypatch, capsys, problem, message
):
    uri = "s3://no-such-bucket/ci" if problem == "no bucket" else "s3://sista/ci"
    if problem == "no credentials":
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    status, stderr = run_stage(tmp_path, "reports", {"uri": uri}, capsys)
    assert status == 2
    assert message in stderr and len(stderr.strip().splitlines()) == 1


def test_a_stage_whose_input_is_not_on_s3_names_the_missing_stage(s3_env, tmp_path, capsys):
    prefix = f"s3://sista/empty-{uuid.uuid4().hex[:6]}"
    status, stderr = run_stage(tmp_path, "similarity", {"uri": prefix}, capsys)
    assert status == 1
    assert "stage 'reports' has not completed" in stderr and "Traceback" not in stderr


def test_a_stage_whose_local_input_is_missing_names_the_missing_stage(tmp_path, capsys):
    status, stderr = run_stage(tmp_path, "publish", {"uri": str(tmp_path / "data")}, capsys)
    assert status == 1
    assert "stage 'evaluate' has not completed" in stderr and "Traceback" not in stderr


def test_a_dataset_whose_listing_reads_every_file_is_copied_whole_and_refreshed(
    s3_params, tmp_path, monkeypatch
):
    # SIIM's listing reads each DICOM's header: the whole prefix is copied, and read here.
    source = f"s3://sista/datasets-{uuid.uuid4().hex[:6]}/siim"
    storage.write_bytes(f"{source}/train-rle.csv", b"ImageId, EncodedPixels\n")
    storage.write_bytes(f"{source}/dicom-images-train/1/2/3.dcm", b"dicom")
    params = s3_params
    copy = tmp_path / "copy" / "sources" / source[len("s3://") :]
    assert remote_sources.mirror_path(params.storage, source) == str(copy)
    adapter = SiimPneumothorax(copy)
    assert remote_sources.prepare(params, source, adapter) is None  # files local: read here
    assert (copy / "dicom-images-train" / "1" / "2" / "3.dcm").read_bytes() == b"dicom"

    real_download = storage.download_dir
    monkeypatch.setattr(storage, "download_dir", lambda *_, **__: pytest.fail("copied again"))
    remote_sources.prepare(params, source, adapter)  # unchanged on S3: the copy is used
    storage.write_bytes(f"{source}/train-rle.csv", b"ImageId, EncodedPixels\n3, -1\n")
    monkeypatch.setattr(storage, "download_dir", real_download)
    remote_sources.prepare(params, source, adapter)
    assert (copy / "train-rle.csv").read_bytes().endswith(b"3, -1\n")
