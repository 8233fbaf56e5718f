"""Verification records: skip re-hashing a version file that has not changed since it was verified.

A query node verifies every file of a version against the manifest's sha256
before serving it. Hashing is most of the cost of a short-lived CLI query, and
the files rarely change, so a successful check is remembered, per file, as

    (sha256 the manifest expects, device, inode, size, mtime_ns, ctime_ns)

in this process (verify once per process) and in a small record file under
``$XMODAL_INDEX_VERIFIED`` (default ``<cache dir>/verified``; ``off`` disables
records on disk). The next check of the same file skips hashing only when every
one of those values is unchanged. Tampering cannot keep them: rewriting a file
changes its size or mtime and always its ctime (which no unprivileged process
can set back, ``utime`` included); replacing it changes its inode. A file whose
ctime is within ``RACY_S`` of the verification is not recorded (a write in the
same timestamp tick could otherwise go unseen), nor is one whose stat changed
while it was hashed. A record is keyed by the expected sha256, so a new manifest
naming the file with another digest never reuses it. Records are plain JSON,
written atomically, mode 0600; an unreadable or odd record only means hashing again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat as stat_mod
import tempfile
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

RECORDS_ENV = "XMODAL_INDEX_VERIFIED"
RACY_S = 2.0  # files changed this recently (ctime) are not recorded

_memo: dict[str, tuple] = {}
_memo_lock = threading.Lock()


def _identity(st: os.stat_result, expected_sha256: str) -> tuple:
    return (expected_sha256, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def records_dir() -> str | None:
    """Where record files live, or None when records on disk are off."""
    value = os.environ.get(RECORDS_ENV, "")
    if value.lower() == "off":
        return None
    if value:
        return value
    from .cache import default_cache_dir

    return os.path.join(default_cache_dir(), "verified")


def _record_path(directory: str, path: str) -> str:
    key = hashlib.sha256(os.path.realpath(path).encode("utf-8", "surrogateescape")).hexdigest()[:40]
    return os.path.join(directory, f"{key}.json")


def _read_record(path: str) -> tuple | None:
    directory = records_dir()
    if directory is None:
        return None
    try:
        with open(_record_path(directory, path), encoding="utf-8") as f:
            data = json.load(f)
        return tuple(data["identity"]) if data.get("path") == os.path.realpath(path) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_record(path: str, identity: tuple) -> None:
    directory = records_dir()
    if directory is None:
        return
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".record-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"path": os.path.realpath(path), "identity": list(identity)}, f)
            os.replace(tmp, _record_path(directory, path))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as err:  # a read-only or full cache only costs hashing next time
        logger.debug("cannot write a verification record for %s: %s", path, err)


def is_verified(path: str, st: os.stat_result, expected_sha256: str) -> bool:
    """True when ``path`` (stat ``st``, taken with lstat) was verified to hold ``expected_sha256``
    and nothing about it has changed since."""
    if not stat_mod.S_ISREG(st.st_mode):
        return False
    identity = _identity(st, expected_sha256)
    with _memo_lock:
        if _memo.get(os.path.realpath(path)) == identity:
            return True
    if _read_record(path) == identity:
        with _memo_lock:
            _memo[os.path.realpath(path)] = identity
        return True
    return False


def record(path: str, before: os.stat_result, expected_sha256: str) -> None:
    """Remember that ``path`` was just hashed to ``expected_sha256`` (``before``: its lstat taken
    before hashing). Nothing is recorded when the file changed meanwhile or changed too recently."""
    try:
        after = os.lstat(path)
    except OSError:
        return
    identity = _identity(before, expected_sha256)
    if _identity(after, expected_sha256) != identity or time.time() - after.st_ctime < RACY_S:
        return
    with _memo_lock:
        _memo[os.path.realpath(path)] = identity
    _write_record(path, identity)


def sha256_of(path: str, st: os.stat_result, expected_sha256: str, compute: Callable[[str], str]) -> str:
    """``expected_sha256`` when the file is recorded unchanged since it was verified, else
    ``compute(path)`` (recorded when it matches). The hook of ``cache._mismatch``."""
    if is_verified(path, st, expected_sha256):
        return expected_sha256
    digest = compute(path)
    if digest == expected_sha256:
        record(path, st, expected_sha256)
    return digest


def forget() -> None:
    """Drop this process's memo (records on disk stay; tests use this to act as a new process)."""
    with _memo_lock:
        _memo.clear()
