"""The workdir layout (SPEC 4.2): the one module that spells it.

```
WORKDIR/
  embeddings/run_id=RUN_ID/part-*.parquet     embedding rows (sinks/schema.py)
  deadletter/run_id=RUN_ID/part-*.parquet     one row per failed input
  ledger/                                     what has been processed (sinks/ledger.py)
  runs/RUN_ID/summary.json, config.json, worklist.jsonl, outcomes/part-*.jsonl,
              encoder/ (the checkpoint staged for the DAG's workers)
  indexes/NAME/                               index versions and LATEST (sinks/index/)
  LEASE                                       the run lease (sinks/storage/lease.py)
```

Every other module asks a :class:`Workdir` for these locations. A Workdir holds its
URI in one spelling (a local path or ``file://`` URI becomes the absolute path, the
form storage listings return; s3:// URIs stay as given, without a trailing slash),
so locations built here compare equal to listed ones.

Run ids and index names are single path components: anything else raises
:class:`WorkdirLayoutError` naming the value.
"""

from __future__ import annotations

import dataclasses
import re

from . import storage
from .errors import SinkError

EMBEDDINGS = "embeddings"
DEADLETTER = "deadletter"
LEDGER = "ledger"
RUNS = "runs"
INDEXES = "indexes"
LEASE = "LEASE"
RUN_DIR_PREFIX = "run_id="  # embeddings/ and deadletter/ hold one run_id=RUN_ID folder per run
SUMMARY = "summary.json"
RUN_CONFIG = "config.json"
WORKLIST = "worklist.jsonl"
OUTCOMES = "outcomes"
STAGED_ENCODER = "encoder"
REPORT = "report.html"
JOB_CONFIG = "job-config.json"  # the run's job config alone, for the report's --retry-failed command
DEFAULT_INDEX_NAME = "main"

_NAME = re.compile(r"[^/\\\x00]+")


class WorkdirLayoutError(SinkError, ValueError):
    """A run id or index name that cannot be one path component of the workdir."""


def _component(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value in (".", ".."):
        raise WorkdirLayoutError(f"{kind} {value!r} must be one plain name (no '/', not '.' or '..')")
    return value


@dataclasses.dataclass(frozen=True)
class Workdir:
    """Locations inside one workdir (local path, ``file://`` or ``s3://`` URI)."""

    uri: str

    def __post_init__(self) -> None:
        if not isinstance(self.uri, str) or not self.uri.strip():
            raise WorkdirLayoutError(f"workdir {self.uri!r} must be a non-empty path or URI")
        object.__setattr__(self, "uri", _normalize(self.uri))

    @classmethod
    def of_index_root(cls, index_root: str) -> Workdir | None:
        """The workdir holding ``index_root`` when it is ``WORKDIR/indexes/NAME``, else None."""
        parts = _normalize(index_root).rsplit("/", 2)
        if len(parts) == 3 and parts[1] == INDEXES and parts[2]:
            return cls(parts[0] or "/")
        return None

    def _join(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    # --------------------------------------------------------------- runs

    @property
    def embeddings_root(self) -> str:
        return self._join(EMBEDDINGS)

    def embeddings(self, run_id: str) -> str:
        """The folder of the Parquet parts one run wrote."""
        return self._join(EMBEDDINGS, RUN_DIR_PREFIX + _component("run id", run_id))

    @property
    def deadletter_root(self) -> str:
        return self._join(DEADLETTER)

    def deadletter(self, run_id: str) -> str:
        """The folder of the dead-letter parts one run wrote."""
        return self._join(DEADLETTER, RUN_DIR_PREFIX + _component("run id", run_id))

    @property
    def runs_root(self) -> str:
        return self._join(RUNS)

    def run_dir(self, run_id: str) -> str:
        return self._join(RUNS, _component("run id", run_id))

    def summary(self, run_id: str) -> str:
        return storage.join(self.run_dir(run_id), SUMMARY)

    def run_config(self, run_id: str) -> str:
        """The resolved config a run wrote beside its outputs."""
        return storage.join(self.run_dir(run_id), RUN_CONFIG)

    def report(self, run_id: str) -> str:
        """The run's self-contained HTML report."""
        return storage.join(self.run_dir(run_id), REPORT)

    def job_config(self, run_id: str) -> str:
        """The run's job config alone, which the report's --retry-failed command reads."""
        return storage.join(self.run_dir(run_id), JOB_CONFIG)

    def worklist(self, run_id: str) -> str:
        return storage.join(self.run_dir(run_id), WORKLIST)

    def outcomes(self, run_id: str) -> str:
        """The folder of the per-item outcome parts (JSON lines) the DAG wrote."""
        return storage.join(self.run_dir(run_id), OUTCOMES)

    def staged_encoder(self, run_id: str) -> str:
        """Where a run stages its encoder checkpoint so that the DAG's workers can read it."""
        return storage.join(self.run_dir(run_id), STAGED_ENCODER)

    # --------------------------------------------------------------- state

    @property
    def ledger(self) -> str:
        return self._join(LEDGER)

    @property
    def lease(self) -> str:
        return self._join(LEASE)

    @property
    def indexes(self) -> str:
        return self._join(INDEXES)

    def index_root(self, name: str = DEFAULT_INDEX_NAME) -> str:
        return self._join(INDEXES, _component("index name", name))

    def run_id_of(self, uri: str) -> str | None:
        """The run id of an object listed under embeddings/ or deadletter/ (None elsewhere)."""
        for root in (self.embeddings_root, self.deadletter_root):
            base = root + "/"
            if uri.startswith(base):
                first = uri[len(base):].split("/", 1)[0]
                if first.startswith(RUN_DIR_PREFIX) and len(first) > len(RUN_DIR_PREFIX):
                    return first[len(RUN_DIR_PREFIX):]
        return None


def _normalize(uri: str) -> str:
    out = storage.normalize_uri(uri)
    return out.rstrip("/") or out


def resolve_index_root(uri: str, index_name: str = DEFAULT_INDEX_NAME) -> str:
    """The index root a user means by ``--index`` / ``--workdir`` URI.

    ``uri`` itself when it holds LATEST; else ``uri/indexes/NAME`` when anything is
    there (LATEST or unpublished versions); else ``uri`` (opening it then says
    nothing is published there). The result is in the Workdir spelling.
    """
    from .index.manifest import LATEST_NAME  # the index layout is spelled there

    if not isinstance(uri, str) or not uri.strip():
        raise WorkdirLayoutError(f"index location {uri!r} must be a non-empty path or URI")
    _component("index name", index_name)
    root = _normalize(uri)
    if storage.exists(storage.join(root, LATEST_NAME)):
        return root
    nested = Workdir(root).index_root(index_name)
    if storage.exists(nested):
        return nested
    return root


__all__ = [
    "DEFAULT_INDEX_NAME",
    "RUN_DIR_PREFIX",
    "Workdir",
    "WorkdirLayoutError",
    "resolve_index_root",
]
