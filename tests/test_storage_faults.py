"""Transient S3 faults for real: moto's server is its own process, killed (connections
refused), started again (same objects), or frozen (SIGSTOP: requests hang) in the middle of
copying a stage's output folder. The copy retries with back-off and completes, or fails
with one line and leaves nothing half-written."""

from __future__ import annotations

import logging
import threading

import pytest
from s3_helpers import SECRET, MotoProcess, set_aws_variables

from components.platform import storage
from components.platform.storage import EndpointUnreachable, StorageSettings

BUCKET = "sista-data"
FILES = {f"shards/pretrain-train-{i:05d}.npy": bytes([i]) * (256 << 10) for i in range(6)}
FILES["_stage.json"] = b'{"stage": "ingest"}'
SETTINGS = StorageSettings(
    request_attempts=2,
    retry_budget_s=20.0,
    first_delay_s=0.2,
    max_delay_s=1.0,
    connect_timeout_s=1,
    read_timeout_s=2,
)


@pytest.fixture(scope="module")
def s3_process(tmp_path_factory):
    seed = tmp_path_factory.mktemp("seed")
    for key, data in FILES.items():
        path = seed / BUCKET / "runs" / "ingest" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (seed / BUCKET / "uploads").mkdir()
    server = MotoProcess(seed)
    yield server
    server.kill()


@pytest.fixture
def s3(s3_process, monkeypatch, tmp_path):
    if s3_process.process is None:
        s3_process.start()
    set_aws_variables(monkeypatch, s3_process.endpoint, tmp_path)
    return s3_process


def on_request(operation: str, number: int, action, settings=SETTINGS):
    """A botocore hook that runs ``action`` just before the ``number``-th ``operation``
    request is sent (the request itself then goes out to whatever is left); returns the
    function that removes the hook, and the list that counts the requests sent."""
    sent = []

    def hook(**_):
        sent.append(1)
        if len(sent) == number:
            action()

    client = storage.s3_client(settings)
    client.meta.events.register_first(f"before-send.s3.{operation}", hook)
    return lambda: client.meta.events.unregister(f"before-send.s3.{operation}", hook), sent


def local_files(folder):
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_download_survives_the_s3_process_dying_and_coming_back(s3, tmp_path, caplog):
    def kill_then_restart_in_a_second():
        s3.kill()
        threading.Timer(1.0, s3.start).start()

    target = tmp_path / "ingest"
    forget, _ = on_request("GetObject", 3, kill_then_restart_in_a_second)
    try:
        with caplog.at_level(logging.WARNING, logger="components.platform.storage"):
            storage.download_dir(f"s3://{BUCKET}/runs/ingest", target, settings=SETTINGS)
    finally:
        forget()
    assert local_files(target) == FILES
    assert "retrying" in caplog.text and "EndpointConnectionError" in caplog.text
    assert SECRET not in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ingest"]  # no staging left over


def test_upload_survives_the_s3_process_freezing(s3, tmp_path):
    source = tmp_path / "ingest"
    for key, data in FILES.items():
        (source / key).parent.mkdir(parents=True, exist_ok=True)
        (source / key).write_bytes(data)

    def freeze_for_five_seconds():
        s3.freeze()
        threading.Timer(5.0, s3.thaw).start()

    forget, sent = on_request("PutObject", 2, freeze_for_five_seconds)
    try:
        storage.upload_dir(source, f"s3://{BUCKET}/uploads/ingest", settings=SETTINGS)
    finally:
        forget()
    copied = storage.list_prefix(f"s3://{BUCKET}/uploads/ingest", settings=SETTINGS)
    assert len(copied) == len(FILES)
    for key, data in FILES.items():
        assert storage.read_bytes(f"s3://{BUCKET}/uploads/ingest/{key}") == data, key
    assert len(sent) > len(FILES)  # the frozen request timed out and was sent again


def test_an_endpoint_that_stays_down_fails_in_one_line_and_leaves_the_old_copy(s3, tmp_path):
    target = tmp_path / "ingest"
    target.mkdir()
    (target / "_stage.json").write_text("the previous complete download")
    settings = StorageSettings(
        request_attempts=2, retry_budget_s=3.0, first_delay_s=0.2, max_delay_s=0.5
    )
    forget, _ = on_request("GetObject", 2, s3.kill, settings)
    try:
        with pytest.raises(EndpointUnreachable) as caught:
            storage.download_dir(f"s3://{BUCKET}/runs/ingest", target, settings=settings)
    finally:
        forget()
    message = str(caught.value)
    assert "\n" not in message and "gave up after" in message and f"'{BUCKET}'" in message
    assert local_files(target) == {"_stage.json": b"the previous complete download"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ingest"]
