"""The ledger: what has been processed (SPEC 4.2), one snapshot per completed run.

``ledger/ledger-RUN_ID.parquet`` holds one row per known object (uri, etag, size,
mtime, state, segments, model_id, run_id: the run whose rows are live for it);
``ledger/CURRENT`` names the newest committed snapshot and is written last, so a
run that crashes before committing leaves the previous state in force.
``ledger/PUBLISHED`` names the snapshot the published index version reflects.

An entry's ``run_id`` says which run's Parquet parts hold its live rows: the live
rows of the workdir are exactly the rows matching an ``indexed`` entry's
(uri, etag, run_id, model_id). Parts of runs that crashed before their snapshot
was committed are named by no entry, so readers never see them.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .errors import ObjectNotFoundError, SinkError
from .schema import LEDGER_SCHEMA
from .workdir import Workdir

STATES = ("indexed", "failed", "deleted")


class LedgerError(SinkError):
    """A ledger snapshot is unreadable or holds invalid entries."""


@dataclasses.dataclass(frozen=True)
class LedgerEntry:
    uri: str
    etag: str
    size: int
    mtime: float
    state: str
    segments: int
    model_id: str
    run_id: str


def _root(workdir: str) -> str:
    return Workdir(workdir).ledger


def snapshot_name(snapshot_uri: str) -> str:
    """``.../ledger/ledger-RUN.parquet`` -> ``ledger-RUN.parquet`` (what CURRENT and PUBLISHED hold)."""
    return snapshot_uri.rstrip("/").rsplit("/", 1)[-1]


LiveKey = tuple[str, str, str, str]  # uri, etag, run_id, model_id


def live_keys(entries: Iterable[LedgerEntry]) -> frozenset[LiveKey]:
    """What identifies the live rows of ``entries``: two ledgers with the same live
    keys describe the same index content."""
    return frozenset((e.uri, e.etag, e.run_id, e.model_id) for e in entries if e.state == "indexed")


def _read_name(uri: str) -> str | None:
    try:
        return storage.read_bytes(uri).decode().strip() or None
    except ObjectNotFoundError:
        return None


def ledger_snapshot_name(workdir: str) -> str | None:
    """File name of the committed ledger snapshot (None for a new workdir)."""
    return _read_name(storage.join(_root(workdir), "CURRENT"))


def published_snapshot_name(workdir: str) -> str | None:
    """File name of the ledger snapshot the published index version was built from."""
    return _read_name(storage.join(_root(workdir), "PUBLISHED"))


def mark_published(workdir: str, snapshot_uri: str) -> None:
    """Record that the index now reflects ``snapshot_uri`` (so a later run knows
    whether an earlier, unpublished run left changes that still need a version)."""
    name = snapshot_name(snapshot_uri)
    storage.write_bytes(storage.join(_root(workdir), "PUBLISHED"), (name + "\n").encode())


def read_ledger(workdir: str) -> dict[str, LedgerEntry]:
    """The committed ledger state, by uri (empty for a new workdir)."""
    name = ledger_snapshot_name(workdir)
    if name is None:
        return {}
    return read_snapshot(workdir, name)


def read_snapshot(workdir: str, name: str) -> dict[str, LedgerEntry]:
    """One ledger snapshot (``ledger-RUN.parquet``, e.g. the one an index version was built from), by uri."""
    if "/" in name or not (name.startswith("ledger-") and name.endswith(".parquet")):
        raise LedgerError(f"{name!r} is not a ledger snapshot name (ledger-RUN_ID.parquet)")
    uri = storage.join(_root(workdir), name)
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
        return {row["uri"]: LedgerEntry(**row) for row in table.to_pylist()}
    except ObjectNotFoundError as err:
        raise LedgerError(f"the ledger snapshot {uri!r} does not exist") from err
    except (pa.ArrowException, TypeError) as err:
        raise LedgerError(f"cannot read the ledger snapshot {uri!r}: {err}") from err


def write_ledger(workdir: str, run_id: str, entries: Iterable[LedgerEntry]) -> str:
    """Write a full snapshot, then point CURRENT at it. Returns the snapshot URI."""
    rows = sorted((dataclasses.asdict(e) for e in entries), key=lambda r: r["uri"])
    for r in rows:
        if r["state"] not in STATES:
            raise LedgerError(f"ledger state {r['state']!r} of {r['uri']!r} is not one of {', '.join(STATES)}")
    table = pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    name = f"ledger-{run_id}.parquet"
    uri = storage.join(_root(workdir), name)
    storage.write_bytes(uri, buf.getvalue())
    storage.write_bytes(storage.join(_root(workdir), "CURRENT"), (name + "\n").encode())
    return uri
