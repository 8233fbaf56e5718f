"""URI-addressed storage: local paths, file:// and s3:// behind one small API.

Every other module reads and writes through these functions, so the DAG, the index
build and the query-node loader work the same on a laptop and on object storage.
The s3:// side lives in ``s3.py`` (its settings, client and error mapping in
``s3_config.py``: :class:`S3Config`, :func:`configure_s3`). Compare-and-swap writes
of one object (``read_versioned``, ``create_if_absent``, ``replace_if_match``,
``delete_if_match``) are in ``conditional.py``; the workdir lease built on them in
``lease.py``. This package must not import apache_beam, click or torch.

Semantics shared by both backends:

- A prefix given to :func:`list_objects` is a directory: ``s3://b/media`` lists the
  keys under ``media/``. Globs (fnmatch: ``*`` also crosses ``/``) are matched against
  the path relative to the prefix. Objects come in sorted order of that relative
  path (S3's key order; locally, the same order is produced directory by directory).
  A prefix with nothing under it raises ObjectNotFoundError (a missing directory;
  on S3 every prefix "exists", so an empty one is treated the same way).
- Local listings stay inside the source root: a symlinked file is listed only when
  its target resolves inside the root (under the link's own path); links leading out
  of the root, dangling links and symlinked directories are skipped.
- Writes are atomic per object: local files are written under a temporary name and
  renamed; an S3 PUT or completed multipart upload replaces the object at once.
  Nothing makes several objects appear together: a multi-file commit uploads its
  parts first and writes a manifest or marker (``LATEST``) last.
- Missing objects raise ObjectNotFoundError naming the URI; other failures raise a
  StorageError subclass with a one-line message naming the URI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO

from ..errors import ObjectNotFoundError, PreconditionFailedError, StorageError
from . import s3
from .conditional import (
    create_if_absent,
    delete_if_match,
    read_versioned,
    replace_if_match,
)
from .s3 import (
    AccessDeniedError,
    BucketNotFoundError,
    CredentialsError,
    EndpointUnreachableError,
    ObjectChangedError,
    S3Config,
    S3ServiceError,
    active_config,
    beam_s3_options,
    configure_s3,
)
from .uri import filesystem_path as _local
from .uri import is_s3, join, normalize_uri

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    """One listed object."""

    uri: str
    size: int
    mtime: float  # seconds since the epoch
    etag: str  # object-store etag, or a size+mtime fingerprint on local disks


def _local_etag(st: os.stat_result) -> str:
    return "l-" + hashlib.sha1(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:20]


def _selected(rel: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    if include and not any(fnmatch.fnmatchcase(rel, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(rel, p) for p in exclude)


def list_objects(prefix: str, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> Iterator[ObjectInfo]:
    """Yield every object under ``prefix`` in sorted order, filtered by glob patterns
    matched against the path relative to the prefix."""
    if is_s3(prefix):
        base = s3.split_uri(prefix)[1]
        skip = len(base) + 1 if base and not base.endswith("/") else len(base)
        for uri, size, mtime, etag in s3.list_keys(prefix):
            rel = s3.split_uri(uri)[1][skip:]
            if _selected(rel, include, exclude):
                yield ObjectInfo(uri=uri, size=size, mtime=mtime, etag=etag)
        return
    root = os.path.abspath(_local(prefix))
    if not os.path.isdir(root):
        raise ObjectNotFoundError(f"source {prefix!r} is not a directory")
    real_root = os.path.realpath(root)
    for path, rel in _walk_sorted(root, "", real_root):
        if not _selected(rel, include, exclude):
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue  # vanished since it was listed
        yield ObjectInfo(uri=path, size=st.st_size, mtime=st.st_mtime, etag=_local_etag(st))


def _inside(path: str, real_root: str) -> bool:
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _walk_sorted(directory: str, rel_dir: str, real_root: str) -> Iterator[tuple[str, str]]:
    """(path, relative path) of the regular files under ``directory``, sorted by the
    relative path as a whole (a directory sorts as ``name/``), like S3 keys."""
    try:
        with os.scandir(directory) as it:
            entries = list(it)
    except OSError as err:
        logger.warning("cannot list %s: %s", directory, err)
        return
    keyed = []
    for entry in entries:
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            continue
        keyed.append((entry.name + "/" if is_dir else entry.name, entry, is_dir))
    keyed.sort(key=lambda t: t[0])
    for _, entry, is_dir in keyed:
        rel = rel_dir + entry.name
        if is_dir:
            yield from _walk_sorted(entry.path, rel + "/", real_root)
        elif entry.is_symlink():
            if os.path.isfile(entry.path) and _inside(entry.path, real_root):
                yield entry.path, rel
            else:
                logger.debug("skipping symlink %s: not a file inside %s", entry.path, real_root)
        elif entry.is_file(follow_symlinks=False):
            yield entry.path, rel


def stat(uri: str) -> ObjectInfo:
    """Size, mtime and etag of one object."""
    if is_s3(uri):
        return ObjectInfo(*s3.stat(uri))
    try:
        st = os.stat(_local(uri))
    except FileNotFoundError as err:
        raise ObjectNotFoundError(f"{uri!r} does not exist") from err
    except OSError as err:
        raise StorageError(f"cannot stat {uri!r}: {err.strerror}") from err
    return ObjectInfo(uri=uri, size=st.st_size, mtime=st.st_mtime, etag=_local_etag(st))


def exists(uri: str) -> bool:
    """True for an object, or a directory (on S3: a prefix with objects under it)."""
    if is_s3(uri):
        return s3.exists(uri)
    return os.path.exists(_local(uri))


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        return s3.read_bytes(uri)
    try:
        with open(_local(uri), "rb") as f:
            return f.read()
    except FileNotFoundError as err:
        raise ObjectNotFoundError(f"{uri!r} does not exist") from err
    except OSError as err:
        raise StorageError(f"cannot read {uri!r}: {err.strerror}") from err


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically: locally a temporary name in the same directory, flushed to
    disk, then renamed; on S3 one PUT (multipart above the configured threshold)."""
    if is_s3(uri):
        s3.write_bytes(uri, data)
        return
    path = _local(uri)
    try:
        _atomic_local_write(path, lambda f: f.write(data))
    except OSError as err:
        raise StorageError(f"cannot write {uri!r}: {err.strerror or err}") from err


