"""Where a version lives: a workdir (WORKDIR/indexes/NAME) or an index root, resolved one way."""

from __future__ import annotations

import json
import logging
from typing import Any

from xmodal_index.sinks import storage
from xmodal_index.sinks.errors import SinkError
from xmodal_index.query.errors import QueryError

logger = logging.getLogger(__name__)

LATEST = "LATEST"


def resolve_index_root(uri: str, index_name: str = "main") -> str:
    """The index root for ``uri``: ``uri`` itself when it holds LATEST, else ``uri/indexes/NAME``
    when that holds LATEST; otherwise ``uri`` (opening it then says nothing is published)."""
    if not isinstance(uri, str) or not uri.strip():
        raise QueryError(f"index location {uri!r} must be a non-empty path or URI")
    if not index_name or "/" in index_name or index_name in (".", ".."):
        raise QueryError(f"index name {index_name!r} must be a plain name such as 'main'")
    if storage.exists(storage.join(uri, LATEST)):
        return uri
    candidate = storage.join(uri, "indexes", index_name)
    if storage.exists(storage.join(candidate, LATEST)):
        return candidate
    return uri


def run_decode_config(index_root: str, run_id: str | None) -> dict[str, Any]:
    """The ``decode`` section of the run that built a version (segment_s, frame_rate_hz, ...),
    read from WORKDIR/runs/RUN_ID/config.json when the index root sits in a workdir; {} otherwise."""
    if not run_id or "/" in run_id:
        return {}
    root = index_root.rstrip("/")
    parts = root.rsplit("/", 2)
    if len(parts) != 3 or parts[1] != "indexes":
        return {}
    uri = storage.join(parts[0] or "/", "runs", run_id, "config.json")
    try:
        conf = json.loads(storage.read_bytes(uri))
    except (SinkError, OSError, ValueError) as err:
        logger.info("no run config for %s (%s): query segmenting uses defaults", run_id, err)
        return {}
    decode = conf.get("decode") if isinstance(conf, dict) else None
    return decode if isinstance(decode, dict) else {}
