"""The `run` job: lease -> list -> diff with the ledger -> Beam DAG -> ledger -> index version -> summary.

Commit order (what makes a crash at any point safe to rerun):

1. the DAG writes Parquet parts under ``embeddings/run_id=RUN/`` (Beam writes them
   under temporary names and renames them when the write commits);
2. the ledger snapshot is written, then ``ledger/CURRENT`` points at it: from here
   on the run's rows are live; before it, nothing refers to them;
3. the index version is uploaded (shards, id maps, then manifest.json); the publish
   step points ``indexes/NAME/LATEST`` at it, then ``ledger/PUBLISHED`` records it.

A rerun after a crash before 2 processes the same work again under a new run id
(the crashed run's parts stay unreferenced); after 2 it builds the version from the
committed ledger; after the manifest it publishes the version already uploaded.
The whole run holds the workdir lease (sinks/storage/lease.py), renewed before each commit.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Sequence

from xmodal_index.encoders.loading import load_encoder
from xmodal_index.pipeline.dag import IndexArchive, item_to_json, read_worklist
from xmodal_index.pipeline.types import MediaItem
from xmodal_index.sinks import storage
from xmodal_index.sinks.deadletters import read_deadletters
from xmodal_index.sinks.embeddings_io import live_batches
from xmodal_index.sinks.errors import SinkError
from xmodal_index.sinks.index import manifest as mf
from xmodal_index.sinks.index import publish
from xmodal_index.sinks.index.publish_gate import GateConfig
from xmodal_index.sinks.ledger import (
    LedgerEntry,
    ledger_snapshot_name,
    live_keys,
    mark_published,
    published_snapshot_name,
    read_ledger,
    snapshot_name,
    write_ledger,
)
from xmodal_index.sinks.storage.lease import Lease, LeaseConfig, LeaseHeldError, LeaseInfo
from xmodal_index.sinks.workdir import Workdir

from . import run_outcomes, run_publish
from .config import RunConfig
from .crash_points import CRASH_ENV, CRASH_EXIT_CODE, CRASH_POINTS, upload_progress
from .crash_points import crash_point as _crash_point
from .crash_points import dag_crash_points as _dag_crash_points
from .progress_display import run_progress
from .run_index import build_index
from .run_plan import Selection, list_selection, plan_work, split_unrepresentable

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_TOO_MANY_FAILURES = 3
EXIT_LEASE_HELD = 4
EXIT_GATE_REFUSED = 5

__all__ = [
    "CRASH_ENV",
    "CRASH_EXIT_CODE",
    "CRASH_POINTS",
    "RunRequest",
    "RunSummary",
    "Selection",
    "execute",
    "list_selection",
    "live_batches",
    "new_run_id",
    "plan_work",
    "read_deadletters",
]



@dataclasses.dataclass
class RunSummary:
    """runs/RUN_ID/summary.json (SPEC 4.2). inputs_total == indexed + unchanged + failed."""

    run_id: str
    source: str
    workdir: str
    index_name: str
    inputs_total: int = 0
    indexed: int = 0
    unchanged: int = 0
    deleted: int = 0
    failed: int = 0
    failed_by_stage: dict = dataclasses.field(default_factory=dict)
    segments: int = 0
    rows_written: int = 0
    index_version: str | None = None
    index_published: bool = False
    index_note: str = ""
    model_id: str = ""
    wall_s: float = 0.0
    exit_code: int = EXIT_OK
    started_at: str = ""
    prefix: str = ""
    since: str | None = None
    until: str | None = None
    skipped_by_range: int = 0  # listed under the prefix but modified outside [since, until)
    deadletters: str | None = None  # where this run's dead-letter rows are (when failed > 0)
    error: str = ""  # one line, when the run could not complete (exit_code 1)
    completes_run: str | None = None  # an earlier run whose committed changes were not yet published
    gate: str = ""  # the publish gate's decision, in words


@dataclasses.dataclass(frozen=True)
class RunRequest:
    source: str
    workdir: str
    config: RunConfig
    index_name: str = "main"
    runner: str = "DirectRunner"
    beam_args: tuple[str, ...] = ()
    full: bool = False
    rebuild_index: bool = False  # a full index build even where an incremental version would do
    retry_failed: bool = False
    force: bool = False  # publish even when the publish gate finds a regression
    show_progress: bool = False
    selection: Selection = Selection()
    lease: LeaseConfig = LeaseConfig()
    summary_out: str | None = None  # also write summary.json to this local path


def new_run_id() -> str:
    """UTC time to the millisecond plus a random suffix: run ids sort by start time."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z-" + secrets.token_hex(3)


