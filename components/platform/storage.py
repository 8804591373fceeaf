"""Storage service: local paths and ``s3://bucket/key`` URIs read and written the same way.

Writes are atomic (local: temporary file in the same folder, then ``os.replace``; S3: one
PUT, or a multipart upload that becomes visible only when completed), folder downloads land
in a temporary folder renamed into place. The S3 client honours ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` (MinIO, moto) unless ``StorageSettings.endpoint_url`` is given.

Transient failures are retried twice over: botocore's own retries ("standard" mode:
throttling such as 503 SlowDown, 500/502/503/504, connection errors) per request, and a
bounded exponential back-off around the whole operation for what outlasts them (an endpoint
restarting refuses connections for seconds). Then, and for every permanent failure, a
one-line ``StorageError`` subclass names the bucket and key. Secrets are never logged.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import boto3
import botocore.exceptions as boto_errors
import pyarrow.fs
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from sista_core.datasets.paths import PathOutsideRoot, inside

log = logging.getLogger(__name__)
T = TypeVar("T")
S3_SCHEME = "s3://"
_COPY_CHUNK = 8 << 20


class StorageError(Exception):
    """A storage operation failed; the message is one line naming the location."""


class InvalidURI(StorageError, ValueError):
    """Not a usable ``s3://bucket/key`` URI."""


