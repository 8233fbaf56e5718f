"""Files written in parts (``part-00003-of-00016.parquet``, ``part-*.jsonl``) under one folder.

Writers (Beam's file sinks, the run job) write parts under temporary names and
rename them; only the final ``part-*`` files directly under the folder count, never
Beam's temporary folders or anything else found there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .errors import ObjectNotFoundError, SinkError


class PartReadError(SinkError):
    """A part file cannot be read or parsed."""


def list_parts(prefix: str, suffix: str) -> list[str]:
    """The ``part-*<suffix>`` objects directly under ``prefix``, sorted (none when it is missing)."""
    base = storage.normalize_uri(prefix).rstrip("/") + "/"
    try:
        objects = list(storage.list_objects(base))
    except ObjectNotFoundError:
        return []
    out = []
    for obj in objects:
        uri = storage.normalize_uri(obj.uri)
        rel = uri[len(base):] if uri.startswith(base) else ""
        if rel and "/" not in rel and rel.startswith("part-") and rel.endswith(suffix):
            out.append(obj.uri)
    return sorted(out)


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet part, streamed from storage."""
    try:
        with storage.open_read(uri) as f:
            return pq.read_table(f, columns=columns)
    except (pa.ArrowException, OSError) as err:
        raise PartReadError(f"cannot read {uri}: {err}") from err


def count_parquet_rows(uris: Iterable[str]) -> int:
    """Rows of the Parquet parts, from their footers."""
    total = 0
    for uri in uris:
        try:
            with storage.open_read(uri) as f:
                total += pq.ParquetFile(f).metadata.num_rows
        except (pa.ArrowException, OSError) as err:
            raise PartReadError(f"cannot read {uri}: {err}") from err
    return total


def read_lines(uris: Iterable[str]) -> Iterator[str]:
    """The non-blank lines of text parts (UTF-8), part by part."""
    for uri in uris:
        try:
            text = storage.read_bytes(uri).decode()
        except UnicodeDecodeError as err:
            raise PartReadError(f"{uri} is not UTF-8 text: {err}") from err
        for line in text.splitlines():
            if line.strip():
                yield line
