"""What the DAG left behind, turned into ledger entries, summary counts and dead letters.

The DAG writes one outcome per item it finished (``runs/RUN_ID/outcomes/``) and one
dead letter per item that failed; an item with neither was lost and gets a dead letter
here, as do the inputs refused at stage list. Every failed input ends with a dead
letter naming its stage (SPEC 4.2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from xmodal_index.pipeline.dag import outcome_from_json
from xmodal_index.pipeline.types import MediaItem
from xmodal_index.sinks.deadletters import read_deadletters, write_deadletters
from xmodal_index.sinks.ledger import LedgerEntry
from xmodal_index.sinks.parts import count_parquet_rows, list_parts, read_lines
from xmodal_index.sinks.workdir import Workdir

if TYPE_CHECKING:
    from .run_job import RunSummary


def record_outcomes(workdir: str, run_id: str, todo: Sequence[MediaItem], model_id: str, summary: RunSummary,
                     entries: dict[str, LedgerEntry]) -> None:
    """Turn the DAG's outcomes and dead letters into ledger entries and summary counts."""
    dead = read_deadletters(workdir, run_id)
    outcomes = _outcomes(workdir, run_id)
    dead_uris: dict[str, str] = {}
    for d in dead:
        dead_uris.setdefault(d["uri"], d["stage"])
    lost = [i for i in todo if i.uri not in outcomes and i.uri not in dead_uris]
    if lost:
        _write_lost(workdir, run_id, lost)
        dead_uris.update({i.uri: "pipeline" for i in lost})
    for item in todo:
        if item.uri in dead_uris:
            stage = dead_uris[item.uri]
            summary.failed += 1
            summary.failed_by_stage[stage] = summary.failed_by_stage.get(stage, 0) + 1
            entries[item.uri] = LedgerEntry(item.uri, item.etag, item.size, item.mtime, "failed", 0, model_id, run_id)
        else:
            n = outcomes[item.uri]["segments"]
            summary.indexed += 1
            summary.segments += n
            entries[item.uri] = LedgerEntry(item.uri, item.etag, item.size, item.mtime, "indexed", n, model_id, run_id)


def dead_letter_refused(workdir: str, summary: RunSummary, unnamed: Sequence[MediaItem], links: Sequence[MediaItem],
                        refused: Mapping[str, tuple[str, str]], model_id: str, entries: dict[str, LedgerEntry]) -> None:
    """Inputs refused at stage list get a dead letter and a failed ledger entry."""
    run_id = summary.run_id
    if unnamed:
        _write_dead(workdir, run_id, unnamed, "names", "list", "UnrepresentableNameError",
                    "file name is not valid UTF-8 (bad bytes shown as \\xNN); rename it")
    for n, (error_type, reason) in enumerate(sorted({refused[i.uri] for i in links})):
        _write_dead(workdir, run_id, [i for i in links if refused[i.uri] == (error_type, reason)],
                    f"links-{n}", "list", error_type, reason)
    for item in [*unnamed, *links]:
        summary.failed += 1
        summary.failed_by_stage["list"] = summary.failed_by_stage.get("list", 0) + 1
        entries[item.uri] = LedgerEntry(item.uri, item.etag, item.size, item.mtime, "failed", 0, model_id, run_id)


def _outcomes(workdir: str, run_id: str) -> dict[str, dict]:
    """The DAG's per-item outcomes (segments written), by uri."""
    out = {}
    for line in read_lines(list_parts(Workdir(workdir).outcomes(run_id), ".jsonl")):
        o = outcome_from_json(line)
        out[o.uri] = dataclasses.asdict(o)
    return out


def _write_dead(workdir: str, run_id: str, items: Sequence[MediaItem], part: str, stage: str, error_type: str,
                message: str) -> None:
    """Dead-letter rows written by the job itself (for items the DAG never saw or lost)."""
    write_deadletters(workdir, run_id, part, [dict(uri=i.uri, etag=i.etag, stage=stage, error_type=error_type,
                                                   message=message) for i in items])


def _write_lost(workdir: str, run_id: str, lost: list[MediaItem]) -> None:
    """Items with neither an outcome nor a dead letter still get a dead-letter row."""
    _write_dead(workdir, run_id, lost, "lost", "pipeline", "NoOutcome",
                "the DAG finished without an outcome for this item")


def count_rows(workdir: str, run_id: str) -> int:
    """Embedding rows the run wrote (from the Parquet footers)."""
    return count_parquet_rows(list_parts(Workdir(workdir).embeddings(run_id), ".parquet"))

