"""s3:// objects behind the storage API (boto3): listing, reads, writes, conditional writes.

Settings, the client and the error mapping live in ``s3_config.py`` and are
re-exported here (``s3.get_client()``, ``s3.map_error``, ``s3.S3Config``, ...).

Consistency: a PUT (single request or completed multipart upload) is atomic per
object: readers see the old object or the new one, never a mix. There is no atomic
multi-object commit; callers that publish several objects together upload the parts
first and write a manifest or marker object last (e.g. ``indexes/NAME/LATEST``).
"""

from __future__ import annotations

import functools
import io
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import botocore.exceptions
from boto3.s3.transfer import create_transfer_manager
from s3transfer.exceptions import RetriesExceededError

from ..errors import ObjectNotFoundError, PreconditionFailedError, StorageError
from .s3_config import (
    AccessDeniedError,
    BucketNotFoundError,
    CredentialsError,
    EndpointUnreachableError,
    MiB,
    ObjectChangedError,
    S3Config,
    S3ServiceError,
    _call,
    _endpoint,
    _is_404,
    _not_found,
    _one_line,
    _transfer_config,
    active_config,
    beam_s3_options,
    configure_s3,
    get_client,
    map_error,
    split_uri,
)

logger = logging.getLogger(__name__)

_READ_CHUNK_BYTES = 1 * MiB


# --------------------------------------------------------------------------- operations

ObjectTuple = tuple[str, int, float, str]  # uri, size, mtime (epoch s), etag without quotes


def _etag(raw: str | None) -> str:
    return (raw or "").strip('"')


def _dir_key(key: str) -> str:
    return key if not key or key.endswith("/") else key + "/"


def list_keys(prefix_uri: str) -> Iterator[ObjectTuple]:
    """Every object under ``prefix_uri`` (treated as a directory: ``s3://b/dir`` lists
    ``dir/...``), in the store's key order (S3 returns keys in UTF-8 byte order).
    Zero-byte ``.../`` folder markers are skipped. Raises ObjectNotFoundError when
    nothing at all lies under the prefix, as for a missing local directory."""
    bucket, key = split_uri(prefix_uri)
    prefix = _dir_key(key)
    config = active_config()
    client = get_client()
    token: str | None = None
    seen_any = False
    while True:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": config.list_page_size}
        if token:
            kwargs["ContinuationToken"] = token
        page = _call(prefix_uri, "list", functools.partial(client.list_objects_v2, **kwargs))
        for obj in page.get("Contents", ()):
            seen_any = True
            if obj["Key"].endswith("/"):
                continue
            yield (
                f"s3://{bucket}/{obj['Key']}",
                int(obj["Size"]),
                obj["LastModified"].timestamp(),
                _etag(obj.get("ETag")),
            )
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            break
    if not seen_any:
        raise ObjectNotFoundError(f"nothing under {prefix_uri!r}")


def stat(uri: str) -> ObjectTuple:
    bucket, key = split_uri(uri)
    try:
        head = get_client().head_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as err:
        if _is_404(err):
            raise _not_found(bucket, uri) from err
        raise map_error(err, uri, "stat") from err
    except botocore.exceptions.BotoCoreError as err:
        raise map_error(err, uri, "stat") from err
    return uri, int(head["ContentLength"]), head["LastModified"].timestamp(), _etag(head.get("ETag"))


def exists(uri: str) -> bool:
    """True for an object, or for a "directory" prefix with objects under it.
    A missing bucket raises BucketNotFoundError rather than answering False."""
    bucket, key = split_uri(uri)
    client = get_client()
    if not key:
        try:
            client.head_bucket(Bucket=bucket)
            return True
        except botocore.exceptions.ClientError as err:
            if _is_404(err) or err.response.get("Error", {}).get("Code") == "NoSuchBucket":
                return False
            raise map_error(err, uri, "check") from err
        except botocore.exceptions.BotoCoreError as err:
            raise map_error(err, uri, "check") from err
    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except botocore.exceptions.ClientError as err:
        if not _is_404(err):
            raise map_error(err, uri, "check") from err
    except botocore.exceptions.BotoCoreError as err:
        raise map_error(err, uri, "check") from err
    page = _call(uri, "check", lambda: client.list_objects_v2(Bucket=bucket, Prefix=_dir_key(key), MaxKeys=1))
    return bool(page.get("KeyCount") or page.get("Contents"))


def delete(uri: str) -> None:
    """Delete one object; a missing key is not an error (as on S3 itself)."""
    bucket, key = split_uri(uri)
    client = get_client()
    _call(uri, "delete", lambda: client.delete_object(Bucket=bucket, Key=key))