# ---------------------------------------------------------------- the DAG


def _beam_options(req: RunRequest, run_id: str):
    from apache_beam.options.pipeline_options import PipelineOptions

    args = list(req.beam_args)
    flags = {a.split("=", 1)[0] for a in args}
    args.insert(0, f"--runner={req.runner}")
    if req.runner == "DirectRunner":
        if "--direct_num_workers" not in flags:
            args.append(f"--direct_num_workers={min(2, os.cpu_count() or 1)}")
        if "--direct_running_mode" not in flags:
            args.append("--direct_running_mode=multi_threading")
    if "--job_name" not in flags:
        args.append("--job_name=xmodal-index-" + run_id.lower().replace("_", "-"))
    extra = {}
    if storage.is_s3(req.workdir) or storage.is_s3(req.source):
        s3_config = storage.active_config()
        # Beam's own S3 client takes its retry policy from the environment only
        os.environ.setdefault("AWS_MAX_ATTEMPTS", str(s3_config.max_attempts))
        os.environ.setdefault("AWS_RETRY_MODE", s3_config.retry_mode)
        extra = {k: v for k, v in storage.beam_s3_options().items() if f"--{k}" not in flags}
    return PipelineOptions(args, **extra)


def run_dag(req: RunRequest, run_id: str, todo: Sequence[MediaItem], dim: int, bits: int) -> None:
    import apache_beam as beam

    worklist = Workdir(req.workdir).worklist(run_id)
    storage.write_bytes(worklist, "".join(item_to_json(i) + "\n" for i in todo).encode())
    cfg = req.config
    with run_progress(len(todo), req.show_progress), _dag_crash_points(Workdir(req.workdir).embeddings(run_id)):
        with beam.Pipeline(options=_beam_options(req, run_id)) as p:
            items = read_worklist(p, worklist)
            items | "IndexArchive" >> IndexArchive(req.workdir, run_id, cfg.decode, cfg.encoder, dim, bits,
                                                   isolate_decoding=cfg.run.isolate_decoding)


def _encoder_files(encoder, cfg: RunConfig, tmpdir: str) -> dict[str, str]:
    files = {}
    enc_json = os.path.join(tmpdir, "encoder.json")
    conf = dataclasses.asdict(cfg.encoder)
    ckpt = getattr(encoder, "checkpoint_path", None)
    if cfg.encoder.kind == "builtin" and ckpt:
        files["model.safetensors"] = ckpt
        conf["checkpoint"] = "model.safetensors"
    conf["model_id"] = encoder.model_id
    with open(enc_json, "w") as f:
        json.dump(conf, f, indent=2)
    files["encoder.json"] = enc_json
    return files


def _built_from(manifest: mf.Manifest) -> str | None:
    return (manifest.metrics or {}).get("ledger_snapshot")


def _reconcile_published(workdir: str, index_root: str) -> None:
    """A run that crashed between writing LATEST and ledger/PUBLISHED left the index
    published: record it, so the rerun does not build the same version again."""
    current = ledger_snapshot_name(workdir)
    if current is None or current == published_snapshot_name(workdir):
        return
    latest = mf.read_latest(index_root)
    if latest is not None and _built_from(mf.read_manifest(index_root, latest)) == current:
        mark_published(workdir, current)


def _publish(workdir: str, index_root: str, version: str, snapshot_uri: str, lease: Lease,
             expected: publish.LatestState, gate_config: GateConfig, force: bool,
             deletion: run_publish.Deletion | None) -> publish.PublishResult:
    """The run's call of THE PUBLISH STEP (sinks/index/publish.py), the only writer of LATEST.

    The publish gate compares the version with the one LATEST named when the run
    read it (``expected``): recall, cross-modal mAP, the share of live items
    deleted and the drop of ntotal. LATEST is swapped only when the gate passes (or
    with ``force``), the lease is still held right before the swap and LATEST still
    holds ``expected``; then ledger/PUBLISHED. A refused version stays on storage,
    unpublished: `xmodal-index promote` or `run --force` can publish it later.
    """
    _crash_point("before_publish")
    result = publish.publish(index_root, version, expected=expected, lease=lease, gate_config=gate_config,
                             force=force, deletion=deletion)
    _crash_point("after_publish")
    if result.published:
        mark_published(workdir, snapshot_uri)
    return result


