"""A lease on a workdir: at most one run at a time plans, commits the ledger and publishes.

The lease is one small JSON object, ``WORKDIR/LEASE``::

    {"holder": ..., "run_id": ..., "host": ..., "pid": ..., "token": ..., "generation": ...,
     "released": ..., "acquired_at": ..., "renewed_at": ..., "expires_at": ...}
    (times: epoch seconds)

It is written only with the storage layer's conditional writes
(:mod:`xmodal_index.sinks.storage.conditional`), so of several runs racing for it
exactly one wins:

- Acquire creates it if absent, or replaces a released, expired or orphaned one (a
  holder that ran on this host under a process id that no longer exists) if it is
  still at the version just read.
- A heartbeat thread renews it every ``renew_every_s`` with the same compare-and-swap.
- Release marks it released (a compare-and-swap too) instead of deleting it, so the
  ``generation`` survives: it grows by one on every acquisition and is the fencing
  token of the holder (:attr:`Lease.generation`). A lease object that cannot be parsed
  counts as expired with generation 0.

Clocks of the machines sharing a workdir must agree to well within ``ttl_s``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable

from .. import storage
from ..errors import ObjectNotFoundError, PreconditionFailedError, SinkError
from ..workdir import LEASE, Workdir

logger = logging.getLogger(__name__)

LEASE_NAME = LEASE  # WORKDIR/LEASE (sinks/workdir.py)


class LeaseError(SinkError):
    """Base error of workdir leases."""


class LeaseHeldError(LeaseError):
    """Another live run holds the lease (after waiting, when asked to wait)."""

    def __init__(self, message: str, holder: LeaseInfo) -> None:
        super().__init__(message)
        self.holder = holder


class LeaseLostError(LeaseError):
    """This run's lease expired or was taken over: it must not commit or publish."""


@dataclasses.dataclass(frozen=True)
class LeaseConfig:
    """How a run holds its workdir lease.

    ttl_s: a lease not renewed for this long may be taken over.
    renew_every_s: heartbeat period; 0 means ttl_s / 4.
    wait_s: how long acquire waits for a held lease before giving up (0: no wait).
    poll_s: how often a waiting acquire looks again.
    """

    ttl_s: float = 300.0
    renew_every_s: float = 0.0
    wait_s: float = 0.0
    poll_s: float = 2.0

    def __post_init__(self) -> None:
        if self.ttl_s <= 0:
            raise ValueError(f"lease {self.ttl_s = } must be > 0")
        if self.renew_every_s < 0:
            raise ValueError(f"lease {self.renew_every_s = } must be >= 0 (0 = ttl_s / 4)")
        if self.renew_every_s and self.renew_every_s >= self.ttl_s:
            raise ValueError(f"lease {self.renew_every_s = } must be < ttl_s ({self.ttl_s})")
        if self.wait_s < 0:
            raise ValueError(f"lease {self.wait_s = } must be >= 0")
        if self.poll_s <= 0:
            raise ValueError(f"lease {self.poll_s = } must be > 0")

    @property
    def heartbeat_s(self) -> float:
        return self.renew_every_s or self.ttl_s / 4


@dataclasses.dataclass(frozen=True)
class LeaseInfo:
    """The content of a LEASE object."""

    holder: str
    run_id: str
    host: str
    pid: int
    token: str
    acquired_at: float
    renewed_at: float
    expires_at: float
    generation: int = 0  # one more on every acquisition: the holder's fencing token
    released: bool = False  # released by its holder: free to acquire

    def to_json(self) -> bytes:
        d = dataclasses.asdict(self)
        d["expires_at_utc"] = _iso(self.expires_at)
        d["acquired_at_utc"] = _iso(self.acquired_at)
        return (json.dumps(d, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, uri: str) -> LeaseInfo:
        try:
            d = json.loads(data)
            return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)
                          if f.name in d or f.default is dataclasses.MISSING})
        except (ValueError, KeyError, TypeError) as err:
            raise LeaseError(f"{uri} is not a lease object ({type(err).__name__}: {err})") from err

    def describe(self) -> str:
        return (f"run {self.run_id} ({self.holder}, pid {self.pid} on {self.host}, generation {self.generation}), "
                f"acquired {_iso(self.acquired_at)}, expires {_iso(self.expires_at)}")


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


def lease_uri(workdir: str) -> str:
    return Workdir(workdir).lease


# Tokens of the leases this process holds now: a lease naming this process but none
# of these tokens was left behind by an earlier holder in this process.
_held_tokens: set[str] = set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


