"""URI-addressed storage: local paths, file:// and s3:// behind one small API.

Every other module reads and writes through these functions, so the DAG, the index
build and the query-node loader work the same on a laptop and on object storage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import os
import shutil
import tempfile
from typing import IO, Iterator

from xmodal_index.sinks.errors import ObjectNotFoundError, StorageError


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    """One listed object."""

    uri: str
    size: int
    mtime: float  # seconds since the epoch
    etag: str  # object-store etag, or a size+mtime fingerprint on local disks


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _local(uri: str) -> str:
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if "://" in uri:
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path, file:// or s3://")
    return uri


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def _local_etag(st: os.stat_result) -> str:
    return "l-" + hashlib.sha1(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:20]


def list_objects(prefix: str, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> Iterator[ObjectInfo]:
    """Yield every object under ``prefix`` in sorted order, filtered by glob patterns
    matched against the path relative to the prefix."""
    root = os.path.abspath(_local(prefix))
    if not os.path.isdir(root):
        raise ObjectNotFoundError(f"source {prefix!r} is not a directory")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if include and not any(fnmatch.fnmatch(rel, p) for p in include):
                continue
            if any(fnmatch.fnmatch(rel, p) for p in exclude):
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue
            yield ObjectInfo(uri=path, size=st.st_size, mtime=st.st_mtime, etag=_local_etag(st))


def exists(uri: str) -> bool:
    return os.path.exists(_local(uri))


def read_bytes(uri: str) -> bytes:
    try:
        with open(_local(uri), "rb") as f:
            return f.read()
    except FileNotFoundError as err:
        raise ObjectNotFoundError(f"{uri!r} does not exist") from err


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: a temporary name in the same directory, then rename."""
    path = _local(uri)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def open_read(uri: str) -> Iterator[IO[bytes]]:
    try:
        f = open(_local(uri), "rb")
    except FileNotFoundError as err:
        raise ObjectNotFoundError(f"{uri!r} does not exist") from err
    with f:
        yield f


@contextlib.contextmanager
def local_path(uri: str) -> Iterator[str]:
    """A local file path holding the object's bytes for the duration of the block."""
    path = _local(uri)
    if not os.path.exists(path):
        raise ObjectNotFoundError(f"{uri!r} does not exist")
    yield path


def put_file(local: str, uri: str) -> None:
    dest = _local(uri)
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    tmp = dest + ".tmp-upload"
    shutil.copyfile(local, tmp)
    os.replace(tmp, dest)


def delete(uri: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_local(uri))