def _build_and_publish(req: RunRequest, summary: RunSummary, lease: Lease, encoder, index_root: str, snapshot: str,
                       before: dict[str, LedgerEntry], entries: dict[str, LedgerEntry],
                       echo: Callable[[str], None]) -> None:
    """Publish a version holding the live rows of ``entries``: none when LATEST's
    already does, the one an earlier run uploaded and never published, or a new one."""
    cfg = req.config
    expected = publish.read_state(index_root)  # LATEST before building: what the publish swaps against
    current = run_publish.latest_manifest(index_root, expected)
    content = run_publish.Content.of(entries.values(), encoder.model_id, dataclasses.asdict(cfg.index))
    if current is not None and content.matches(current):
        mark_published(req.workdir, snapshot)
        summary.index_note = f"nothing changed: LATEST {current.version} already holds these rows"
        return
    deletion = run_publish.deletion(req.workdir, current, before, entries)
    version = run_publish.uploaded_version(index_root, expected, content)
    if version is not None:
        echo(f"publishing {version}, uploaded by an earlier run that stopped before publishing it")
    else:
        echo("building index version ...")
        version = publish.reserve_version(index_root)
        with tempfile.TemporaryDirectory(prefix="xmodal-enc-") as tmp:
            decision = build_index(
                index_root, current.version if current is not None else None, req.workdir, entries,
                model_id=encoder.model_id, dim=encoder.dim, bits=encoder.bits, config=cfg.index,
                policy=cfg.incremental, rebuild=req.rebuild_index, extra_files=_encoder_files(encoder, cfg, tmp),
                metrics_extra={"run_id": summary.run_id, run_publish.SNAPSHOT_KEY: snapshot_name(snapshot),
                               run_publish.FINGERPRINT_KEY: content.fingerprint,
                               run_publish.FENCING_KEY: lease.generation},
                version=version, progress=upload_progress,
            )
        echo(f"index {version}: {'incremental' if decision.incremental else 'full build'}: {decision.reason}")
    result = _publish(req.workdir, index_root, version, snapshot, lease, expected, cfg.gate, req.force, deletion)
    summary.gate = result.reason
    if result.published:
        ntotal = mf.read_manifest(index_root, version).ntotal
        summary.index_version = version
        summary.index_published = True
        summary.index_note = f"published {version} ({ntotal} vectors){' (forced)' if result.forced else ''}"
    else:
        summary.exit_code = EXIT_GATE_REFUSED
        summary.index_note = (f"not published: {result.reason}; it stays on storage "
                              f"(`run --force` or `promote {version}` publishes it)")


# ---------------------------------------------------------------- the job


def execute(req: RunRequest, echo: Callable[[str], None] = lambda s: None) -> RunSummary:
    """Run the whole job under the workdir lease; returns the summary (also written to
    runs/RUN_ID/summary.json, and to ``req.summary_out`` when set).

    Raises LeaseHeldError when another run holds the workdir (nothing is written to
    the workdir); any error is raised after a summary with ``error`` and
    ``exit_code`` set was written (best effort; only to ``summary_out`` when the
    lease could not be taken).
    """
    t0 = time.monotonic()
    run_id = new_run_id()
    sel = req.selection
    summary = RunSummary(run_id=run_id, source=req.source, workdir=req.workdir, index_name=req.index_name,
                         started_at=datetime.datetime.now(datetime.timezone.utc).isoformat(), prefix=sel.prefix,
                         since=sel.since.isoformat() if sel.since else None,
                         until=sel.until.isoformat() if sel.until else None)
    lease = Lease(Workdir(req.workdir).lease, run_id, req.lease,
                  holder=f"xmodal-index run --source {req.source} --index-name {req.index_name}")

    def waiting(info: LeaseInfo) -> None:
        echo(f"waiting up to {req.lease.wait_s:g} s for the workdir lease held by {info.describe()}")

    try:
        lease.acquire(on_wait=waiting)
    except Exception as err:  # the workdir belongs to another run, or cannot be reached: --summary-out only
        _failed(summary, err, EXIT_LEASE_HELD if isinstance(err, LeaseHeldError) else EXIT_ERROR)
        _finish(req, summary, t0, best_effort=True, in_workdir=False)
        raise
    try:
        _run_locked(req, summary, lease, echo)
    except Exception as err:
        _failed(summary, err, EXIT_ERROR)
        _finish(req, summary, t0, best_effort=True)
        raise
    finally:
        lease.release()
    _finish(req, summary, t0)
    return summary


