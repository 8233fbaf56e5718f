"""A lease on a workdir: at most one run at a time plans, commits the ledger and publishes.

The lease is one small JSON object, ``WORKDIR/LEASE``::

    {"holder": ..., "run_id": ..., "host": ..., "pid": ..., "token": ...,
     "acquired_at": ..., "renewed_at": ..., "expires_at": ...}   (times: epoch seconds)

- Acquire is a conditional create: on S3 a PUT with ``If-None-Match: *``; on a local
  disk the file is written under a temporary name and hard-linked into place (the
  link fails when the lease exists), all under an ``flock`` of ``LEASE.lock``.
- A heartbeat thread renews it every ``renew_every_s`` with a compare-and-swap
  (S3: ``If-Match`` on the ETag read last; locally: the token, under the flock).
- A lease past ``expires_at`` may be taken over by anyone, and so may a lease whose
  holder ran on this host under a process id that no longer exists (a killed run).
- Every write on S3 is read back and its token compared, so a store that ignores
  conditional headers still lets at most one of two racing writers believe it won.

Clocks of the machines sharing a workdir must agree to well within ``ttl_s``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import logging
import os
import secrets
import socket
import tempfile
import threading
import time
from typing import Any, Callable, Iterator

import botocore.exceptions

from xmodal_index.sinks import storage
from xmodal_index.sinks.storage import s3
from xmodal_index.sinks.errors import SinkError, StorageError

logger = logging.getLogger(__name__)

LEASE_NAME = "LEASE"


class LeaseError(SinkError):
    """Base error of workdir leases."""


class LeaseHeldError(LeaseError):
    """Another live run holds the lease (after waiting, when asked to wait)."""

    def __init__(self, message: str, holder: "LeaseInfo") -> None:
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

    def to_json(self) -> bytes:
        d = dataclasses.asdict(self)
        d["expires_at_utc"] = _iso(self.expires_at)
        d["acquired_at_utc"] = _iso(self.acquired_at)
        return (json.dumps(d, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, uri: str) -> "LeaseInfo":
        try:
            d = json.loads(data)
            return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})
        except (ValueError, KeyError, TypeError) as err:
            raise LeaseError(f"{uri} is not a lease object ({type(err).__name__}: {err})") from err

    def describe(self) -> str:
        return (f"run {self.run_id} ({self.holder}, pid {self.pid} on {self.host}), "
                f"acquired {_iso(self.acquired_at)}, expires {_iso(self.expires_at)}")


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


def lease_uri(workdir: str) -> str:
    return storage.join(workdir, LEASE_NAME)


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


# ---------------------------------------------------------------- backends
# Each backend stores one LEASE object and offers create-if-absent, read with a
# version, replace-if-version and delete-if-version. Versions are opaque strings
# (the token locally, the ETag on S3); create and replace return the new version,
# or None when the condition did not hold.


class _LocalBackend:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.path = uri[len("file://"):] if uri.startswith("file://") else uri
        self._lock_path = self.path + ".lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise StorageError(f"cannot open the lease lock {self._lock_path!r}: {err.strerror}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the flock

    def _read_unlocked(self) -> tuple[LeaseInfo, str] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise StorageError(f"cannot read the lease {self.uri!r}: {err.strerror}") from err
        try:
            info = LeaseInfo.from_json(data, self.uri)
        except LeaseError:
            logger.warning("%s is not a valid lease object: treating it as expired", self.uri)
            info = _CORRUPT
        return info, info.token

    def _write_tmp(self, info: LeaseInfo) -> str:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path) or ".", prefix=".tmp-LEASE-")
        with os.fdopen(fd, "wb") as f:
            f.write(info.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        return tmp

    def create(self, info: LeaseInfo) -> str | None:
        with self._locked():
            tmp = self._write_tmp(info)
            try:
                os.link(tmp, self.path)  # atomic create-if-absent of the complete content
                return info.token
            except FileExistsError:
                return None
            except OSError as err:
                raise StorageError(f"cannot create the lease {self.uri!r}: {err.strerror}") from err
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def read(self) -> tuple[LeaseInfo, str] | None:
        with self._locked():
            return self._read_unlocked()

    def replace(self, version: str, info: LeaseInfo) -> str | None:
        with self._locked():
            current = self._read_unlocked()
            if current is None or current[1] != version:
                return None
            tmp = self._write_tmp(info)
            try:
                os.replace(tmp, self.path)
            except OSError as err:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise StorageError(f"cannot write the lease {self.uri!r}: {err.strerror}") from err
            return info.token

    def delete(self, version: str) -> bool:
        with self._locked():
            current = self._read_unlocked()
            if current is None or current[1] != version:
                return False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return True


_CONFLICT_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


def _code(err: botocore.exceptions.ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


class _S3Backend:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.bucket, self.key = s3.split_uri(uri)

    def _put(self, info: LeaseInfo, **condition: str) -> str | None:
        client = s3.get_client()
        try:
            client.put_object(Bucket=self.bucket, Key=self.key, Body=info.to_json(),
                              ContentType="application/json", **condition)
        except botocore.exceptions.ClientError as err:
            if _code(err) in _CONFLICT_CODES or _code(err) in ("NoSuchKey", "404"):
                return None
            raise s3.map_error(err, self.uri, "write the lease") from err
        except botocore.exceptions.BotoCoreError as err:
            raise s3.map_error(err, self.uri, "write the lease") from err
        # read back: a store that ignores conditional headers may have let a racing writer win
        current = self.read()
        if current is None or current[0].token != info.token:
            return None
        return current[1]

    def create(self, info: LeaseInfo) -> str | None:
        return self._put(info, IfNoneMatch="*")

    def read(self) -> tuple[LeaseInfo, str] | None:
        client = s3.get_client()
        try:
            resp = client.get_object(Bucket=self.bucket, Key=self.key)
            data = resp["Body"].read()
        except botocore.exceptions.ClientError as err:
            if _code(err) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise s3.map_error(err, self.uri, "read the lease") from err
        except botocore.exceptions.BotoCoreError as err:
            raise s3.map_error(err, self.uri, "read the lease") from err
        etag = resp.get("ETag", "")
        try:
            return LeaseInfo.from_json(data, self.uri), etag
        except LeaseError:
            logger.warning("%s is not a valid lease object: treating it as expired", self.uri)
            return _CORRUPT, etag

    def replace(self, version: str, info: LeaseInfo) -> str | None:
        return self._put(info, IfMatch=version)

    def delete(self, version: str) -> bool:
        client = s3.get_client()
        try:
            client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=version)
            return True
        except botocore.exceptions.ClientError as err:
            if _code(err) in _CONFLICT_CODES or _code(err) in ("NoSuchKey", "404"):
                return False
            if _code(err) == "NotImplemented":  # a store without conditional deletes
                current = self.read()
                if current is None or current[1] != version:
                    return False
                storage.delete(self.uri)
                return True
            raise s3.map_error(err, self.uri, "delete the lease") from err
        except botocore.exceptions.BotoCoreError as err:
            raise s3.map_error(err, self.uri, "delete the lease") from err


# Stands for an unreadable lease object: expired, so it can be replaced.
_CORRUPT = LeaseInfo(holder="<unreadable>", run_id="<unknown>", host="<unknown>", pid=0, token="",
                     acquired_at=0.0, renewed_at=0.0, expires_at=0.0)


def _backend(uri: str) -> Any:
    return _S3Backend(uri) if storage.is_s3(uri) else _LocalBackend(uri)


# ---------------------------------------------------------------- the lease


class Lease:
    """Exclusive, expiring hold on one LEASE object, renewed by a heartbeat thread.

    Use as a context manager, or call :meth:`acquire` and :meth:`release`. Call
    :meth:`confirm` right before any commit: it renews the lease synchronously and
    raises LeaseLostError when another run has taken it over.
    """

    def __init__(self, uri: str, run_id: str, config: LeaseConfig = LeaseConfig(), *,
                 holder: str = "xmodal-index run", clock: Callable[[], float] = time.time) -> None:
        self.uri = uri
        self.run_id = run_id
        self.config = config
        self.holder = holder
        self._clock = clock
        self._backend = _backend(uri)
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

    def _new_info(self, acquired_at: float | None = None) -> LeaseInfo:
        now = self._clock()
        return LeaseInfo(holder=self.holder, run_id=self.run_id, host=self._host, pid=os.getpid(),
                         token=self._token, acquired_at=now if acquired_at is None else acquired_at,
                         renewed_at=now, expires_at=now + self.config.ttl_s)

    def _stale(self, info: LeaseInfo) -> str | None:
        """Why ``info`` may be taken over, or None while its holder may still be alive."""
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
            mine = self._new_info()
            version = self._backend.create(mine)
            if version is not None:
                return self._acquired(mine, version)
            current = self._backend.read()
            if current is None:
                continue  # released in between: try again at once
            info, version = current
            why = self._stale(info)
            if why is not None:
                new_version = self._backend.replace(version, mine)
                if new_version is not None:
                    logger.warning("took over the lease %s of %s: %s", self.uri, info.describe(), why)
                    return self._acquired(mine, new_version)
                continue  # someone else changed it first: look again
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

    def _acquired(self, info: LeaseInfo, version: str) -> LeaseInfo:
        self._info, self._version, self._lost = info, version, None
        _held_tokens.add(self._token)
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.run_id}", daemon=True)
        self._thread.start()
        logger.info("acquired the lease %s until %s", self.uri, _iso(info.expires_at))
        return info

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours (never raises)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if self._info is None:
                return
            version, self._info, self._version = self._version, None, None
            _held_tokens.discard(self._token)
            if self._lost is not None:
                return
            try:
                if not self._backend.delete(version or ""):
                    logger.warning("the lease %s was no longer ours when released", self.uri)
            except SinkError as err:
                logger.warning("could not release the lease %s (it expires by itself): %s", self.uri, err)

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------ renew

    def confirm(self) -> None:
        """Renew now; raises LeaseLostError if the lease is no longer ours."""
        with self._lock:
            self._renew_locked()

    def _renew_locked(self) -> None:
        if self._info is None:
            raise LeaseLostError(f"the lease {self.uri} is not held")
        if self._lost is not None:
            raise LeaseLostError(self._lost)
        info = self._new_info(acquired_at=self._info.acquired_at)
        version = self._backend.replace(self._version or "", info)
        if version is None:
            current = self._backend.read()
            holder = f": now held by {current[0].describe()}" if current is not None else ""
            self._lost = f"lost the workdir lease {self.uri}{holder}"
            raise LeaseLostError(self._lost)
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
    current = _backend(lease_uri(workdir)).read()
    return None if current is None else current[0]


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
