"""Storage service against moto's real S3 server on 127.0.0.1 (no other address is used)."""

import json
import logging
import os
import stat
import threading
import time

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from moto.core.authorization import enable_iam_authentication
from moto.server import ThreadedMotoServer
from s3_helpers import SECRET, set_aws_variables, start_moto

from components.platform import storage
from components.platform.storage import (
    BucketNotFound,
    CredentialsError,
    EndpointUnreachable,
    ObjectNotFound,
    PermissionDenied,
    ServiceUnavailable,
    StorageSettings,
)

BUCKET = "sista-data"
# Short back-off so the retry tests stay within seconds.
FAST = StorageSettings(
    request_attempts=2, retry_budget_s=10.0, first_delay_s=0.2, max_delay_s=1.0, connect_timeout_s=1
)


class LocalS3:
    """moto's threaded server on 127.0.0.1 that can go down and come back on the same port
    (the first start binds a port of its own choice)."""

    def __init__(self) -> None:
        self.port = 0
        self.server: ThreadedMotoServer | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server, self.port = start_moto(self.port)

    def stop(self) -> None:
        """Down for real: stop serving and close the listening socket (connections refused)."""
        self.server.stop()
        self.server._server.server_close()  # ThreadedMotoServer.stop leaves the socket open
        self.server = None

    def ensure_up(self) -> None:
        if self.server is None:
            self.start()


@pytest.fixture(scope="module")
def local_s3():
    server = LocalS3()
    server.start()
    yield server
    if server.server is not None:
        server.stop()


@pytest.fixture(autouse=True)
def fake_aws(local_s3, monkeypatch, tmp_path):
    """Fake credentials, the local endpoint, and nothing that could reach another address."""
    local_s3.ensure_up()
    set_aws_variables(monkeypatch, local_s3.endpoint, tmp_path)
    client = storage.s3_client()
    if BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=BUCKET)


# ---- round trips ------------------------------------------------------------------------


def test_uri_helpers():
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/k")
    assert storage.join("s3://b/runs/", "/one/", "model.bin") == "s3://b/runs/one/model.bin"
    assert storage.join("s3://b", "k") == "s3://b/k"
    assert storage.join("/data", "a", "b.txt") == "/data/a/b.txt"
    assert storage.split_s3("s3://b/a/b") == ("b", "a/b")
    with pytest.raises(storage.InvalidURI):
        storage.split_s3("s3:///key")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_write_read_exists_list_round_trip(where, tmp_path):
    root = str(tmp_path / "out") if where == "local" else f"s3://{BUCKET}/round-trip"
    storage.write_bytes(storage.join(root, "run1", "a.bin"), b"\x00alpha")
    storage.write_bytes(storage.join(root, "run1", "sub", "b.txt"), b"beta")
    storage.write_bytes(storage.join(root, "run10", "c.txt"), b"gamma")
    assert storage.read_bytes(storage.join(root, "run1", "a.bin")) == b"\x00alpha"
    storage.write_bytes(storage.join(root, "run1", "a.bin"), b"replaced")
    assert storage.read_bytes(storage.join(root, "run1", "a.bin")) == b"replaced"
    assert storage.exists(storage.join(root, "run1", "sub", "b.txt"))
    assert storage.exists(storage.join(root, "run1"))  # a folder / prefix with objects
    assert not storage.exists(storage.join(root, "run2"))
    # A prefix is a folder: run1 does not list run10.
    assert storage.list_prefix(storage.join(root, "run1")) == [
        storage.join(root, "run1", "a.bin"),
        storage.join(root, "run1", "sub", "b.txt"),
    ]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_upload_dir_then_download_dir_gives_back_the_same_files(where, tmp_path):
    source = tmp_path / "checkpoint"
    (source / "tokenizer").mkdir(parents=True)
    (source / "model.safetensors").write_bytes(bytes(range(256)) * 100)
    (source / "tokenizer" / "vocab.txt").write_text("[CLS]\n[SEP]\n")
    remote = str(tmp_path / "remote") if where == "local" else f"s3://{BUCKET}/ckpt-{where}"
    storage.upload_dir(source, remote)
    target = tmp_path / "restored"
    target.mkdir()
    (target / "stale.txt").write_text("from an older download")
    storage.download_dir(remote, target)
    restored = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert restored == ["model.safetensors", "tokenizer/vocab.txt"]
    assert (target / "model.safetensors").read_bytes() == bytes(range(256)) * 100
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".restored")]  # no leftovers


