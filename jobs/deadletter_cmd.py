"""`xmodal-index deadletter`: what failed, grouped by stage and error class.

Reads ``WORKDIR/deadletter/run_id=RUN/part-*.parquet`` (one row per failed item:
uri, etag, stage, error_type, message, run_id, at) and, for the default view,
the committed ledger: the items whose current state is ``failed``, each with the
dead letter of the run that failed it. ``--run`` shows one run's rows, ``--all``
every run's. URIs and messages come from the archive: control and formatting
characters are shown escaped, never sent to the terminal as they are.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from collections.abc import Iterable, Sequence

import click

from xmodal_index.sinks import storage
from xmodal_index.sinks.deadletters import read_deadletters, run_ids_with_dead_letters
from xmodal_index.sinks.errors import SinkError
from xmodal_index.sinks.ledger import ledger_snapshot_name, read_ledger
from xmodal_index.sinks.workdir import Workdir

logger = logging.getLogger(__name__)

NO_DEAD_LETTER = "NoDeadLetter"  # error_type of a failed ledger entry whose dead letter is missing


class DeadLetterReadError(click.ClickException):
    """The workdir's dead letters or ledger cannot be read."""


@dataclasses.dataclass(frozen=True)
class FailureGroup:
    """Failures of one (stage, error class), with the first few as examples."""

    stage: str
    error_type: str
    count: int
    examples: tuple[dict, ...]  # dead-letter rows: uri, etag, stage, error_type, message, run_id, at


def failure_groups(rows: Iterable[dict], examples: int = 3) -> list[FailureGroup]:
    """Group dead-letter rows by (stage, error_type): largest group first, then by
    name; examples in uri order."""
    by_class: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        by_class.setdefault((row.get("stage") or "?", row.get("error_type") or "?"), []).append(row)
    groups = [FailureGroup(stage, error_type, len(members),
                           tuple(sorted(members, key=lambda r: (r.get("uri") or "", r.get("run_id") or ""))[:examples]))
              for (stage, error_type), members in by_class.items()]
    return sorted(groups, key=lambda g: (-g.count, g.stage, g.error_type))


