"""A query node's local cache of index versions: verified fetches and pruning.

Layout: ``CACHE_DIR/<index key>/<version>/<file>``, where CACHE_DIR is the caller's
``cache_dir``, else ``$XMODAL_INDEX_CACHE``, else ``~/.cache/xmodal-index``, and the
index key is derived from the index root URI.

Rules a manifest cannot bend:

- A file is only ever written inside its version's cache directory, under a name
  that passed ``manifest_schema.plain_file_name`` and whose joined path has that
  directory as its parent (checked again here, whatever the manifest check did).
- Nothing unverified is ever visible under a listed name: a file is streamed to a
  temporary ``.fetch-*`` name in the same directory, hashed while it streams, and
  cut off as soon as it exceeds the size the manifest gives; only a file of the
  listed size and sha256 is renamed into place. A wrong one is deleted.
- A cached copy is reused only when it is a regular file (not a symlink) with the
  listed size and sha256.

Incremental versions list files of older versions (an entry's ``origin``): they
are fetched from that version's directory (read in place there for local roots).
Fetched files are also content-addressed: ``<index key>/objects/<sha256>`` is a
hard link to each verified file, so a version that lists a file another cached
version already holds links it (verified again) instead of downloading it; an
object no version directory links any more is removed by pruning.

Pruning keeps the ``keep_versions`` most recently opened versions of an index
(default 2: the current and the previous one; ``$XMODAL_INDEX_CACHE_KEEP``) and
never removes a version that an open ``IndexVersion`` of this process uses. Other
processes sharing one cache directory should use one ``keep_versions`` >= the number
of versions they serve at once.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterable

from .. import storage
from ..errors import ChecksumMismatchError, IndexVersionError, ObjectNotFoundError
from ..index import manifest as mf
from ..index.manifest_schema import plain_file_name
from ..index.seal import VERSION_PATTERN
from . import verified

logger = logging.getLogger(__name__)

CACHE_ENV = "XMODAL_INDEX_CACHE"
KEEP_ENV = "XMODAL_INDEX_CACHE_KEEP"
DEFAULT_KEEP_VERSIONS = 2
_CHUNK_BYTES = 1 << 22
_VERSION_DIR_RE = re.compile(VERSION_PATTERN)

_in_use: collections.Counter[str] = collections.Counter()  # real paths of version dirs open in this process
_in_use_lock = threading.Lock()


def default_cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "xmodal-index")


def cache_key(index_root: str) -> str:
    name = index_root.rstrip("/").rsplit("/", 1)[-1] or "index"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:64].lstrip(".") or "index"
    return f"{safe}-{hashlib.sha256(index_root.encode()).hexdigest()[:12]}"


def keep_versions_from_env() -> int:
    """``$XMODAL_INDEX_CACHE_KEEP`` (an integer >= 1), default DEFAULT_KEEP_VERSIONS."""
    value = os.environ.get(KEEP_ENV)
    if value is None or not value.strip():
        return DEFAULT_KEEP_VERSIONS
    try:
        keep = int(value)
    except ValueError:
        keep = 0
    if keep < 1:
        raise ValueError(f"{KEEP_ENV} = {value[:16]!r} must be an integer >= 1")
    return keep


def file_path(local_dir: str, name: str) -> str:
    """``local_dir/name`` for a plain file name; IndexVersionError for anything else."""
    plain_file_name(name)
    path = os.path.join(local_dir, name)
    if os.path.dirname(path) != local_dir:
        raise IndexVersionError(f"file name {name!r} leaves the version directory")
    return path


def _mismatch(entry: mf.FileEntry, path: str) -> str | None:
    """Why the local file does not match its manifest entry, or None when it does."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "is missing"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_size != entry.bytes:
        return f"has {st.st_size} bytes, the manifest says {entry.bytes}"
    digest = verified.sha256_of(path, st, entry.sha256, mf.sha256_file)  # unchanged since verified: no re-hash
    if digest != entry.sha256:
        return f"has sha256 {digest}, the manifest says {entry.sha256}"
    return None


def fetch_verified(uri: str, dest: str, entry: mf.FileEntry, version: str) -> None:
    """Stream ``uri`` to a temporary name beside ``dest``; rename it to ``dest`` only
    when its size and sha256 are the entry's. ChecksumMismatchError otherwise."""
    directory = os.path.dirname(dest)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fetch-")
    try:
        digest = hashlib.sha256()
        got = 0
        with os.fdopen(fd, "wb") as out, storage.open_read(uri) as src:
            while block := src.read(min(_CHUNK_BYTES, entry.bytes + 1 - got)):
                got += len(block)
                if got > entry.bytes:
                    raise ChecksumMismatchError(f"version {version}: {entry.file!r} is larger than the "
                                                f"{entry.bytes} bytes the manifest says ({uri}); refusing to serve it")
                digest.update(block)
                out.write(block)
        if got != entry.bytes:
            raise ChecksumMismatchError(f"version {version}: {entry.file!r} has {got} bytes, the manifest says "
                                        f"{entry.bytes} ({uri}); refusing to serve it")
        if digest.hexdigest() != entry.sha256:
            raise ChecksumMismatchError(f"version {version}: {entry.file!r} has sha256 {digest.hexdigest()}, the "
                                        f"manifest says {entry.sha256} ({uri}); refusing to serve it")
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _local_root(index_root: str) -> str:
    return index_root[len("file://"):] if index_root.startswith("file://") else index_root


def index_cache_dir(index_root: str, cache_dir: str | None) -> str:
    return os.path.join(os.path.abspath(cache_dir or default_cache_dir()), cache_key(index_root))


