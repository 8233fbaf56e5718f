"""The failures part of the run report: dead letters grouped by stage and error
class, by container and by codec, and the `run --retry-failed` command that
repeats the run's source, workdir, selection and job config."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from collections.abc import Iterable
from typing import Any

from xmodal_index.jobs.config import RunConfig

EXAMPLES_PER_GROUP = 3
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


def group_failures(rows: Iterable[dict[str, Any]], examples: int = EXAMPLES_PER_GROUP) -> list[FailureGroup]:
    """Dead-letter rows by (stage, error class): largest first; examples in uri order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row.get("stage") or "?", row.get("error_type") or "?"), []).append(row)
    out = [FailureGroup(stage, err, len(members),
                        tuple((r.get("uri") or "", r.get("message") or "")
                              for r in sorted(members, key=lambda r: r.get("uri") or "")[:examples]))
           for (stage, err), members in groups.items()]
    return sorted(out, key=lambda g: (-g.count, g.stage, g.error_type))


def count_by(values: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def job_config(config: dict[str, Any]) -> dict[str, Any]:
    """The job-config sections of a run's config.json (what `run --config` takes)."""
    return {k: config[k] for k in CONFIG_SECTIONS if isinstance(config.get(k), dict)}


def retry_command(summary: dict[str, Any], config: dict[str, Any], config_file: str | None) -> str | None:
    """`xmodal-index run ... --retry-failed` repeating the run's source, workdir and
    selection; None when the run had no failures."""
    if not summary.get("failed"):
        return None
    args = ["xmodal-index", "run", "--source", summary.get("source", "SOURCE"), "--workdir", summary.get("workdir", "WORKDIR")]
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
    beam_args = [str(a) for a in config.get("beam_args") or []]
    if beam_args:
        args += ["--", *beam_args]
    return " ".join(shlex.quote(str(a)) for a in args)