def _atomic_local_write(path: str, fill) -> None:
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path) + "-")
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def open_read(uri: str) -> Iterator[IO[bytes]]:
    """A binary, seekable file object for reading; on S3 it streams the object with
    ranged GETs (resuming when a transfer breaks off) instead of loading it whole."""
    if is_s3(uri):
        f = s3.open_stream(uri)
    else:
        try:
            f = open(_local(uri), "rb")
        except FileNotFoundError as err:
            raise ObjectNotFoundError(f"{uri!r} does not exist") from err
        except OSError as err:
            raise StorageError(f"cannot open {uri!r}: {err.strerror}") from err
    with f:
        yield f


_SAFE_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,8}")


@contextlib.contextmanager
def local_path(uri: str) -> Iterator[str]:
    """A local file path holding the object's bytes for the duration of the block.

    Local files are used in place. S3 objects are streamed to a private temporary
    directory as ``object<.ext>`` (the key's extension when it is a short
    alphanumeric one; never a name taken from the key, so no key can escape the
    directory or exceed file-name limits) and deleted when the block ends.
    """
    if not is_s3(uri):
        path = _local(uri)
        if not os.path.isfile(path):
            raise ObjectNotFoundError(f"{uri!r} does not exist")
        yield path
        return
    suffix = os.path.splitext(s3.split_uri(uri)[1])[1]
    name = "object" + (suffix if _SAFE_SUFFIX.fullmatch(suffix) else "")
    tmpdir = tempfile.mkdtemp(prefix="xmodal-s3-")
    try:
        path = os.path.join(tmpdir, name)
        s3.download_file(uri, path)
        yield path
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def put_file(local: str, uri: str) -> None:
    """Copy a local file to ``uri`` atomically (S3: managed, multipart above the threshold)."""
    if is_s3(uri):
        s3.put_file(local, uri)
        return
    dest = _local(uri)
    try:
        with open(local, "rb") as src:
            _atomic_local_write(dest, lambda f: shutil.copyfileobj(src, f, 1024 * 1024))
    except FileNotFoundError as err:
        if not os.path.exists(local):
            raise ObjectNotFoundError(f"{local!r} does not exist (copy to {uri})") from err
        raise StorageError(f"cannot copy {local!r} to {uri!r}: {err.strerror}") from err
    except OSError as err:
        raise StorageError(f"cannot copy {local!r} to {uri!r}: {err.strerror or err}") from err


def delete(uri: str) -> None:
    """Delete one object; deleting a missing one is not an error."""
    if is_s3(uri):
        s3.delete(uri)
        return
    try:
        os.unlink(_local(uri))
    except FileNotFoundError:
        pass
    except OSError as err:
        raise StorageError(f"cannot delete {uri!r}: {err.strerror}") from err


__all__ = [
    "AccessDeniedError",
    "BucketNotFoundError",
    "CredentialsError",
    "EndpointUnreachableError",
    "ObjectChangedError",
    "ObjectInfo",
    "ObjectNotFoundError",
    "PreconditionFailedError",
    "S3Config",
    "S3ServiceError",
    "StorageError",
    "active_config",
    "beam_s3_options",
    "configure_s3",
    "create_if_absent",
    "delete",
    "delete_if_match",
    "exists",
    "is_s3",
    "join",
    "list_objects",
    "local_path",
    "normalize_uri",
    "open_read",
    "put_file",
    "read_bytes",
    "read_versioned",
    "replace_if_match",
    "s3",
    "stat",
    "write_bytes",
]