def _failed(summary: RunSummary, err: Exception, exit_code: int) -> None:
    summary.exit_code = exit_code
    summary.error = f"{type(err).__name__}: {' '.join(str(err).split())}"[:2000]


def _finish(req: RunRequest, summary: RunSummary, t0: float, best_effort: bool = False,
            in_workdir: bool = True) -> None:
    summary.wall_s = round(time.monotonic() - t0, 3)
    data = json.dumps(dataclasses.asdict(summary), indent=2).encode()
    targets = []
    if in_workdir:
        targets.append(lambda: storage.write_bytes(Workdir(req.workdir).summary(summary.run_id), data))
    summary_out = req.summary_out
    if summary_out:
        targets.append(lambda: storage.write_bytes(summary_out, data))
    for write in targets:
        try:
            write()
        except SinkError as err:
            if not best_effort:
                raise
            logger.warning("could not write the run summary: %s", err)
    if in_workdir:
        _write_report(req.workdir, summary.run_id)


def _write_report(workdir: str, run_id: str) -> None:
    """runs/RUN_ID/report.html (jobs/report.py); a report that cannot be written never fails the run."""
    try:
        from .report import write_report

        write_report(workdir, run_id)
    except Exception as err:  # noqa: BLE001 - the report is a view of the run, not part of it
        logger.warning("could not write the run report: %s: %s", type(err).__name__, err)


def _run_locked(req: RunRequest, summary: RunSummary, lease: Lease, echo: Callable[[str], None]) -> None:
    """Plan, run the DAG, commit the ledger, publish (the commit order of the module docstring)."""
    _write_run_config(req, summary)
    encoder = load_encoder(req.config.encoder)
    summary.model_id = encoder.model_id
    index_root = Workdir(req.workdir).index_root(req.index_name)
    _reconcile_published(req.workdir, index_root)
    work = _plan(req, summary, encoder.model_id, echo)
    entries = _carried_over(work)
    run_outcomes.dead_letter_refused(req.workdir, summary, work.unnamed, work.links, work.refused, encoder.model_id,
                                     entries)
    if work.todo:
        run_dag(req, summary.run_id, work.todo, encoder.dim, encoder.bits)
        _crash_point("after_dag")
        run_outcomes.record_outcomes(req.workdir, summary.run_id, work.todo, encoder.model_id, summary, entries)
        summary.rows_written = run_outcomes.count_rows(req.workdir, summary.run_id)
    if summary.failed:
        summary.deadletters = Workdir(req.workdir).deadletter(summary.run_id)

    lease.confirm()
    snapshot = write_ledger(req.workdir, summary.run_id, entries.values())
    _crash_point("after_ledger")

    if _publish_wanted(req, summary, work, entries, encoder.model_id, index_root):
        summary.completes_run = work.pending_run
        _build_and_publish(req, summary, lease, encoder, index_root, snapshot, work.ledger, entries, echo)


@dataclasses.dataclass
class _Work:
    """What one run does, planned from the listing and the committed ledger."""

    ledger: dict[str, LedgerEntry]  # the committed state before this run
    pending_run: str | None  # an earlier run whose committed changes were not yet published
    unpublished: bool
    todo: list[MediaItem]  # to decode, encode and write
    unchanged: list[LedgerEntry]
    deleted: list[LedgerEntry]
    unnamed: list[MediaItem]  # refused at stage list: names that are not UTF-8
    links: list[MediaItem]  # refused at stage list by the listing (links leading out, ...)
    refused: dict[str, tuple[str, str]]  # uri -> (error_type, reason) of ``links``

    @property
    def processed(self) -> int:
        return len(self.todo) + len(self.unnamed) + len(self.links)