def write_bytes(uri: str, data: bytes) -> None:
    """One PUT for small payloads, a managed multipart upload above the threshold."""
    bucket, key = split_uri(uri)
    config = active_config()
    client = get_client()
    if len(data) < config.multipart_threshold_bytes:
        _call(uri, "write", lambda: client.put_object(Bucket=bucket, Key=key, Body=data))
        return
    _transfer(uri, "write", lambda manager: manager.upload(io.BytesIO(data), bucket, key))


def put_file(local: str, uri: str) -> None:
    """Upload a local file (multipart above the threshold, parts in parallel)."""
    if not os.path.isfile(local):
        raise ObjectNotFoundError(f"{local!r} does not exist (upload to {uri})")
    bucket, key = split_uri(uri)
    size = os.path.getsize(local)
    started = time.monotonic()
    _transfer(uri, "upload", lambda manager: manager.upload(local, bucket, key))
    elapsed = time.monotonic() - started
    logger.debug("uploaded %s to %s: %d bytes in %.2f s", local, uri, size, elapsed)


def download_file(uri: str, dest: str) -> None:
    """Stream an object into ``dest`` (ranged parts in parallel above the threshold)."""
    bucket, key = split_uri(uri)
    try:
        _transfer(uri, "download", lambda manager: manager.download(bucket, key, dest))
    except ObjectNotFoundError as err:
        raise _not_found(bucket, uri) from err


def _transfer(uri: str, action: str, submit: Callable[[Any], Any]) -> None:
    config = active_config()
    try:
        with create_transfer_manager(get_client(), _transfer_config(config)) as manager:
            submit(manager).result()
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
        raise map_error(err, uri, action) from err
    except RetriesExceededError as err:  # a download that kept breaking off midway
        cause = err.last_exception
        raise StorageError(
            f"failed to {action} {uri}: the transfer broke off {config.max_attempts} times "
            f"({type(cause).__name__}) at {_endpoint()}"
        ) from err
    except OSError as err:
        raise StorageError(f"failed to {action} {uri}: {_one_line(str(err))}") from err


# --------------------------------------------------------------------------- conditional writes
# Versions are ETags without quotes. Every conditional PUT is read back (HEAD) and its
# ETag compared, so on a store that ignores the conditional headers at most one of two
# racing writers of different content is told that it won.

_CONFLICT_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