def test_large_write_goes_multipart_and_reads_back(local_s3):
    settings = StorageSettings(multipart_threshold=5 << 20, multipart_chunk=5 << 20)
    data = bytes(range(251)) * (11 * (1 << 20) // 251)  # ~11 MiB: 3 parts
    uri = f"s3://{BUCKET}/large.bin"
    storage.write_bytes(uri, data, settings=settings)
    assert storage.read_bytes(uri) == data
    etag = storage.s3_client().head_object(Bucket=BUCKET, Key="large.bin")["ETag"]
    assert etag.strip('"').endswith("-3")  # the ETag of a 3-part multipart upload


# ---- atomicity --------------------------------------------------------------------------


def test_local_writes_get_the_usual_permissions_not_temp_file_ones(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    storage.write_bytes(tmp_path / "table.parquet", b"rows")
    storage.upload_dir(tmp_path, tmp_path.parent / f"{tmp_path.name}-copy")
    assert stat.S_IMODE((tmp_path / "table.parquet").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path.parent / f"{tmp_path.name}-copy").stat().st_mode) == (
        0o777 & ~umask
    )


def test_failed_local_write_leaves_old_content_and_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "stats.json"
    storage.write_bytes(target, b'{"old": true}')

    def disk_full(_fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "fsync", disk_full)  # fails after the bytes were written
    with pytest.raises(OSError, match="No space"):
        storage.write_bytes(target, b'{"new": true, "much": "longer content"}')
    assert target.read_bytes() == b'{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]


def test_failed_download_dir_leaves_old_folder_untouched(tmp_path, monkeypatch):
    remote = f"s3://{BUCKET}/atomic-dir"
    for name in ("a.txt", "b.txt", "c.txt"):
        storage.write_bytes(storage.join(remote, name), name.encode())
    target = tmp_path / "local"
    target.mkdir()
    (target / "old.txt").write_text("previous download")
    real_copy, copied = storage._copy_file, []

    def fail_on_second(source, destination, settings):
        if copied:
            raise ConnectionResetError("network dropped mid-download")
        real_copy(source, destination, settings)
        copied.append(source)

    monkeypatch.setattr(storage, "_copy_file", fail_on_second)
    with pytest.raises(ConnectionResetError):
        storage.download_dir(remote, target)
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["local"]


@pytest.mark.parametrize("key", ["data/../../escaped.txt", "data//abs/escaped.txt"])
def test_an_object_key_that_leaves_the_folder_is_refused_before_any_write(tmp_path, key):
    remote = f"s3://{BUCKET}/unsafe-{abs(hash(key))}"
    storage.write_bytes(f"{remote}/good.txt", b"fine")
    storage.write_bytes(f"{remote}/{key}", b"malicious")
    target = tmp_path / "box" / "copy"
    with pytest.raises(storage.UnsafeObjectKey, match="would be written outside"):
        storage.download_dir(remote, target)
    assert not list(tmp_path.rglob("escaped.txt")) and not target.exists()
    assert [p.name for p in (tmp_path / "box").iterdir()] == []  # no staging folder left


# ---- clear errors -----------------------------------------------------------------------


def test_missing_bucket_is_named():
    uri = "s3://no-such-bucket/reports/table.parquet"
    for operation in (
        lambda: storage.read_bytes(uri),
        lambda: storage.write_bytes(uri, b"x"),
        lambda: storage.exists(uri),
        lambda: storage.list_prefix("s3://no-such-bucket/reports"),
    ):
        with pytest.raises(BucketNotFound, match="'no-such-bucket'") as caught:
            operation()
        assert "\n" not in str(caught.value)


def test_missing_key_is_named_and_is_a_file_not_found(tmp_path):
    with pytest.raises(ObjectNotFound, match=r"key 'missing/model\.bin'") as caught:
        storage.read_bytes(f"s3://{BUCKET}/missing/model.bin")
    assert isinstance(caught.value, FileNotFoundError)
    assert f"bucket '{BUCKET}'" in str(caught.value)
    assert not storage.exists(f"s3://{BUCKET}/missing/model.bin")
    with pytest.raises(ObjectNotFound, match="nothing to copy"):
        storage.download_dir(f"s3://{BUCKET}/missing", tmp_path / "x")
    with pytest.raises(ObjectNotFound, match="no file"):
        storage.read_bytes(tmp_path / "absent.bin")


def test_no_credentials_at_all_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(CredentialsError, match="no AWS credentials .*bucket 'sista-data'"):
        storage.read_bytes(f"s3://{BUCKET}/anything")


@pytest.fixture
def iam_user_keys(local_s3):
    """Two users in moto's IAM: one allowed everything on S3, one allowed nothing."""
    iam = boto3.client("iam", endpoint_url=local_s3.endpoint, region_name="us-east-1")
    suffix = str(time.monotonic_ns())
    keys = {}
    for role, actions in (("allowed", ["s3:*"]), ("denied", ["sqs:ListQueues"])):
        user = f"{role}-{suffix}"
        iam.create_user(UserName=user)
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
        }
        iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps(policy))
        keys[role] = iam.create_access_key(UserName=user)["AccessKey"]
    return keys