def _write_run_config(req: RunRequest, summary: RunSummary) -> None:
    """runs/RUN_ID/config.json: the resolved config beside the run's outputs."""
    sel = req.selection
    storage.write_bytes(Workdir(req.workdir).run_config(summary.run_id), json.dumps(
        {"source": req.source, "workdir": req.workdir, "index_name": req.index_name, "runner": req.runner,
         "beam_args": list(req.beam_args), "full": req.full, "retry_failed": req.retry_failed,
         "selection": {"prefix": sel.prefix, "since": summary.since, "until": summary.until},
         "lease": dataclasses.asdict(req.lease), **req.config.to_dict()}, indent=2, default=str).encode())


def _plan(req: RunRequest, summary: RunSummary, model_id: str, echo: Callable[[str], None]) -> _Work:
    """List the source, diff it with the committed ledger, and count what the run will do."""
    listing = list_selection(req.source, req.config.source, req.selection)
    ledger = read_ledger(req.workdir)
    current = ledger_snapshot_name(req.workdir)
    unpublished = current != published_snapshot_name(req.workdir)
    pending_run = current.removeprefix("ledger-").removesuffix(".parquet") if unpublished and current else None
    items, listed, bad_names = split_unrepresentable(listing.items, listing.listed)
    todo, unchanged, deleted = plan_work(items, ledger, model_id, req.full, req.retry_failed,
                                         listed=listed, in_scope=lambda uri: uri.startswith(listing.scope))
    work = _Work(
        ledger=ledger, pending_run=pending_run, unpublished=unpublished,
        todo=[i for i in todo if i.uri not in bad_names and i.uri not in listing.refused],
        unchanged=unchanged, deleted=deleted,
        unnamed=[i for i in todo if i.uri in bad_names],
        links=[i for i in todo if i.uri in listing.refused and i.uri not in bad_names],
        refused=dict(listing.refused),
    )
    summary.inputs_total = len(listing.items)
    summary.unchanged = len(unchanged)
    summary.deleted = len(deleted)
    summary.skipped_by_range = listing.skipped_by_range
    outside = f", {listing.skipped_by_range} outside the time range" if listing.skipped_by_range else ""
    echo(f"run {summary.run_id}: {len(listing.items)} inputs, {len(work.todo)} to process, {len(unchanged)} "
         f"unchanged, {len(deleted)} deleted{outside}")
    return work


def _carried_over(work: _Work) -> dict[str, LedgerEntry]:
    """The new ledger before the DAG: entries this run does not look at (outside the
    prefix or the time range) carry over; unchanged and deleted ones are recorded."""
    entries: dict[str, LedgerEntry] = {u: e for u, e in work.ledger.items() if e.state != "deleted"}
    entries.update({e.uri: e for e in work.unchanged})
    entries.update({e.uri: e for e in work.deleted})
    return entries


def _publish_wanted(req: RunRequest, summary: RunSummary, work: _Work, entries: dict[str, LedgerEntry],
                    model_id: str, index_root: str) -> bool:
    """Whether the committed ledger calls for a new version; when not, the summary says why."""
    latest = mf.read_latest(index_root)
    changed = work.unpublished or latest is None or live_keys(work.ledger.values()) != live_keys(entries.values())
    other_model = sum(1 for e in entries.values() if e.state == "indexed" and e.model_id != model_id)
    summary.index_version = latest
    max_error_fraction = req.config.run.max_error_fraction
    if work.processed > 0 and summary.failed / work.processed > max_error_fraction:
        summary.exit_code = EXIT_TOO_MANY_FAILURES
        summary.index_note = (f"not published: {summary.failed}/{work.processed} items failed, over "
                              f"max_error_fraction {max_error_fraction}")
    elif not changed:
        summary.index_note = "nothing changed: LATEST stays"
    elif not any(e.state == "indexed" for e in entries.values()):
        summary.index_note = "no indexed items: no version built"
    elif other_model:
        summary.index_note = (f"not published: {other_model} indexed inputs were embedded with another model than "
                              f"{model_id}; a run over them (without --prefix/--since/--until) re-embeds them")
    else:
        return True
    return False
