"""Dead letters (SPEC 4.2): one Parquet row per failed input (uri, etag, stage,
error_type, message, run_id, at), under ``WORKDIR/deadletter/run_id=RUN_ID/``.

The DAG writes most of them (pipeline/dag.py ``WriteDeadLetters``); the run job
writes the rest (:func:`write_deadletters`: inputs the DAG never saw or lost). This
module is the one reader.
"""

from __future__ import annotations

import datetime
import io
from collections.abc import Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .errors import ObjectNotFoundError
from .parts import list_parts, read_parquet
from .schema import DEADLETTER_SCHEMA
from .workdir import Workdir

COLUMNS = tuple(DEADLETTER_SCHEMA.names)


def read_deadletters(workdir: str, run_id: str) -> list[dict]:
    """The dead-letter rows one run wrote, part by part (none when it wrote none).
    Raises PartReadError naming a part that cannot be read."""
    rows: list[dict] = []
    for uri in list_parts(Workdir(workdir).deadletter(run_id), ".parquet"):
        rows.extend(read_parquet(uri).to_pylist())
    return rows


def run_ids_with_dead_letters(workdir: str) -> list[str]:
    """Run ids that have a dead-letter folder, oldest first (run ids sort by start time)."""
    wd = Workdir(workdir)
    try:
        objects = list(storage.list_objects(wd.deadletter_root))
    except ObjectNotFoundError:
        return []
    runs = {wd.run_id_of(storage.normalize_uri(obj.uri)) for obj in objects}
    return sorted(r for r in runs if r is not None)


def write_deadletters(workdir: str, run_id: str, part: str, rows: Iterable[Mapping[str, object]]) -> str:
    """Write ``rows`` (uri, etag, stage, error_type, message; run_id and at are filled
    in when absent) as ``part-<part>.parquet`` of the run; returns its URI."""
    now = datetime.datetime.now(datetime.timezone.utc)
    full = [{**{"run_id": run_id, "at": now}, **row} for row in rows]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(full, schema=DEADLETTER_SCHEMA), buf)
    uri = storage.join(Workdir(workdir).deadletter(run_id), f"part-{part}.parquet")
    storage.write_bytes(uri, buf.getvalue())
    return uri


__all__ = ["COLUMNS", "read_deadletters", "run_ids_with_dead_letters", "write_deadletters"]