def printable(text: str) -> str:
    """``text`` with control, formatting and separator characters escaped (a file
    name cannot move the cursor, recolour or reorder the terminal)."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    return "".join(out)


def reason_of(row: dict) -> str:
    """The dead-letter message without the leading ``URI: `` most messages start with."""
    message, uri = row.get("message") or "", row.get("uri") or ""
    return message[len(uri) + 2:] if uri and message.startswith(uri + ": ") else message


def format_groups(groups: Sequence[FailureGroup], max_chars: int = 160) -> list[str]:
    """Text lines for a terminal: one heading per group, one line per example."""
    lines = []
    for g in groups:
        lines.append(f"{g.stage} / {g.error_type}: {g.count}")
        for row in g.examples:
            reason = printable(reason_of(row))
            if len(reason) > max_chars:
                reason = reason[:max_chars - 3] + "..."
            lines.append(f"    {printable(row.get('uri') or '')}")
            lines.append(f"        {reason}")
        if g.count > len(g.examples):
            lines.append(f"    ... and {g.count - len(g.examples)} more")
    return lines


# ---------------------------------------------------------------- reading


def read_run(workdir: str, run_id: str) -> list[dict]:
    """The dead-letter rows one run wrote (none when it wrote none)."""
    return read_deadletters(workdir, run_id)


def current_failures(workdir: str) -> list[dict]:
    """One row per item the committed ledger says is failed: the dead letter of the
    run that failed it (a placeholder row where that dead letter is missing)."""
    failed = [e for e in read_ledger(workdir).values() if e.state == "failed"]
    by_run: dict[str, list] = {}
    for entry in failed:
        by_run.setdefault(entry.run_id, []).append(entry)
    rows = []
    for run_id, entries in sorted(by_run.items()):
        letters: dict[tuple[str, str], dict] = {}
        for row in sorted(read_run(workdir, run_id), key=lambda r: str(r.get("at") or "")):
            letters.setdefault((row["uri"], row["etag"]), row)
        for e in entries:
            rows.append(letters.get((e.uri, e.etag)) or {
                "uri": e.uri, "etag": e.etag, "stage": "?", "error_type": NO_DEAD_LETTER,
                "message": f"the ledger marks it failed in run {run_id}, which left no dead letter for it",
                "run_id": run_id, "at": None})
    return rows


def _latest_run(workdir: str) -> str | None:
    runs = run_ids_with_dead_letters(workdir)
    return runs[-1] if runs else None


# ---------------------------------------------------------------- command


def _json_row(row: dict) -> dict:
    out = {k: row.get(k) for k in ("uri", "etag", "stage", "error_type", "message", "run_id")}
    at = row.get("at")
    out["at"] = at.isoformat() if isinstance(at, (datetime.date, datetime.time)) else at
    return out


def _workdir_uri(workdir: str) -> str:
    try:
        return Workdir(workdir).uri
    except SinkError as err:
        raise click.BadParameter(str(err), param_hint="--workdir") from err


@click.command("deadletter")
@click.option("--workdir", required=True, help="Workdir of the runs (local path, file:// or s3:// URI).")
@click.option("--run", "run_id", default=None, metavar="RUN_ID",
              help="Show the dead letters one run wrote (RUN_ID as in runs/, or 'latest'). "
                   "Default: the items failed now, as the committed ledger says.")
@click.option("--all", "all_runs", is_flag=True,
              help="Show the dead letters of every run (a retried item counts once per run).")
@click.option("--examples", default=3, type=click.IntRange(0, 1000), help="Example items shown per group (count).")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object on stdout: scope, total and the groups with their examples.")
def deadletter(workdir: str, run_id: str | None, all_runs: bool, examples: int, as_json: bool) -> None:
    """List failed inputs of WORKDIR grouped by stage and error class, with example URIs.

    By default the items that are failed now (the committed ledger), each with the
    reason of the run that failed it. Retry them with
    `xmodal-index run --source SOURCE --workdir WORKDIR --retry-failed`.
    """
    if run_id and all_runs:
        raise click.UsageError("--run and --all exclude each other")
    shown, workdir = workdir, _workdir_uri(workdir)  # listings name objects by absolute path
    try:
        if not storage.exists(workdir):
            raise click.ClickException(f"no workdir at {printable(shown)}")
        if all_runs:
            scope, rows = "all runs", [r for run in run_ids_with_dead_letters(workdir) for r in read_run(workdir, run)]
        elif run_id:
            if run_id == "latest":
                run_id = _latest_run(workdir)
                if run_id is None:
                    raise click.ClickException(f"no run in {shown} has dead letters")
            scope, rows = f"run {run_id}", read_run(workdir, run_id)
            if not rows and not storage.exists(Workdir(workdir).run_dir(run_id)):
                raise click.ClickException(f"no run {run_id!r} in {shown} (runs are listed under {shown}/runs/)")
        elif ledger_snapshot_name(workdir) is not None:
            scope, rows = "failed now (committed ledger)", current_failures(workdir)
        else:
            latest = _latest_run(workdir)
            scope = f"run {latest} (no committed ledger yet)" if latest else "no runs"
            rows = read_run(workdir, latest) if latest else []
    except SinkError as err:
        raise DeadLetterReadError(f"cannot read {shown}: {err}") from err
    groups = failure_groups(rows, examples)
    if as_json:
        click.echo(json.dumps({"workdir": shown, "scope": scope, "total": len(rows),
                               "groups": [{"stage": g.stage, "error_type": g.error_type, "count": g.count,
                                           "examples": [_json_row(r) for r in g.examples]} for g in groups]}))
        return
    if not rows:
        click.echo(f"no failures ({scope}) in {printable(shown)}")
        return
    click.echo(f"{len(rows)} failure(s), {scope}, in {printable(shown)}")
    click.echo("")
    for line in format_groups(groups):
        click.echo(line)
    click.echo("")
    click.echo(f"retry: xmodal-index run --source SOURCE --workdir {printable(shown)} --retry-failed")