# Stands for an unreadable lease object: expired, so it can be replaced.
_CORRUPT = LeaseInfo(holder="<unreadable>", run_id="<unknown>", host="<unknown>", pid=0, token="",
                     acquired_at=0.0, renewed_at=0.0, expires_at=0.0)


def _read(uri: str) -> tuple[LeaseInfo, str] | None:
    """The lease object at ``uri`` and its storage version (None when there is none)."""
    try:
        data, version = storage.read_versioned(uri)
    except ObjectNotFoundError:
        return None
    try:
        return LeaseInfo.from_json(data, uri), version
    except LeaseError:
        logger.warning("%s is not a valid lease object: treating it as expired", uri)
        return _CORRUPT, version


# ---------------------------------------------------------------- the lease


class Lease:
    """Exclusive, expiring hold on one LEASE object, renewed by a heartbeat thread.

    Use as a context manager, or call :meth:`acquire` and :meth:`release`. Call
    :meth:`confirm` right before any commit: it renews the lease synchronously and
    raises LeaseLostError when another run has taken it over. :meth:`check` asks the
    same question with a read only; :attr:`generation` is the fencing token.
    """

    def __init__(self, uri: str, run_id: str, config: LeaseConfig = LeaseConfig(), *,
                 holder: str = "xmodal-index run", clock: Callable[[], float] = time.time) -> None:
        self.uri = uri
        self.run_id = run_id
        self.config = config
        self.holder = holder
        self._clock = clock
        self._token = secrets.token_hex(16)
        self._host = socket.gethostname()
        self._info: LeaseInfo | None = None
        self._version: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None

    # ------------------------------------------------------------ state

    @property
    def held(self) -> bool:
        return self._info is not None and self._lost is None

    @property
    def info(self) -> LeaseInfo | None:
        return self._info

    @property
    def generation(self) -> int:
        """The fencing token of this holding: larger than that of every earlier holder."""
        if self._info is None:
            raise LeaseError(f"the lease {self.uri} is not held")
        return self._info.generation

    def _new_info(self, generation: int, acquired_at: float | None = None, released: bool = False) -> LeaseInfo:
        now = self._clock()
        return LeaseInfo(holder=self.holder, run_id=self.run_id, host=self._host, pid=os.getpid(),
                         token=self._token, acquired_at=now if acquired_at is None else acquired_at,
                         renewed_at=now, expires_at=now if released else now + self.config.ttl_s,
                         generation=generation, released=released)

    def _stale(self, info: LeaseInfo) -> str | None:
        """Why ``info`` may be taken over, or None while its holder may still be alive."""
        if info.released:
            return "released"
        if info.expires_at <= self._clock():
            return f"expired at {_iso(info.expires_at)}"
        if info.host == self._host:
            if info.pid == os.getpid() and info.token not in _held_tokens:
                return "it was left behind by an earlier run in this process"
            if info.pid != os.getpid() and not _pid_alive(info.pid):
                return f"its process {info.pid} on {info.host} is gone"
        return None

    # ------------------------------------------------------------ acquire / release

    def acquire(self, on_wait: Callable[[LeaseInfo], None] | None = None) -> LeaseInfo:
        """Take the lease, waiting up to ``config.wait_s`` while another run holds it.

        Raises LeaseHeldError naming the holder when it is still held after waiting.
        """
        if self._info is not None:
            raise LeaseError(f"{self.uri}: this lease object is already acquired")
        deadline = time.monotonic() + self.config.wait_s
        told = False
        while True:
            taken = self._try_take()
            if taken is None:
                continue  # it changed under us: look again at once
            if taken.token == self._token:
                return taken
            info = taken
            left = deadline - time.monotonic()
            if left <= 0:
                waited = f" after waiting {self.config.wait_s:g} s" if self.config.wait_s else ""
                raise LeaseHeldError(f"the workdir lease {self.uri} is held by {info.describe()}{waited}: "
                                     "another run is working on this workdir", info)
            if not told:
                told = True
                logger.info("waiting up to %.0f s for the lease %s held by %s", left, self.uri, info.describe())
                if on_wait is not None:
                    on_wait(info)
            time.sleep(min(self.config.poll_s, left))

    def _try_take(self) -> LeaseInfo | None:
        """One attempt: our new LeaseInfo when taken, the holder's while a live run
        holds it, None when the object changed between the read and the write."""
        current = _read(self.uri)
        why = None if current is None else self._stale(current[0])
        if current is not None and why is None:
            return current[0]
        # known as held before it is written: no thread of this process may take it for orphaned
        _held_tokens.add(self._token)
        try:
            if current is None:
                mine = self._new_info(generation=1)
                return self._acquired(mine, storage.create_if_absent(self.uri, mine.to_json()))
            info, version = current
            mine = self._new_info(generation=info.generation + 1)
            new_version = storage.replace_if_match(self.uri, mine.to_json(), version)
        except PreconditionFailedError:
            _held_tokens.discard(self._token)
            return None
        except BaseException:
            _held_tokens.discard(self._token)
            raise
        if not info.released:
            logger.warning("took over the lease %s of %s: %s", self.uri, info.describe(), why)
        return self._acquired(mine, new_version)

    def _acquired(self, info: LeaseInfo, version: str) -> LeaseInfo:
        self._info, self._version, self._lost = info, version, None
        _held_tokens.add(self._token)
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.run_id}", daemon=True)
        self._thread.start()
        logger.info("acquired the lease %s (generation %d) until %s", self.uri, info.generation,
                    _iso(info.expires_at))
        return info

    def release(self) -> None:
        """Stop the heartbeat and mark the lease released if it is still ours (never raises)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if self._info is None:
                return
            info, version, self._info, self._version = self._info, self._version, None, None
            _held_tokens.discard(self._token)
            if self._lost is not None:
                return
            released = self._new_info(info.generation, acquired_at=info.acquired_at, released=True)
            try:
                storage.replace_if_match(self.uri, released.to_json(), version or "")
            except PreconditionFailedError:
                logger.warning("the lease %s was no longer ours when released", self.uri)
            except SinkError as err:
                logger.warning("could not release the lease %s (it expires by itself): %s", self.uri, err)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------ renew and check

    def confirm(self) -> None:
        """Renew now; raises LeaseLostError if the lease is no longer ours."""
        with self._lock:
            self._renew_locked()

    def check(self) -> None:
        """Raise LeaseLostError unless the stored lease is still this holding (read only)."""
        with self._lock:
            if self._info is None:
                raise LeaseLostError(f"the lease {self.uri} is not held")
            if self._lost is not None:
                raise LeaseLostError(self._lost)
            current = _read(self.uri)
            if current is None or current[0].token != self._token or current[0].generation != self._info.generation:
                self._lost = self._lost_message(current)
                raise LeaseLostError(self._lost)
            if current[0].expires_at <= self._clock():
                raise LeaseLostError(f"the workdir lease {self.uri} expired at {_iso(current[0].expires_at)}")

    def _lost_message(self, current: tuple[LeaseInfo, str] | None) -> str:
        holder = f": now held by {current[0].describe()}" if current is not None else ""
        return f"lost the workdir lease {self.uri}{holder}"

    def _renew_locked(self) -> None:
        if self._info is None:
            raise LeaseLostError(f"the lease {self.uri} is not held")
        if self._lost is not None:
            raise LeaseLostError(self._lost)
        info = self._new_info(self._info.generation, acquired_at=self._info.acquired_at)
        try:
            version = storage.replace_if_match(self.uri, info.to_json(), self._version or "")
        except PreconditionFailedError:
            self._lost = self._lost_message(_read(self.uri))
            raise LeaseLostError(self._lost) from None
        self._info, self._version = info, version

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.config.heartbeat_s):
            with self._lock:
                if self._info is None or self._lost is not None:
                    return
                try:
                    self._renew_locked()
                except LeaseLostError as err:
                    logger.error("%s", err)
                    return
                except SinkError as err:
                    expires = self._info.expires_at
                    if self._clock() >= expires:
                        self._lost = f"could not renew the lease {self.uri} before it expired: {err}"
                        logger.error("%s", self._lost)
                        return
                    logger.warning("could not renew the lease %s (retrying; it expires %s): %s",
                                   self.uri, _iso(expires), err)


def read_lease(workdir: str) -> LeaseInfo | None:
    """The current lease of ``workdir`` (None when no run holds it)."""
    current = _read(lease_uri(workdir))
    if current is None or current[0].released:
        return None
    return current[0]


__all__ = [
    "LEASE_NAME",
    "Lease",
    "LeaseConfig",
    "LeaseError",
    "LeaseHeldError",
    "LeaseInfo",
    "LeaseLostError",
    "lease_uri",
    "read_lease",
]
