"""Conditional writes: compare-and-swap on one object, for leases and LATEST.

Each object has an opaque version token that changes whenever its content changes:
on S3 the ETag, on a local disk the sha256 of the content. Compare a token only with
tokens returned by these functions.

- :func:`read_versioned` returns the bytes and the version (ObjectNotFoundError when absent);
- :func:`create_if_absent` writes only when nothing is there;
- :func:`replace_if_match` writes only while the object is at the expected version;
- :func:`delete_if_match` deletes only while the object is at the expected version.

A condition that does not hold raises PreconditionFailedError; of several writers
racing on one version, exactly one succeeds.

Local disks: writers are serialised by an ``flock`` on a sidecar ``.NAME.lock`` file in
the same directory; the new content is written to a temporary file, flushed, and
renamed (or hard-linked, for a create) into place, so readers never see a partial
object. Plain :func:`~xmodal_index.sinks.storage.write_bytes` does not take the lock:
an object written conditionally should only be written conditionally.

S3: ``If-None-Match: *`` and ``If-Match: <etag>`` on PUT and DELETE; see
:func:`~xmodal_index.sinks.storage.s3.put_conditional` for stores that ignore them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator

from ..errors import ObjectNotFoundError, PreconditionFailedError, StorageError
from . import s3
from .uri import filesystem_path, is_s3


def read_versioned(uri: str) -> tuple[bytes, str]:
    """The object's bytes and its version token."""
    if is_s3(uri):
        return s3.read_versioned(uri)
    data = _read_local(uri, filesystem_path(uri))
    if data is None:
        raise ObjectNotFoundError(f"{uri!r} does not exist")
    return data, _version(data)


def create_if_absent(uri: str, data: bytes) -> str:
    """Write ``data`` only if nothing is at ``uri``; returns the new version."""
    if is_s3(uri):
        return s3.put_conditional(uri, data, expected_version=None)
    path = filesystem_path(uri)
    with _locked(uri, path):
        if os.path.lexists(path):
            raise PreconditionFailedError(f"{uri} already exists")
        _install(uri, path, data, create=True)
    return _version(data)


def replace_if_match(uri: str, data: bytes, expected_version: str) -> str:
    """Write ``data`` only while the object is at ``expected_version``; returns the new version."""
    if is_s3(uri):
        return s3.put_conditional(uri, data, expected_version=expected_version)
    path = filesystem_path(uri)
    with _locked(uri, path):
        _check_version(uri, path, expected_version)
        _install(uri, path, data, create=False)
    return _version(data)


def delete_if_match(uri: str, expected_version: str) -> None:
    """Delete the object only while it is at ``expected_version``."""
    if is_s3(uri):
        s3.delete_conditional(uri, expected_version)
        return
    path = filesystem_path(uri)
    with _locked(uri, path):
        _check_version(uri, path, expected_version)
        try:
            os.unlink(path)
        except OSError as err:
            raise StorageError(f"cannot delete {uri!r}: {err.strerror}") from err
        _fsync_dir(os.path.dirname(path) or ".")


# --------------------------------------------------------------------------- local disks


def _version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def lock_path(path: str) -> str:
    """The sidecar file whose flock serialises conditional writers of ``path``."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.lock")


@contextlib.contextmanager
def _locked(uri: str, path: str) -> Iterator[None]:
    lock = lock_path(path)
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise StorageError(f"cannot open the lock file {lock!r} of {uri}: {err.strerror}") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _read_local(uri: str, path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise StorageError(f"cannot read {uri!r}: {err.strerror}") from err


def _check_version(uri: str, path: str, expected_version: str) -> None:
    data = _read_local(uri, path)
    if data is None:
        raise PreconditionFailedError(f"{uri} does not exist (expected version {expected_version})")
    if _version(data) != expected_version:
        raise PreconditionFailedError(f"{uri} is no longer at version {expected_version}: another writer changed it")


def _install(uri: str, path: str, data: bytes, *, create: bool) -> None:
    directory = os.path.dirname(path) or "."
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path) + "-")
    except OSError as err:
        raise StorageError(f"cannot write {uri!r}: {err.strerror}") from err
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        if create:
            _link_new(uri, tmp, path)
        else:
            os.replace(tmp, path)
        _fsync_dir(directory)
    except OSError as err:
        raise StorageError(f"cannot write {uri!r}: {err.strerror or err}") from err
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _link_new(uri: str, tmp: str, path: str) -> None:
    """Put ``tmp`` in place only if ``path`` is absent, also against writers without the lock."""
    try:
        os.link(tmp, path)
    except FileExistsError as err:
        raise PreconditionFailedError(f"{uri} already exists") from err
    except OSError:  # a filesystem without hard links: the flock alone orders the writers
        if os.path.lexists(path):
            raise PreconditionFailedError(f"{uri} already exists") from None
        os.replace(tmp, path)


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


__all__ = ["create_if_absent", "delete_if_match", "lock_path", "read_versioned", "replace_if_match"]