def version_dir(index_root: str, version: str, cache_dir: str | None) -> str:
    """The local directory of ``version``: in place for a local root without a cache_dir,
    else ``<cache>/<index key>/<version>``."""
    mf.version_number(version)
    if cache_dir is None and not storage.is_s3(index_root):
        return os.path.join(os.path.abspath(_local_root(index_root)), version)
    return os.path.join(index_cache_dir(index_root, cache_dir), version)


def entry_path(index_root: str, manifest: mf.Manifest, entry: mf.FileEntry, cache_dir: str | None) -> str:
    """The local path a listed file is verified and read at."""
    if entry.origin and cache_dir is None and not storage.is_s3(index_root):  # in place, in its own version
        return file_path(version_dir(index_root, entry.origin, None), entry.file)
    return file_path(version_dir(index_root, manifest.version, cache_dir), entry.file)


def entry_paths(index_root: str, manifest: mf.Manifest, cache_dir: str | None) -> dict[str, str]:
    """File name -> local path of every file the manifest lists."""
    return {entry.file: entry_path(index_root, manifest, entry, cache_dir) for entry in manifest.all_files()}


def _object_path(index_root: str, cache_dir: str | None, entry: mf.FileEntry) -> str:
    return os.path.join(index_cache_dir(index_root, cache_dir), "objects", entry.sha256)


def _link_cached(obj: str, path: str, entry: mf.FileEntry) -> bool:
    """Link the cached object of ``entry`` to ``path`` when it verifies (True), else leave it."""
    if not os.path.isfile(obj) or os.path.islink(obj):
        return False
    tmp = os.path.join(os.path.dirname(path), f".link-{entry.sha256[:16]}-{os.getpid()}-{threading.get_ident()}")
    try:
        os.link(obj, tmp)
        if _mismatch(entry, tmp) is not None:
            os.unlink(tmp)
            return False
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False
    return True


def _keep_object(path: str, obj: str) -> None:
    try:
        os.makedirs(os.path.dirname(obj), exist_ok=True)
        os.link(path, obj)
    except FileExistsError:
        pass
    except OSError as err:  # another filesystem or no hard links: the cache still works, without sharing
        logger.debug("cannot link %s into the object store: %s", path, err)


def materialise(index_root: str, manifest: mf.Manifest, cache_dir: str | None) -> str:
    """A local directory holding every listed file, each verified against the manifest.

    Local index roots without a ``cache_dir`` are read in place (nothing is written);
    otherwise files are fetched into the cache as described in the module docstring.
    """
    version = manifest.version
    in_place = cache_dir is None and not storage.is_s3(index_root)
    local_dir = version_dir(index_root, version, cache_dir)
    paths = [(entry, entry_path(index_root, manifest, entry, cache_dir))
             for entry in manifest.all_files()]  # every name first
    if not in_place:
        os.makedirs(local_dir, exist_ok=True)
        if os.path.islink(local_dir) or not os.path.isdir(local_dir):
            raise IndexVersionError(f"cache directory {local_dir!r} is not a plain directory")
    for entry, path in paths:
        uri = mf.entry_uri(index_root, manifest, entry)
        problem = _mismatch(entry, path)
        if problem is not None and not in_place:  # not cached yet, or a damaged cached copy
            obj = _object_path(index_root, cache_dir, entry)
            if not _link_cached(obj, path, entry):
                try:
                    fetch_verified(uri, path, entry, version)
                except ObjectNotFoundError as err:
                    raise ChecksumMismatchError(f"version {version}: {entry.file!r} listed in the manifest is "
                                                f"missing ({uri})") from err
                _keep_object(path, obj)
            problem = None
        if problem is not None:
            raise ChecksumMismatchError(f"version {version}: {entry.file!r} {problem} ({uri}); refusing to serve it")
    if not in_place:
        os.utime(local_dir)  # most recently used: what pruning keeps
    return local_dir


def _prune_objects(objects_dir: str) -> None:
    """Remove stored objects that no cached version links any more."""
    try:
        entries = list(os.scandir(objects_dir))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        try:
            if entry.stat(follow_symlinks=False).st_nlink <= 1:
                os.unlink(entry.path)
        except OSError:
            pass


def hold(local_dir: str) -> None:
    """Mark a version directory as in use by an open IndexVersion (never pruned)."""
    with _in_use_lock:
        _in_use[os.path.realpath(local_dir)] += 1


def release(local_dir: str) -> None:
    with _in_use_lock:
        key = os.path.realpath(local_dir)
        _in_use[key] -= 1
        if _in_use[key] <= 0:
            del _in_use[key]


def prune(index_dir: str, keep_versions: int, protect: Iterable[str] = ()) -> list[str]:
    """Remove cached versions of one index beyond the ``keep_versions`` most recently
    used, never one in ``protect`` or in use by this process; returns the removed names."""
    if keep_versions < 1:
        raise ValueError(f"{keep_versions = } must be >= 1")
    try:
        entries = [e for e in os.scandir(index_dir) if _VERSION_DIR_RE.fullmatch(e.name)]
    except FileNotFoundError:
        return []
    with _in_use_lock:
        busy = set(_in_use)
    busy.update(os.path.realpath(p) for p in protect)

    def mtime(entry: os.DirEntry) -> float:
        try:
            return entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            return 0.0

    removed = []
    for entry in sorted(entries, key=mtime, reverse=True)[keep_versions:]:
        if os.path.realpath(entry.path) in busy:
            continue
        try:
            if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
                os.unlink(entry.path)
            else:
                shutil.rmtree(entry.path)
        except OSError as err:
            logger.warning("cannot prune cached version %s: %s", entry.path, err)
            continue
        removed.append(entry.name)
    _prune_objects(os.path.join(index_dir, "objects"))
    if removed:
        logger.info("pruned cached versions %s of %s (keeping %d)", ",".join(sorted(removed)), index_dir,
                    keep_versions)
    return removed
