"""Where a version lives: a workdir (WORKDIR/indexes/NAME) or an index root, resolved one way."""

from __future__ import annotations

import json
import logging
from typing import Any

from xmodal_index.sinks import storage
from xmodal_index.sinks import workdir as workdir_layout
from xmodal_index.sinks.errors import SinkError
from xmodal_index.sinks.workdir import WorkdirLayoutError

from .errors import QueryError

logger = logging.getLogger(__name__)

LATEST = "LATEST"


def resolve_index_root(uri: str, index_name: str = "main") -> str:
    """The index root for ``uri`` (sinks/workdir.py, the one resolver): ``uri`` itself when
    it holds LATEST, else ``uri/indexes/NAME`` when that holds anything; otherwise ``uri``
    (opening it then says nothing is published)."""
    try:
        return workdir_layout.resolve_index_root(uri, index_name)
    except WorkdirLayoutError as err:
        raise QueryError(str(err)) from err


def run_decode_config(index_root: str, run_id: str | None) -> dict[str, Any]:
    """The ``decode`` section of the run that built a version (segment_s, frame_rate_hz, ...),
    read from WORKDIR/runs/RUN_ID/config.json when the index root sits in a workdir; {} otherwise."""
    workdir = workdir_layout.Workdir.of_index_root(index_root)
    if not run_id or workdir is None:
        return {}
    try:
        uri = workdir.run_config(run_id)
    except WorkdirLayoutError:
        return {}
    try:
        conf = json.loads(storage.read_bytes(uri))
    except (SinkError, OSError, ValueError) as err:
        logger.info("no run config for %s (%s): query segmenting uses defaults", run_id, err)
        return {}
    decode = conf.get("decode") if isinstance(conf, dict) else None
    return decode if isinstance(decode, dict) else {}
