"""Batches of queries from a JSONL file: one object per line, each checked on its own.

A line holds exactly one of text/audio/image/video/embedding, an optional ``id``
(default: the line number), an optional ``modality`` (streams to search, a list
or comma-separated) and, for audio and video, optional ``start_s``/``end_s``.
Relative media paths resolve against the JSONL file's folder, not the current
directory. A bad line becomes a ``LineError`` naming ``FILE:LINE``; the lines
after it are still read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any

from .errors import BadQueryError, QueryError
from .request import INPUT_KEYS, Query, parse_modalities

LINE_KEYS = (*INPUT_KEYS, "id", "modality", "start_s", "end_s")
MAX_LINE_CHARS = 1 << 20


@dataclasses.dataclass(frozen=True)
class QueryLine:
    """One good line: where it is, its id, the query, and the streams it searches (None = all)."""

    where: str  # "FILE:LINE"
    id: Any
    query: Query
    modalities: tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class LineError:
    """One bad line: where it is and why."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def read_queries(path: str) -> Iterator[QueryLine | LineError]:
    """Each non-blank line of ``path`` as a ``QueryLine`` or a ``LineError``, in order."""
    try:
        f = open(path, encoding="utf-8", errors="strict")
    except OSError as err:
        raise QueryError(f"cannot read the queries file {path!r}: {err.strerror or err}") from err
    base = os.path.dirname(os.path.abspath(path))
    with f:
        n = 0
        while True:
            n += 1
            where = f"{path}:{n}"
            try:
                line = f.readline(MAX_LINE_CHARS + 1)
            except UnicodeDecodeError as err:
                yield LineError(where, f"not UTF-8 text ({err.reason}); the rest of the file is skipped")
                return
            if not line:
                return
            if len(line) > MAX_LINE_CHARS:
                yield LineError(where, f"line longer than {MAX_LINE_CHARS} characters; the rest of the file "
                                       "is skipped")
                return
            if not line.strip():
                continue
            try:
                yield parse_line(line, where, base, default_id=n)
            except BadQueryError as err:
                yield LineError(where, str(err))


def parse_line(line: str, where: str, base_dir: str, default_id: Any) -> QueryLine:
    try:
        obj = json.loads(line)
    except ValueError as err:
        raise BadQueryError(f"not a JSON object: {err}") from err
    if not isinstance(obj, dict):
        raise BadQueryError(f"not a JSON object: {line.strip()[:80]}")
    unknown = sorted(set(obj) - set(LINE_KEYS))
    if unknown:
        raise BadQueryError(f"unknown keys {unknown}: a line takes {', '.join(LINE_KEYS)}")
    given = [k for k in INPUT_KEYS if k in obj]
    if len(given) != 1:
        raise BadQueryError(f"needs exactly one of {', '.join(INPUT_KEYS)}, got {', '.join(given) or 'none'}")
    modality = given[0]
    value = obj[modality]
    if modality in ("audio", "image", "video"):
        if not isinstance(value, str) or not value:
            raise BadQueryError(f"{modality} must be a file path, got {value!r}")
        joined = value if os.path.isabs(value) else os.path.join(base_dir, value)
        norm = os.path.normpath(joined)  # shown in labels; kept only where it names the same file
        value = norm if os.path.exists(norm) and os.path.exists(joined) and os.path.samefile(norm, joined) else joined
    qid = obj.get("id", default_id)
    if not isinstance(qid, (str, int)) or isinstance(qid, bool):
        raise BadQueryError(f"id must be a string or an integer, got {qid!r}")
    start_s, end_s = obj.get("start_s"), obj.get("end_s")
    query = Query(modality, value, start_s, end_s)
    return QueryLine(where, qid, query, parse_modalities(obj.get("modality"), "modality"))