def test_invalid_credentials_are_clear_errors_when_the_server_checks_them(
    iam_user_keys, monkeypatch
):
    # moto accepts any credentials unless IAM authentication is on; turn it on.
    uri = f"s3://{BUCKET}/authenticated.txt"
    with enable_iam_authentication():
        allowed = iam_user_keys["allowed"]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", allowed["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", allowed["SecretAccessKey"])
        storage.write_bytes(uri, b"ok")
        assert storage.read_bytes(uri) == b"ok"

        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # right key id, wrong secret
        with pytest.raises(CredentialsError, match="SignatureDoesNotMatch") as caught:
            storage.read_bytes(uri)
        assert SECRET not in str(caught.value)

        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNUNKNOWN00")
        with pytest.raises(CredentialsError, match="InvalidAccessKeyId.*authenticated.txt"):
            storage.read_bytes(uri)

        denied = iam_user_keys["denied"]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", denied["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", denied["SecretAccessKey"])
        with pytest.raises(PermissionDenied, match="AccessDenied"):
            storage.read_bytes(uri)


# ---- retries ----------------------------------------------------------------------------


def test_read_survives_the_endpoint_restarting(local_s3, caplog):
    uri = f"s3://{BUCKET}/survives-restart.txt"
    storage.write_bytes(uri, b"still here")
    local_s3.stop()
    result: dict = {}

    def read_while_down():
        try:
            result["data"] = storage.read_bytes(uri, settings=FAST)
        except Exception as error:  # reported by the assertion below
            result["error"] = error

    reader = threading.Thread(target=read_while_down)
    with caplog.at_level(logging.WARNING, logger="components.platform.storage"):
        reader.start()
        # Started again only once a refused attempt is seen: on a busy machine the reader's
        # first request can come later than any fixed delay.
        deadline = time.monotonic() + 10
        while "retrying" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        local_s3.start()
        reader.join(timeout=15)
    assert result == {"data": b"still here"}
    assert "retrying" in caplog.text and SECRET not in caplog.text


def test_endpoint_down_longer_than_the_budget_is_a_clear_error(local_s3, caplog):
    local_s3.stop()
    settings = StorageSettings(
        request_attempts=2, retry_budget_s=1.5, first_delay_s=0.2, max_delay_s=0.5
    )
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="components.platform.storage"):
        with pytest.raises(EndpointUnreachable) as caught:
            storage.read_bytes(f"s3://{BUCKET}/k.txt", settings=settings)
    message = str(caught.value)
    assert f"127.0.0.1:{local_s3.port}" in message and f"bucket '{BUCKET}'" in message
    assert "gave up after" in message and "\n" not in message
    assert time.monotonic() - started < 8
    assert SECRET not in message + caplog.text


class SlowDown:
    """Answers the first ``times`` S3 requests with 503 SlowDown before they are sent, through
    botocore's event hook, so botocore's own retry logic sees a real throttling response."""

    body = (
        b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
    )

    def __init__(self, times: int) -> None:
        self.times, self.sent = times, 0

    def __call__(self, request, **_) -> AWSResponse | None:
        self.sent += 1
        if self.sent > self.times:
            return None  # really sent to moto

        class Raw:
            def stream(self, **_):
                yield SlowDown.body

        return AWSResponse(request.url, 503, {}, Raw())


@pytest.mark.parametrize("throttled_times, succeeds", [(3, True), (1000, False)])
def test_throttling_is_retried_then_reported(throttled_times, succeeds):
    uri = f"s3://{BUCKET}/throttled.txt"
    storage.write_bytes(uri, b"eventually")
    settings = StorageSettings(
        request_attempts=2, retry_budget_s=2.0, first_delay_s=0.1, max_delay_s=0.2
    )
    client = storage.s3_client(settings)
    throttle = SlowDown(throttled_times)
    client.meta.events.register_first("before-send.s3.GetObject", throttle)
    try:
        if succeeds:
            assert storage.read_bytes(uri, settings=settings) == b"eventually"
            assert throttle.sent == 4  # 2 botocore attempts, then our retry: 2 more
        else:
            with pytest.raises(ServiceUnavailable, match="SlowDown .*throttled.txt"):
                storage.read_bytes(uri, settings=settings)
    finally:
        client.meta.events.unregister("before-send.s3.GetObject", throttle)