class BucketNotFound(StorageError):
    """The S3 bucket does not exist."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """No object at this key (or no file at this local path)."""


class CredentialsError(StorageError):
    """No credentials were found, or S3 rejected them (unknown key id, wrong secret)."""


class PermissionDenied(StorageError, PermissionError):
    """The credentials are valid but may not do this (403 AccessDenied)."""


class EndpointUnreachable(StorageError, ConnectionError):
    """The S3 endpoint could not be reached within the retry budget."""


class UnsafeObjectKey(StorageError, ValueError):
    """An object key that would be written outside the folder it is copied into."""


class ServiceUnavailable(StorageError):
    """S3 kept throttling (SlowDown) or failing (5xx) for the whole retry budget."""


@dataclass(frozen=True)
class StorageSettings:
    """How to reach S3 and how hard to retry. ``endpoint_url`` None: the environment's
    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else AWS itself."""

    endpoint_url: str | None = None
    region: str | None = None
    request_attempts: int = 5  # botocore attempts per HTTP request ("standard" mode)
    retry_mode: str = "standard"  # or "adaptive" (client-side rate limiting)
    retry_budget_s: float = 60.0  # whole-operation retries stop once this has elapsed
    first_delay_s: float = 0.5  # whole-operation back-off: doubles, jittered, capped
    max_delay_s: float = 8.0
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    multipart_threshold: int = 64 << 20  # larger writes use a multipart upload
    multipart_chunk: int = 16 << 20


DEFAULT_SETTINGS = StorageSettings()
_RETRIED_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    "500",
    "502",
    "503",
    "504",
}
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
}


# ---- URIs -------------------------------------------------------------------------------


def is_s3(uri: str | os.PathLike) -> bool:
    """True for ``s3://bucket/key`` URIs; anything else is a local path."""
    return str(uri).startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3(uri):
        raise InvalidURI(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise InvalidURI(f"no bucket in {uri!r}")
    return bucket, key


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Append path parts to a local path or an S3 URI (``/`` separated either way)."""
    if not is_s3(uri):
        return str(Path(uri, *parts))
    pieces = [str(uri).rstrip("/")] + [p.strip("/") for p in parts if p.strip("/")]
    return "/".join(pieces)


def replace_dir(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``, replacing it; the old copy goes only after the swap."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(source, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- S3 client, error mapping and retries -----------------------------------------------


def resolved_endpoint(settings: StorageSettings = DEFAULT_SETTINGS) -> str | None:
    """The endpoint a client will use: the settings', else the environment's, else AWS."""
    return (
        settings.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or None
    )


def s3_client(settings: StorageSettings = DEFAULT_SETTINGS):
    """A boto3 S3 client for these settings and the current environment (cached: creating
    one costs ~50 ms; a change of endpoint, region, key id or profile makes a new one)."""
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    return _cached_client(
        settings,
        resolved_endpoint(settings),
        settings.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        os.environ.get("AWS_ACCESS_KEY_ID"),
        hashlib.sha256(secret.encode()).hexdigest(),  # a new secret, a new client
        os.environ.get("AWS_PROFILE"),
    )


@functools.lru_cache(maxsize=8)
def _cached_client(settings, endpoint, region, _key_id, _secret_digest, _profile):
    config = Config(
        retries={"mode": settings.retry_mode, "total_max_attempts": settings.request_attempts},
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        # MinIO and moto serve buckets as paths, not as virtual hosts.
        s3={"addressing_style": "path" if endpoint else "auto"},
    )
    session = boto3.session.Session()
    return session.client(
        "s3", endpoint_url=endpoint, region_name=region or "us-east-1", config=config
    )


def arrow_filesystem(settings: StorageSettings = DEFAULT_SETTINGS) -> pyarrow.fs.S3FileSystem:
    """A pyarrow S3 filesystem on the same endpoint and region as :func:`s3_client` (what
    Ray Train and Tune write checkpoints through). Credentials are not baked in: each process
    that unpickles it finds them in its own environment, as boto3 does."""
    endpoint = resolved_endpoint(settings)
    options = {}
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        options = {"endpoint_override": parts.netloc, "scheme": parts.scheme}
    region = settings.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return pyarrow.fs.S3FileSystem(
        region=region or "us-east-1",
        connect_timeout=settings.connect_timeout_s,
        request_timeout=settings.read_timeout_s,
        retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(settings.request_attempts),
        **options,
    )


def _printable_endpoint(client) -> str:
    """The client's endpoint without any user:password part."""
    parts = urlsplit(client.meta.endpoint_url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def _underlying(error: BaseException) -> BaseException:
    """The botocore error inside boto3's transfer wrappers."""
    if isinstance(error, RetriesExceededError) and error.last_exception is not None:
        return error.last_exception
    if isinstance(error, S3UploadFailedError) and error.__context__ is not None:
        return error.__context__
    return error


def _error_code(error: BaseException) -> str:
    if isinstance(error, boto_errors.ClientError):
        return str(error.response.get("Error", {}).get("Code", ""))
    return ""


def _is_transient(error: BaseException) -> bool:
    error = _underlying(error)
    if isinstance(error, boto_errors.ClientError):
        return _error_code(error) in _RETRIED_CODES
    return isinstance(
        error,
        boto_errors.ConnectionError | boto_errors.HTTPClientError | boto_errors.IncompleteReadError,
    ) and not isinstance(error, boto_errors.SSLError)


def _storage_error(error: BaseException, operation: str, uri: str, client) -> StorageError:
    """Map a boto3/botocore failure to a one-line StorageError naming bucket and key."""
    error = _underlying(error)
    bucket, key = split_s3(uri)
    endpoint = _printable_endpoint(client)
    where = f"{operation} {uri} (bucket {bucket!r}, key {key!r}; endpoint {endpoint})"
    code = _error_code(error)
    if isinstance(error, boto_errors.NoCredentialsError | boto_errors.PartialCredentialsError):
        return CredentialsError(
            f"no AWS credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE, or run with an instance/service-account role"
        )
    if isinstance(error, boto_errors.CredentialRetrievalError):
        return CredentialsError(f"could not load AWS credentials for {where}")
    if code in _CREDENTIAL_CODES:
        return CredentialsError(
            f"S3 rejected the credentials ({code}) for {where}: "
            "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
        )
    if code in {"AccessDenied", "AllAccessDisabled"}:
        return PermissionDenied(f"access denied ({code}) for {where}")
    if code == "403":  # a HEAD answer has no body to say more
        return PermissionDenied(f"forbidden (403) for {where}: invalid or insufficient credentials")
    if code == "NoSuchBucket":
        return BucketNotFound(f"bucket {bucket!r} does not exist: {where}")
    if code in {"NoSuchKey", "404", "NotFound"}:
        return ObjectNotFound(f"no object at {uri}: {where}")
    if isinstance(error, boto_errors.SSLError):
        return EndpointUnreachable(f"TLS failure for {where}: {error}")
    if isinstance(error, boto_errors.ConnectionError | boto_errors.HTTPClientError):
        return EndpointUnreachable(
            f"S3 endpoint unreachable for {where} ({type(error).__name__}); "
            "check AWS_ENDPOINT_URL_S3 / endpoint_url and the network"
        )
    if code in _RETRIED_CODES:
        return ServiceUnavailable(f"S3 kept answering {code} for {where}")
    return StorageError(f"{operation} {uri} failed ({code or type(error).__name__}): {where}")


def _with_retries(
    operation: str, uri: str, settings: StorageSettings, call: Callable[[object], T]
) -> T:
    """Run ``call(client)``, retrying transient failures with jittered exponential back-off
    until ``settings.retry_budget_s`` has elapsed; raise a StorageError otherwise."""
    client = s3_client(settings)
    started, attempt = time.monotonic(), 0
    while True:
        try:
            return call(client)
        except (boto_errors.BotoCoreError, boto_errors.ClientError, S3UploadFailedError) as error:
            attempt += 1
            failure = _storage_error(error, operation, uri, client)
            delay = min(settings.max_delay_s, settings.first_delay_s * 2 ** (attempt - 1))
            delay *= random.uniform(0.5, 1.0)
            elapsed = time.monotonic() - started
            if not _is_transient(error) or elapsed + delay > settings.retry_budget_s:
                if _is_transient(error):
                    failure.args = (
                        f"{failure.args[0]}; gave up after {attempt} attempts in {elapsed:.1f} s",
                    )
                raise failure from error
            log.warning(
                "%s %s: %s, retrying in %.1f s (attempt %d)",
                operation,
                uri,
                type(_underlying(error)).__name__,
                delay,
                attempt,
            )
            time.sleep(delay)


# ---- the operations ---------------------------------------------------------------------


def check_access(uri: str | os.PathLike, *, settings: StorageSettings = DEFAULT_SETTINGS) -> None:
    """Fail now, in one line, when ``uri``'s bucket is missing or unreachable or the
    credentials are absent or rejected (a local path always passes): run before any work."""
    if not is_s3(uri):
        return
    uri = str(uri)
    bucket, key = split_s3(uri)
    prefix = key.rstrip("/") + "/" if key.rstrip("/") else ""
    _with_retries(
        "access",
        uri,
        settings,
        lambda client: client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1),
    )


def delete(uri: str | os.PathLike, *, settings: StorageSettings = DEFAULT_SETTINGS) -> None:
    """Remove one file or object (nothing to remove is not an error)."""
    if not is_s3(uri):
        Path(uri).unlink(missing_ok=True)
        return
    uri = str(uri)
    bucket, key = split_s3(uri)
    _with_retries("delete", uri, settings, lambda c: c.delete_object(Bucket=bucket, Key=key))


def read_bytes(uri: str | os.PathLike, *, settings: StorageSettings = DEFAULT_SETTINGS) -> bytes:
    """The whole content of a local file or S3 object."""
    if not is_s3(uri):
        try:
            return Path(uri).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"no file at {uri}") from None
    uri = str(uri)
    bucket, key = split_s3(uri)
    return _with_retries(
        "read",
        uri,
        settings,
        lambda client: client.get_object(Bucket=bucket, Key=key)["Body"].read(),
    )


