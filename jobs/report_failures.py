"""The failures part of the run report: dead letters grouped by stage and error
class, by container and by codec, and the `run --retry-failed` command that
repeats the run's source, workdir, selection and job config."""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import os
import re
import shlex
from collections.abc import Iterable
from typing import Any

from .config import RunConfig

EXAMPLES_PER_GROUP = 3
MAX_MESSAGE_CHARS = 400
LOG_LEVEL_FLAG = "--default_sdk_harness_log_level"
CONFIG_SECTIONS = tuple(f.name for f in dataclasses.fields(RunConfig))
_CODEC_RE = re.compile(r"\[([A-Za-z0-9_]+) @ 0x[0-9a-fA-F]+\]|codec[ =:'\"]+([A-Za-z0-9_]+)")


@dataclasses.dataclass(frozen=True)
class FailureGroup:
    """Failures of one (stage, error class): count, and the first few (uri, message)."""

    stage: str
    error_type: str
    count: int
    examples: tuple[tuple[str, str], ...]


def container_of(uri: str) -> str:
    """The container as the file name says it (its extension, lower case), or "(none)"."""
    ext = os.path.splitext(uri.rsplit("/", 1)[-1])[1].lower().lstrip(".")
    return ext or "(none)"


def codec_of(message: str) -> str:
    """The codec a decoder message names (``[h264 @ 0x...]``, ``codec 'vp9'``), or "unknown"."""
    match = _CODEC_RE.search(message or "")
    return (match.group(1) or match.group(2)).lower() if match else "unknown"


class FailureTally:
    """Dead-letter rows counted as they are read: by (stage, error class) with the
    first few (uri, message) in uri order, by container, by codec, and the number of
    distinct failed uris; memory grows with the number of groups, not of rows."""

    def __init__(self, examples: int = EXAMPLES_PER_GROUP) -> None:
        self._examples = examples
        self._counts: dict[tuple[str, str], int] = {}
        self._first: dict[tuple[str, str], list[tuple[str, str]]] = {}
        self.by_container: dict[str, int] = {}
        self.by_codec: dict[str, int] = {}
        self._uris: set[int] = set()

    def add(self, row: dict[str, Any]) -> None:
        uri, message = row.get("uri") or "", row.get("message") or ""
        key = (row.get("stage") or "?", row.get("error_type") or "?")
        self._counts[key] = self._counts.get(key, 0) + 1
        first = self._first.setdefault(key, [])
        if len(first) < self._examples or uri < first[-1][0]:
            bisect.insort(first, (uri, message[:MAX_MESSAGE_CHARS]))
            del first[self._examples :]
        for counts, name in ((self.by_container, container_of(uri)), (self.by_codec, codec_of(message))):
            counts[name] = counts.get(name, 0) + 1
        self._uris.add(
            int.from_bytes(hashlib.blake2b(uri.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big")
        )

    @property
    def distinct_uris(self) -> int:
        return len(self._uris)

    def groups(self) -> list[FailureGroup]:
        """Largest group first, then by stage and error class."""
        out = [
            FailureGroup(stage, err, n, tuple(self._first[(stage, err)])) for (stage, err), n in self._counts.items()
        ]
        return sorted(out, key=lambda g: (-g.count, g.stage, g.error_type))


def group_failures(rows: Iterable[dict[str, Any]], examples: int = EXAMPLES_PER_GROUP) -> list[FailureGroup]:
    """Dead-letter rows by (stage, error class): largest first; examples in uri order."""
    tally = FailureTally(examples)
    for row in rows:
        tally.add(row)
    return tally.groups()


def by_count(counts: dict[str, int]) -> dict[str, int]:
    """``counts`` largest first, then by name."""
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def job_config(config: dict[str, Any]) -> dict[str, Any]:
    """The job-config sections of a run's config.json (what `run --config` takes)."""
    return {k: config[k] for k in CONFIG_SECTIONS if isinstance(config.get(k), dict)}


def retry_command(summary: dict[str, Any], config: dict[str, Any], config_file: str | None) -> str | None:
    """`xmodal-index run ... --retry-failed` repeating the run's source, workdir and
    selection; None when the run had no failures."""
    if not summary.get("failed"):
        return None
    args = [
        "xmodal-index",
        "run",
        "--source",
        summary.get("source", "SOURCE"),
        "--workdir",
        summary.get("workdir", "WORKDIR"),
    ]
    if summary.get("index_name", "main") != "main":
        args += ["--index-name", summary["index_name"]]
    if config_file:
        args += ["--config", config_file]
    for flag, key in (("--prefix", "prefix"), ("--since", "since"), ("--until", "until")):
        if summary.get(key):
            args += [flag, str(summary[key])]
    if config.get("runner") not in (None, "DirectRunner"):
        args += ["--runner", str(config["runner"])]
    args.append("--retry-failed")
    # the workers' log level is a logging choice `run` makes itself (from -v), not part of the job
    beam_args = [str(a) for a in config.get("beam_args") or [] if not str(a).startswith(LOG_LEVEL_FLAG)]
    if beam_args:
        args += ["--", *beam_args]
    return " ".join(shlex.quote(str(a)) for a in args)
