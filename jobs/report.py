"""What a run left in its workdir, gathered for the run report (``runs/RUN_ID/report.html``).

Reads only what the run wrote (SPEC 4.2): ``runs/RUN_ID/summary.json`` and
``config.json``, the work list, the per-item outcome files (each outcome records
when decoding ended, the media seconds and the decoder seconds of its item), the
run's dead letters and embeddings Parquet, and the index version the run built
(its manifest names the run in ``metrics.run_id``). Phase timings come from the
times those files were written. Nothing here renders: jobs/report_html.py does.
Strings from the archive (URIs, messages) are kept as they are; the renderer
escapes them.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
from collections.abc import Iterable
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from xmodal_index.pipeline.types import kind_of
from xmodal_index.sinks import storage
from xmodal_index.sinks import workdir as workdir_layout
from xmodal_index.sinks.errors import IndexVersionError, ObjectNotFoundError, SinkError
from xmodal_index.sinks.index import manifest as mf
from xmodal_index.sinks.workdir import Workdir

from .report_failures import (
    FailureGroup,
    FailureTally,
    by_count,
    job_config,
    retry_command,
)
from .report_timeline import Timeline

logger = logging.getLogger(__name__)

REPORT_NAME = workdir_layout.REPORT
JOB_CONFIG_NAME = workdir_layout.JOB_CONFIG  # the run's job config alone, for the --retry-failed command
THROUGHPUT_BINS = 30
SAMPLES_AUTO_MAX_BYTES = 2 << 30


class ReportError(Exception):
    """The run cannot be reported on (unknown run, unreadable workdir); the message says why."""


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    start_s: float  # seconds after the run started
    seconds: float


@dataclasses.dataclass
class VersionInfo:
    version: str
    published: bool  # LATEST named it when the run ended
    recall_at_10: dict[str, Any]
    index_factory: dict[str, str]
    ntotal: int
    ntotal_by_modality: dict[str, int]
    bytes_total: int
    created_at: str
    parent_version: str | None


@dataclasses.dataclass
class ReportData:
    run_id: str
    workdir: str
    summary: dict[str, Any]
    config: dict[str, Any]
    timeline: Timeline
    failures: list[FailureGroup]
    failures_by_container: dict[str, int]
    failures_by_codec: dict[str, int]
    dead_letter_uris: int
    segments_by_modality: dict[str, int]
    phases: list[Phase]
    version: VersionInfo | None
    retry_command: str | None
    notes: list[str] = dataclasses.field(default_factory=list)
    samples: list[Any] = dataclasses.field(default_factory=list)  # report_samples.ProbeResult
    samples_note: str = ""

    @property
    def invariant(self) -> tuple[bool, str]:
        """(holds, in words) for inputs_total == indexed + unchanged + failed."""
        s = self.summary
        keys = ("inputs_total", "indexed", "unchanged", "failed")
        if not all(isinstance(s.get(k), int) for k in keys):
            return False, "the run wrote no complete summary: the counts are unknown"
        total, parts = s["inputs_total"], s["indexed"] + s["unchanged"] + s["failed"]
        op = "==" if total == parts else "!="
        text = f"inputs {total} {op} indexed {s['indexed']} + unchanged {s['unchanged']} + failed {s['failed']}"
        return total == parts, text

    @property
    def dead_letters_cover_failures(self) -> bool:
        return self.dead_letter_uris >= int(self.summary.get("failed") or 0)

    def throughput(self, bins: int = THROUGHPUT_BINS) -> list[tuple[float, float]]:
        """(seconds after the DAG started, media-seconds decoded per second) per time bin."""
        start = self.dag_start()
        return self.timeline.throughput(start, bins) if start is not None else []

    def dag_start(self) -> float | None:
        started = _epoch(self.summary.get("started_at"))
        dag = next((p for p in self.phases if p.name.startswith("decode")), None)
        return started + dag.start_s if started is not None and dag is not None else None


def list_runs(workdir: str) -> list[str]:
    """Run ids that left a config or a summary under WORKDIR/runs, oldest first."""
    runs: set[str] = set()
    try:
        for obj in storage.list_objects(Workdir(workdir).runs_root, include=("*/summary.json", "*/config.json")):
            runs.add(obj.uri.replace(os.sep, "/").rstrip("/").split("/")[-2])
    except ObjectNotFoundError:
        return []
    return sorted(runs)


def resolve_run(workdir: str, run: str | None) -> str:
    """The run id named by ``run`` ("latest" or None: the newest run of the workdir)."""
    runs = list_runs(workdir)
    if not runs:
        raise ReportError(f"no runs in {Workdir(workdir).runs_root!r}")
    if run in (None, "latest"):
        return runs[-1]
    if run not in runs:
        raise ReportError(f"no run {run!r} in {Workdir(workdir).runs_root!r} (newest: {', '.join(runs[-3:])})")
    return run


def _epoch(value: Any) -> float | None:
    if isinstance(value, datetime.datetime):
        return value.timestamp()
    if isinstance(value, str) and value:
        try:
            return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def _read_json(uri: str, notes: list[str]) -> dict[str, Any]:
    try:
        data = json.loads(storage.read_bytes(uri))
    except ObjectNotFoundError:
        notes.append(f"{uri} is missing")
        return {}
    except (SinkError, ValueError) as err:
        notes.append(f"{uri} is unreadable: {err}")
        return {}
    return data if isinstance(data, dict) else {}


def _parts(prefix: str, suffix: str) -> list[storage.ObjectInfo]:
    try:
        objs = list(storage.list_objects(prefix))
    except ObjectNotFoundError:
        return []
    return [o for o in objs if os.path.basename(o.uri).startswith("part-") and o.uri.endswith(suffix)]


def _jsonl(objs: Iterable[storage.ObjectInfo]) -> Iterable[dict[str, Any]]:
    for obj in objs:
        for line in storage.read_bytes(obj.uri).decode("utf-8", "replace").splitlines():
            if line.strip():
                yield json.loads(line)


def _version_of_run(index_root: str, run_id: str, summary: dict[str, Any]) -> tuple[mf.Manifest | None, str]:
    """The version this run built (manifest metrics.run_id), else the one its summary names."""
    try:
        versions = mf.list_versions(index_root)
    except SinkError as err:
        return None, f"index versions unreadable: {err}"
    started = _epoch(summary.get("started_at"))
    for version in reversed(versions):
        try:
            manifest = mf.read_manifest(index_root, version)
        except (IndexVersionError, SinkError):
            continue
        if (manifest.metrics or {}).get("run_id") == run_id:
            return manifest, ""
        created = _epoch(manifest.created_at)
        if started is not None and created is not None and created < started - 1:
            break  # older than the run: neither it nor any older version is the run's
    named = summary.get("index_version")
    if not named or named not in versions:
        return None, "this run built no index version"
    try:
        manifest = mf.read_manifest(index_root, named)
    except (IndexVersionError, SinkError) as err:
        return None, f"{named} is unreadable: {err}"
    if summary.get("index_published"):
        builder = (manifest.metrics or {}).get("run_id", "?")
        return manifest, f"{named} was built by run {builder}, which stopped before publishing it; this run did"
    return manifest, f"this run built no version; {named} is the one it left current"


def _version_info(manifest: mf.Manifest, summary: dict[str, Any]) -> VersionInfo:
    recall = (manifest.metrics or {}).get("recall_at_10") or {}
    ntotal = (manifest.metrics or {}).get("ntotal")
    by_modality = dict(ntotal) if isinstance(ntotal, dict) else {}
    if not by_modality:
        for shard in manifest.shards:
            if shard.kind == "float":
                by_modality[shard.modality] = by_modality.get(shard.modality, 0) + shard.ntotal
    published = bool(summary.get("index_published")) and summary.get("index_version") == manifest.version
    return VersionInfo(
        manifest.version,
        published,
        dict(recall) if isinstance(recall, dict) else {"float": recall},
        dict(manifest.index_factory),
        manifest.ntotal,
        by_modality,
        sum(f.bytes for f in manifest.all_files()),
        manifest.created_at,
        manifest.parent_version,
    )


def _mtime(uri: str) -> float | None:
    try:
        return storage.stat(uri).mtime
    except SinkError:
        return None


def _phases(
    workdir: Workdir, run_id: str, summary: dict[str, Any], dag_end: float | None, version_mtime: float | None
) -> list[Phase]:
    """Run phases from when the run's files were written: planning (until the work list),
    the Beam DAG (until its last part file), the ledger commit, the index version, the rest."""
    start = _epoch(summary.get("started_at"))
    if start is None:
        return []
    end = start + float(summary.get("wall_s") or 0.0)
    marks = [
        ("list + plan", _mtime(workdir.worklist(run_id))),
        ("decode + encode + write (Beam)", dag_end),
        ("ledger commit", _mtime(storage.join(workdir.ledger, f"ledger-{run_id}.parquet"))),
        ("index build + upload", version_mtime),
        ("publish + summary", end if summary.get("wall_s") else None),
    ]
    phases, t = [], start
    for name, mark in marks:
        if mark is None or mark < t:
            continue
        phases.append(Phase(name, round(t - start, 3), round(mark - t, 3)))
        t = mark
    return phases


def gather(workdir: str, run_id: str | None = None) -> ReportData:
    """Everything the report shows about one run (the newest when ``run_id`` is None)."""
    wd = Workdir(workdir)
    run_id = resolve_run(wd.uri, run_id)
    notes: list[str] = []
    summary = _read_json(wd.summary(run_id), notes)
    config = _read_json(wd.run_config(run_id), notes)
    summary.setdefault("run_id", run_id)
    summary.setdefault("workdir", wd.uri)
    summary.setdefault("index_name", config.get("index_name", "main"))

    timeline = Timeline()
    outcome_parts = _parts(wd.outcomes(run_id), ".jsonl")
    for o in _jsonl(outcome_parts):
        timeline.add(
            float(o.get("finished_at") or 0.0),
            True,
            kind_of(o["uri"]) or "?",
            float(o.get("media_s") or 0.0),
            float(o.get("decode_s") or 0.0),
        )
    if timeline.untimed:
        notes.append(
            f"{timeline.untimed} outcomes of this run record no finish time (written before outcomes did): "
            "they are missing from the throughput plot"
        )

    dead_parts = _parts(wd.deadletter(run_id), ".parquet")
    tally = FailureTally()
    for obj in dead_parts:
        with storage.open_read(obj.uri) as f:
            for batch in pq.ParquetFile(f).iter_batches(columns=["uri", "stage", "error_type", "message", "at"]):
                for row in batch.to_pylist():
                    tally.add(row)
                    timeline.add(_epoch(row.get("at")) or 0.0, False)

    segments: dict[str, int] = {}
    emb_parts = _parts(wd.embeddings(run_id), ".parquet")
    for obj in emb_parts:
        with storage.open_read(obj.uri) as f:
            counts = pc.value_counts(pq.read_table(f, columns=["modality"]).column("modality")).to_pylist()
        for entry in counts:
            segments[entry["values"]] = segments.get(entry["values"], 0) + entry["counts"]

    index_root = wd.index_root(summary["index_name"])
    manifest, version_note = _version_of_run(index_root, run_id, summary)
    if version_note:
        notes.append(version_note)
    version_mtime = None
    if manifest is not None and (manifest.metrics or {}).get("run_id") == run_id:
        version_mtime = _mtime(mf.manifest_uri(index_root, manifest.version))
    part_times = [o.mtime for o in outcome_parts + dead_parts + emb_parts]
    local_config = None if storage.is_s3(wd.uri) else wd.job_config(run_id)
    return ReportData(
        run_id=run_id,
        workdir=wd.uri,
        summary=summary,
        config=config,
        timeline=timeline,
        failures=tally.groups(),
        failures_by_container=by_count(tally.by_container),
        failures_by_codec=by_count(tally.by_codec),
        dead_letter_uris=tally.distinct_uris,
        segments_by_modality=dict(sorted(segments.items())),
        phases=_phases(wd, run_id, summary, max(part_times) if part_times else None, version_mtime),
        version=_version_info(manifest, summary) if manifest is not None else None,
        retry_command=retry_command(summary, config, local_config or JOB_CONFIG_NAME),
        notes=notes,
    )


def write_report(
    workdir: str, run_id: str | None = None, *, samples: bool | None = None, out: str | None = None
) -> str:
    """Gather, render and write the report of one run (the newest by default) to
    ``runs/RUN_ID/report.html`` (or ``out``), with the run's job config beside it
    for the --retry-failed command; returns where the report went. ``samples``:
    run the probe queries (None: only when the version is at most
    SAMPLES_AUTO_MAX_BYTES, as loading it verifies every file's checksum)."""
    from .report_html import render
    from .report_samples import add_samples

    data = gather(workdir, run_id)
    if samples is None and data.version is not None and data.version.bytes_total > SAMPLES_AUTO_MAX_BYTES:
        data.samples_note = (
            f"{data.version.version} is {data.version.bytes_total} bytes: no sample queries at the end "
            f"of the run; `xmodal-index report --workdir WORKDIR --run {data.run_id}` adds them"
        )
    elif samples is False:
        data.samples_note = "sample queries not run (--no-samples)"
    else:
        add_samples(data)
    wd = Workdir(data.workdir)
    if data.retry_command and job_config(data.config):
        storage.write_bytes(wd.job_config(data.run_id), json.dumps(job_config(data.config), indent=2).encode())
    target = out or wd.report(data.run_id)
    storage.write_bytes(target, render(data).encode("utf-8"))
    return target