def _code(err: botocore.exceptions.ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def read_versioned(uri: str) -> tuple[bytes, str]:
    """The object's bytes and ETag, read in one GET."""
    bucket, key = split_uri(uri)
    try:
        response = get_client().get_object(Bucket=bucket, Key=key)
        data = response["Body"].read()
    except botocore.exceptions.ClientError as err:
        if _is_404(err):
            raise _not_found(bucket, uri) from err
        raise map_error(err, uri, "read") from err
    except botocore.exceptions.BotoCoreError as err:
        raise map_error(err, uri, "read") from err
    return data, _etag(response.get("ETag"))


def _current_etag(uri: str) -> str | None:
    bucket, key = split_uri(uri)
    try:
        return _etag(get_client().head_object(Bucket=bucket, Key=key).get("ETag"))
    except botocore.exceptions.ClientError as err:
        if _is_404(err):
            return None
        raise map_error(err, uri, "check") from err
    except botocore.exceptions.BotoCoreError as err:
        raise map_error(err, uri, "check") from err


def put_conditional(uri: str, data: bytes, *, expected_version: str | None) -> str:
    """PUT ``data`` only if the object is absent (``expected_version`` None: If-None-Match *)
    or still at ``expected_version`` (If-Match). Returns the new ETag; raises
    PreconditionFailedError when the condition does not hold."""
    bucket, key = split_uri(uri)
    if expected_version is None:
        condition, failed = {"IfNoneMatch": "*"}, f"{uri} already exists"
    else:
        condition = {"IfMatch": f'"{expected_version}"'}
        failed = f"{uri} is no longer at version {expected_version}: another writer changed it"
    try:
        response = get_client().put_object(Bucket=bucket, Key=key, Body=data, **condition)
    except botocore.exceptions.ClientError as err:
        if _code(err) in _CONFLICT_CODES or (expected_version is not None and _is_404(err)):
            raise PreconditionFailedError(failed) from err
        raise map_error(err, uri, "write") from err
    except botocore.exceptions.BotoCoreError as err:
        raise map_error(err, uri, "write") from err
    version = _etag(response.get("ETag"))
    current = _current_etag(uri)
    if current is None:
        raise PreconditionFailedError(f"{uri} was deleted by a concurrent writer right after this write")
    if version and current != version:
        raise PreconditionFailedError(f"{uri} was replaced by a concurrent writer")
    return version or current  # a store that answers a PUT without an ETag: the one read back


def delete_conditional(uri: str, expected_version: str) -> None:
    """DELETE the object only while it is at ``expected_version`` (If-Match). A store that
    answers NotImplemented gets a HEAD, a comparison and a plain DELETE instead (not
    atomic: a write landing between the two is lost)."""
    bucket, key = split_uri(uri)
    client = get_client()
    try:
        client.delete_object(Bucket=bucket, Key=key, IfMatch=f'"{expected_version}"')
        return
    except botocore.exceptions.ClientError as err:
        if _code(err) in _CONFLICT_CODES or _is_404(err):
            raise PreconditionFailedError(f"{uri} is no longer at version {expected_version}") from err
        if _code(err) != "NotImplemented":
            raise map_error(err, uri, "delete") from err
    except botocore.exceptions.BotoCoreError as err:
        raise map_error(err, uri, "delete") from err
    if _current_etag(uri) != expected_version:
        raise PreconditionFailedError(f"{uri} is no longer at version {expected_version}")
    delete(uri)


def read_bytes(uri: str) -> bytes:
    with open_stream(uri) as f:
        return f.read()


def open_stream(uri: str) -> io.BufferedReader:
    """A seekable binary reader that streams the object (never reading it whole)."""
    return io.BufferedReader(_ObjectReader(uri), buffer_size=_READ_CHUNK_BYTES)


# botocore raises these when a response body breaks off midway (reset, short read,
# read timeout); the reader resumes with a ranged GET from where it stopped.
_STREAM_ERRORS = (
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionClosedError,
    ConnectionError,
    TimeoutError,
)


class _ObjectReader(io.RawIOBase):
    """Raw reader over one object version: a GET body, resumed and repositioned with
    ranged GETs pinned to the first response's ETag (If-Match), so a replaced object
    fails with ObjectChangedError instead of mixing two versions."""

    def __init__(self, uri: str) -> None:
        super().__init__()
        self._uri = uri
        self._bucket, self._key = split_uri(uri)
        self._client = get_client()
        self._attempts = active_config().max_attempts
        self._pos = 0
        response = self._get(None)
        self._size = int(response["ContentLength"])
        self._etag = response.get("ETag")
        self._body: Any = response["Body"]

    def _get(self, start: int | None) -> dict:
        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Key": self._key}
        if start is not None:
            kwargs["Range"] = f"bytes={start}-"
            if self._etag:
                kwargs["IfMatch"] = self._etag
        return _call(self._uri, "read", lambda: self._client.get_object(**kwargs))

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        target = base + offset
        if target < 0:
            raise ValueError(f"negative seek position {target} in {self._uri}")
        if target != self._pos:
            self._drop_body()
            self._pos = target
        return self._pos

    def _drop_body(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self._size - self._pos)
        if want <= 0:
            return 0
        for attempt in range(self._attempts):
            try:
                if self._body is None:
                    self._body = self._get(self._pos)["Body"]
                data = self._body.read(want)
                if not data:
                    raise botocore.exceptions.IncompleteReadError(actual_bytes=self._pos, expected_bytes=self._size)
                break
            except _STREAM_ERRORS as err:
                self._drop_body()
                if attempt + 1 >= self._attempts:
                    raise StorageError(
                        f"reading {self._uri} broke off at byte {self._pos} of {self._size} "
                        f"{self._attempts} times: {type(err).__name__}"
                    ) from err
                delay = min(5.0, 0.1 * 2**attempt) * (0.5 + random.random() / 2)
                logger.debug("read of %s broke at byte %d (%s); resuming in %.2f s", self._uri, self._pos, err, delay)
                time.sleep(delay)
        n = len(data)
        buffer[:n] = data
        self._pos += n
        return n

    def readall(self) -> bytes:
        parts: list[bytes] = []
        while True:
            chunk = self.read(_READ_CHUNK_BYTES)
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)

    def close(self) -> None:
        if not self.closed:
            self._drop_body()
        super().close()


__all__ = [
    "AccessDeniedError",
    "BucketNotFoundError",
    "CredentialsError",
    "EndpointUnreachableError",
    "MiB",
    "ObjectChangedError",
    "ObjectTuple",
    "S3Config",
    "S3ServiceError",
    "active_config",
    "beam_s3_options",
    "configure_s3",
    "delete",
    "delete_conditional",
    "download_file",
    "exists",
    "get_client",
    "list_keys",
    "map_error",
    "open_stream",
    "put_conditional",
    "put_file",
    "read_bytes",
    "read_versioned",
    "split_uri",
    "stat",
    "write_bytes",
]
