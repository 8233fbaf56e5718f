"""Hot swap for query nodes: keep serving one index version while loading the next.

An :class:`IndexHandle` holds the version being served. A background thread reads
LATEST every ``poll_s`` seconds; when it names another version (newer, or older
after a rollback), the handle opens and verifies that version off the request path
(every sha256, as ``IndexVersion.open`` does), runs the caller's ``prepare`` hook
(a query node loads the version's encoder there), and only then swaps it in under
a lock. Readers take the served version with :meth:`IndexHandle.acquire`; a version
swapped out stays open until its last reader releases it, then it is closed.

A version that fails verification, or whose ``prepare`` fails, is refused: the
handle keeps serving the version it has, logs why, lists the refusal in
:meth:`IndexHandle.status`, and does not try it again. Refusals are remembered by
the manifest digest LATEST records, not by version name: a version number published
again with another manifest is examined afresh. Storage errors (an unreachable
bucket) are not refusals: the next poll tries again.

What the status carries about LATEST is only the parsed, bounded version name or a
short, sanitised reason (seal.read_latest_record): never LATEST's raw content.

While a new version loads, the old one is still in memory: a swap needs room for
both. Beam-free and torch-free, like the loader.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ..errors import IndexVersionError, SinkError
from ..index import manifest as mf
from ..index import seal
from .loader import IndexVersion

logger = logging.getLogger(__name__)


class NoServableVersionError(IndexVersionError):
    """No index version is loaded: nothing is published, or what is published was refused."""


@dataclasses.dataclass(frozen=True)
class HotSwapConfig:
    """How an IndexHandle follows LATEST.

    poll_s: seconds between two reads of LATEST. version: serve this version only
    (no polling, no swaps). cache_dir: where remote versions are fetched (None: the
    loader's default; local index roots are read in place). keep_versions: cached
    versions kept per index (None: $XMODAL_INDEX_CACHE_KEEP or 2; the served one and
    one being replaced are always kept).
    """

    poll_s: float = 30.0
    version: str | None = None
    cache_dir: str | None = None
    keep_versions: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.poll_s, (int, float)) and math.isfinite(self.poll_s) and self.poll_s > 0):
            raise ValueError(f"{self.poll_s = } must be a finite number of seconds > 0")
        if self.version is not None:
            try:
                mf.version_number(self.version)
            except IndexVersionError as err:
                raise ValueError(f"self.version = {seal.sanitise(str(self.version))} is not a version name "
                                 "such as v000003") from err
        if self.keep_versions is not None and (type(self.keep_versions) is not int or self.keep_versions < 1):
            raise ValueError(f"{self.keep_versions = } must be an integer >= 1")


class Served:
    """One loaded version, what ``prepare`` returned for it, and when it was loaded."""

    def __init__(self, index: IndexVersion, extra: Any, loaded_at: str) -> None:
        self.index = index
        self.extra = extra
        self.loaded_at = loaded_at
        self._readers = 0
        self._retired = False
        self._closed = False

    @property
    def version(self) -> str:
        return self.index.version

    @property
    def manifest(self) -> mf.Manifest:
        return self.index.manifest

    @property
    def closed(self) -> bool:
        """True once the version was swapped out and its last reader finished."""
        return self._closed


@dataclasses.dataclass(frozen=True)
class HandleStatus:
    """What a health check reports about an IndexHandle."""

    index_root: str
    version: str | None
    model_id: str | None
    ntotal: int | None
    modalities: tuple[str, ...]
    loaded_at: str | None
    pinned: bool
    last_check_at: str | None
    last_error: str | None  # why nothing is served, or why the last poll failed (one short line)
    refused: Mapping[str, str]  # version -> why it was not swapped in (the latest MAX_REFUSALS_SHOWN)


MAX_REASON_CHARS = 300  # a refusal or error reason kept in the status
MAX_REFUSALS_SHOWN = 16  # versions listed in status().refused
MAX_REFUSALS_KEPT = 1024  # manifest digests remembered as refused


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


# prepare(new_version, currently_served_or_None) -> the object kept in Served.extra
Prepare = Callable[[IndexVersion, "Served | None"], Any]


class IndexHandle:
    """The index version a query node serves, swapped atomically when LATEST moves."""

    def __init__(self, index_root: str, config: HotSwapConfig | None = None, prepare: Prepare | None = None) -> None:
        self.index_root = index_root
        self.config = config or HotSwapConfig()
        self._prepare = prepare
        self._lock = threading.Lock()  # guards _current, reader counts, _refused, _last_*
        self._refresh_lock = threading.Lock()  # one load at a time
        self._current: Served | None = None
        self._refused: dict[str, str] = {}  # version -> why (shown in status, newest last)
        self._refused_keys: dict[str, str] = {}  # manifest digest (or LATEST record) -> version, newest last
        self._last_error: str | None = None
        self._last_check_at: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifetime

    def start(self) -> IndexHandle:
        """Load the first version now, then follow LATEST in a background thread.

        With a pinned version, a version that cannot be loaded raises (IndexVersionError
        or StorageError). Following LATEST, the handle starts even when nothing can be
        served yet: acquire() raises NoServableVersionError until a version loads.
        """
        if self.config.version is not None:
            self._swap(self._load(version=self.config.version))
            return self
        self.refresh()
        self._thread = threading.Thread(target=self._poll_loop, name="index-hot-swap", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop polling; the served version is closed once its last reader is done."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            old, self._current = self._current, None
            if old is not None:
                self._last_error = "the index handle is closed"
        if old is not None:
            self._retire(old)

    def __enter__(self) -> IndexHandle:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ readers

    @property
    def current(self) -> Served | None:
        with self._lock:
            return self._current

    @contextlib.contextmanager
    def acquire(self) -> Iterator[Served]:
        """The served version, kept open until the block ends even if a swap happens meanwhile."""
        with self._lock:
            served = self._current
            if served is None:
                why = self._last_error or "no version loaded yet"
                raise NoServableVersionError(f"no index version of {self.index_root!r} can be served: {why}")
            served._readers += 1
        try:
            yield served
        finally:
            with self._lock:
                served._readers -= 1
                close_now = served._retired and served._readers == 0 and not served._closed
                if close_now:
                    served._closed = True
            if close_now:
                self._close_index(served)

    def status(self) -> HandleStatus:
        with self._lock:
            s = self._current
            return HandleStatus(
                index_root=self.index_root,
                version=s.version if s else None,
                model_id=s.manifest.model_id if s else None,
                ntotal=s.manifest.ntotal if s else None,
                modalities=s.manifest.modalities if s else (),
                loaded_at=s.loaded_at if s else None,
                pinned=self.config.version is not None,
                last_check_at=self._last_check_at,
                last_error=self._last_error,
                refused=dict(self._refused),
            )

    # ------------------------------------------------------------ swapping

    def refresh(self) -> bool:
        """Read LATEST once; load, verify and swap in the version it names if that is new.

        Returns True when a new version is now served. Never raises for a bad version:
        the reason is logged and kept in status().
        """
        if self.config.version is not None:
            return False
        with self._refresh_lock:
            self._last_check_at = mf.utc_now_iso()
            try:
                record = seal.read_latest_record(self.index_root)
            except SinkError as err:
                self._note_error(f"cannot read LATEST: {err}")
                return False
            if record is None:
                self._note_error(f"nothing is published under {self.index_root!r} (no LATEST)")
                return False
            current = self.current
            if current is not None and record.digest is not None and current.index.digest == record.digest:
                return False
            key = record.digest or f"{record.version} without digest"
            if key in self._refused_keys:
                return False
            try:
                new = self._load(latest=record)
            except IndexVersionError as err:
                self._refuse(record.version, key, str(err))
                return False
            except Exception as err:  # noqa: BLE001 - storage or I/O trouble: try again at the next poll
                self._note_error(f"cannot load {record.version} yet ({type(err).__name__}: {err}); will retry")
                return False
            self._swap(new)
            return True

    def _load(self, *, version: str | None = None, latest: seal.LatestRecord | None = None) -> Served:
        index = IndexVersion.open(self.index_root, version=version, cache_dir=self.config.cache_dir, latest=latest,
                                  keep_versions=self.config.keep_versions)
        try:
            extra = self._prepare(index, self.current) if self._prepare is not None else None
        except Exception as err:
            index.close()
            raise IndexVersionError(f"version {index.version}: preparing it for queries failed: "
                                    f"{type(err).__name__}: {err}") from err
        return Served(index, extra, mf.utc_now_iso())

    def _swap(self, new: Served) -> None:
        with self._lock:
            old, self._current = self._current, new
            self._last_error = None
        if old is None:
            logger.info("serving %s %s (%d vectors, model %s)", self.index_root, new.version,
                        new.manifest.ntotal, new.manifest.model_id)
        else:
            logger.info("swapped %s from %s to %s (%d vectors, model %s)", self.index_root, old.version,
                        new.version, new.manifest.ntotal, new.manifest.model_id)
            self._retire(old)

    def _retire(self, served: Served) -> None:
        with self._lock:
            served._retired = True
            close_now = served._readers == 0 and not served._closed
            if close_now:
                served._closed = True
        if close_now:
            self._close_index(served)

    @staticmethod
    def _close_index(served: Served) -> None:
        try:
            served.index.close()
        except Exception:  # noqa: BLE001 - closing must not take down a reader or the poller
            logger.exception("closing index version %s failed", served.version)

    def _refuse(self, version: str, key: str, why: str) -> None:
        why = _short(why)
        current = self.current
        keep = f"still serving {current.version}" if current else "nothing is served"
        logger.error("refusing index version %s of %s: %s; %s", version, self.index_root, why, keep)
        with self._lock:
            self._refused.pop(version, None)
            self._refused[version] = why
            while len(self._refused) > MAX_REFUSALS_SHOWN:
                del self._refused[next(iter(self._refused))]
            self._refused_keys[key] = version
            while len(self._refused_keys) > MAX_REFUSALS_KEPT:
                del self._refused_keys[next(iter(self._refused_keys))]
            if current is None:
                self._last_error = f"version {version} was refused: {why}"

    def _note_error(self, why: str) -> None:
        why = _short(why)
        with self._lock:
            repeated, self._last_error = self._last_error == why, why
        if not repeated:  # a poll that keeps failing the same way is logged once
            logger.warning("%s: %s", self.index_root, why)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.config.poll_s):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the poller must outlive any one bad poll
                logger.exception("polling LATEST of %s failed", self.index_root)