def write_bytes(
    uri: str | os.PathLike, data: bytes, *, settings: StorageSettings = DEFAULT_SETTINGS
) -> None:
    """Write ``data`` atomically: a reader sees the old content or the new, never a part."""
    if not is_s3(uri):
        _write_local_atomically(Path(uri), data)
        return
    uri = str(uri)
    bucket, key = split_s3(uri)
    if len(data) < settings.multipart_threshold:
        _with_retries(
            "write",
            uri,
            settings,
            lambda client: client.put_object(Bucket=bucket, Key=key, Body=data),
        )
        return
    transfer = TransferConfig(
        multipart_threshold=settings.multipart_threshold,
        multipart_chunksize=settings.multipart_chunk,
    )
    _with_retries(
        "write",
        uri,
        settings,
        lambda client: client.upload_fileobj(io.BytesIO(data), bucket, key, Config=transfer),
    )


def _write_local_atomically(path: Path, data: bytes) -> None:
    """Temp file in the target's folder, fsync, then ``os.replace``; removed on failure.
    Created with mode 0o666 minus the umask, like any new file (not mkstemp's 0o600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def exists(uri: str | os.PathLike, *, settings: StorageSettings = DEFAULT_SETTINGS) -> bool:
    """True when a file/object or a folder/prefix with objects is there. A missing bucket
    is an error (BucketNotFound), not False: it is almost always a typo."""
    if not is_s3(uri):
        return Path(uri).exists()
    uri = str(uri)
    bucket, key = split_s3(uri)
    try:
        if key:
            _with_retries("exists", uri, settings, lambda c: c.head_object(Bucket=bucket, Key=key))
            return True
    except ObjectNotFound:
        pass
    prefix = key.rstrip("/") + "/" if key else ""
    listed = _with_retries(
        "exists",
        uri,
        settings,
        lambda c: c.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1),
    )
    return listed.get("KeyCount", 0) > 0


def list_prefix(
    uri: str | os.PathLike, *, settings: StorageSettings = DEFAULT_SETTINGS
) -> list[str]:
    """Every file below a folder / every object below a prefix (taken as a folder:
    ``s3://b/run1`` lists ``run1/...``, not ``run10/...``), as sorted full URIs or paths."""
    if not is_s3(uri):
        root = Path(uri)
        return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    return sorted(_list_objects(str(uri), settings))


def object_versions(
    uri: str | os.PathLike, *, settings: StorageSettings = DEFAULT_SETTINGS
) -> dict[str, str]:
    """Every object below an S3 prefix with its ETag (which changes with its content);
    for a local folder, every file with its size and modification time."""
    if not is_s3(uri):
        return {
            path: f"{os.stat(path).st_size}:{os.stat(path).st_mtime_ns}"
            for path in list_prefix(uri)
        }
    return _list_objects(str(uri), settings)


def _list_objects(uri: str, settings: StorageSettings) -> dict[str, str]:
    bucket, key = split_s3(uri)
    prefix = key.rstrip("/") + "/" if key.rstrip("/") else ""

    def list_all(client) -> dict[str, str]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return {
            f"{S3_SCHEME}{bucket}/{item['Key']}": item["ETag"]
            for page in pages
            for item in page.get("Contents", [])
            if not item["Key"].endswith("/")  # a folder marker (pyarrow writes them), not a file
        }

    return _with_retries("list", uri, settings, list_all)


def upload_dir(
    local: str | os.PathLike,
    uri: str | os.PathLike,
    *,
    settings: StorageSettings = DEFAULT_SETTINGS,
) -> list[str]:
    """Copy every file below the local folder to ``uri`` (S3 prefix or local folder); returns
    the written URIs. On S3, objects appear one by one: write a manifest last if readers
    need to know the set is complete."""
    local = Path(local)
    if not local.is_dir():
        raise ObjectNotFound(f"no local folder {local} to upload")
    return _copy_tree(str(local), str(uri), settings)


def download_dir(
    uri: str | os.PathLike,
    local: str | os.PathLike,
    *,
    settings: StorageSettings = DEFAULT_SETTINGS,
) -> list[str]:
    """Copy every object below ``uri`` into the local folder, atomically: files land in a
    temporary folder beside it, renamed into place (replacing any old copy) at the end."""
    return _copy_tree(str(uri), str(local), settings)


def _contained(staging: Path, name: str, key: str, target: str) -> Path:
    """Where object ``key`` lands below ``staging``; a key with ``..``, an empty segment or
    an absolute part would land outside: refused before anything is written."""
    try:
        return inside(staging, name.replace(os.sep, "/"))
    except PathOutsideRoot as error:
        raise UnsafeObjectKey(f"object {key} would be written outside {target}: {error}") from None


def _copy_tree(source: str, target: str, settings: StorageSettings) -> list[str]:
    sources = list_prefix(source, settings=settings)
    if not sources:
        raise ObjectNotFound(f"nothing to copy below {source}")
    root = source.rstrip("/") + "/"
    relative = [s[len(root) :] if is_s3(source) else os.path.relpath(s, source) for s in sources]
    if is_s3(target):
        for path, name in zip(sources, relative, strict=True):
            _copy_file(path, join(target, name.replace(os.sep, "/")), settings)
        return [join(target, name) for name in relative]
    final = Path(target)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()  # umask-default mode, unlike mkdtemp's 0o700: it becomes ``final``
    try:
        for path, name in zip(sources, relative, strict=True):
            _copy_file(path, str(_contained(staging, name, path, target)), settings)
        replace_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [str(final / name) for name in relative]


def copy_file(
    source: str | os.PathLike,
    target: str | os.PathLike,
    *,
    settings: StorageSettings = DEFAULT_SETTINGS,
) -> None:
    """Copy one file between local paths and S3 objects, in any direction (streamed)."""
    _copy_file(str(source), str(target), settings)


def _copy_file(source: str, target: str, settings: StorageSettings) -> None:
    """One file between any two of: local path, S3 object (streamed, not held in memory)."""
    if is_s3(source) and not is_s3(target):
        bucket, key = split_s3(source)
        Path(target).parent.mkdir(parents=True, exist_ok=True)

        def download(client) -> None:
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
            with open(target, "wb") as handle:  # restarted from scratch on a retry
                shutil.copyfileobj(body, handle, _COPY_CHUNK)

        _with_retries("download", source, settings, download)
    elif not is_s3(source) and is_s3(target):
        bucket, key = split_s3(target)
        transfer = TransferConfig(
            multipart_threshold=settings.multipart_threshold,
            multipart_chunksize=settings.multipart_chunk,
        )
        _with_retries(
            "upload",
            target,
            settings,
            lambda client: client.upload_file(source, bucket, key, Config=transfer),
        )
    elif is_s3(source):
        write_bytes(target, read_bytes(source, settings=settings), settings=settings)
    else:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
