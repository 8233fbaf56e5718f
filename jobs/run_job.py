"""The `run` job: list -> diff with the ledger -> Beam DAG -> ledger -> index version -> summary."""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import logging
import os
import secrets
import sys
import tempfile
import threading
import time
from typing import Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from xmodal_index.encoders.loading import load_encoder
from xmodal_index.jobs.config import RunConfig
from xmodal_index.pipeline import progress
from xmodal_index.pipeline.dag import (
    IndexArchive,
    deadletter_prefix,
    embeddings_prefix,
    item_to_json,
    outcome_from_json,
    outcomes_prefix,
    read_worklist,
)
from xmodal_index.pipeline.listing import list_items
from xmodal_index.pipeline.types import MediaItem
from xmodal_index.sinks import storage
from xmodal_index.sinks.errors import ObjectNotFoundError
from xmodal_index.sinks.embeddings_io import batch_reader
from xmodal_index.sinks.index_build import build_version
from xmodal_index.sinks.ledger import (
    LedgerEntry,
    ledger_snapshot_name,
    mark_published,
    published_snapshot_name,
    read_ledger,
    write_ledger,
)
from xmodal_index.sinks.manifest import read_latest
from xmodal_index.sinks.schema import DEADLETTER_SCHEMA

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_TOO_MANY_FAILURES = 3


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


@dataclasses.dataclass(frozen=True)
class RunRequest:
    source: str
    workdir: str
    config: RunConfig
    index_name: str = "main"
    runner: str = "DirectRunner"
    beam_args: tuple[str, ...] = ()
    full: bool = False
    retry_failed: bool = False
    show_progress: bool = False


def new_run_id() -> str:
    """UTC time to the millisecond plus a random suffix: run ids sort by start time."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z-" + secrets.token_hex(3)


def plan_work(items: Sequence[MediaItem], ledger: dict[str, LedgerEntry], model_id: str, full: bool,
              retry_failed: bool) -> tuple[list[MediaItem], list[LedgerEntry], list[LedgerEntry]]:
    """Split listed items into (to process, unchanged ledger entries, deleted ledger entries)."""
    todo, unchanged = [], []
    listed = set()
    for item in items:
        listed.add(item.uri)
        prev = ledger.get(item.uri)
        same = prev is not None and prev.etag == item.etag and prev.state != "deleted"
        if not full and same and (prev.state == "failed" and not retry_failed or
                                  prev.state == "indexed" and prev.model_id == model_id):
            unchanged.append(prev)
        else:
            todo.append(item)
    deleted = [
        dataclasses.replace(e, state="deleted", segments=0)
        for uri, e in ledger.items()
        if uri not in listed and e.state != "deleted"
    ]
    return todo, unchanged, deleted


def _list_parts(prefix: str, suffix: str) -> list[str]:
    try:
        objs = list(storage.list_objects(prefix))
    except ObjectNotFoundError:
        return []
    base = prefix.rstrip("/") + "/"
    out = []
    for o in objs:
        rel = o.uri[len(base):] if o.uri.startswith(base) else os.path.basename(o.uri)
        if "/" not in rel and rel.startswith("part-") and rel.endswith(suffix):
            out.append(o.uri)
    return sorted(out)


def _read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    with storage.open_read(uri) as f:
        return pq.read_table(f, columns=columns)


def read_deadletters(workdir: str, run_id: str) -> list[dict]:
    rows = []
    for uri in _list_parts(deadletter_prefix(workdir, run_id), ".parquet"):
        rows.extend(_read_parquet(uri).to_pylist())
    return rows


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
        from xmodal_index.sinks.storage import beam_s3_options

        extra = {k: v for k, v in beam_s3_options().items() if f"--{k}" not in flags}
    return PipelineOptions(args, **extra)


class _ProgressLine:
    """Live items/segments/rate line on stderr while the DAG runs (terminals only)."""

    def __init__(self, total: int, enabled: bool):
        self._total, self._enabled = total, enabled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        progress.reset()
        if self._enabled:
            self._t0 = time.monotonic()
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            s = progress.snapshot()
            done = s["items_done"] + s["items_failed"]
            dt = max(time.monotonic() - self._t0, 1e-6)
            rate = done / dt
            eta = (self._total - done) / rate if rate > 0 else float("nan")
            sys.stderr.write(
                f"\r  items {done}/{self._total} ({s['items_failed']} failed)  segments {s['segments']}"
                f"  {rate:.1f} items/s  ETA {eta:.0f}s   "
            )
            sys.stderr.flush()

    def __exit__(self, *exc) -> None:
        if self._enabled:
            self._stop.set()
            self._thread.join()
            sys.stderr.write("\n")


def run_dag(req: RunRequest, run_id: str, todo: Sequence[MediaItem], dim: int, bits: int) -> None:
    import apache_beam as beam

    worklist = storage.join(req.workdir, "runs", run_id, "worklist.jsonl")
    storage.write_bytes(worklist, "".join(item_to_json(i) + "\n" for i in todo).encode())
    cfg = req.config
    with _ProgressLine(len(todo), req.show_progress):
        with beam.Pipeline(options=_beam_options(req, run_id)) as p:
            items = read_worklist(p, worklist)
            items | "IndexArchive" >> IndexArchive(req.workdir, run_id, cfg.decode, cfg.encoder, dim, bits,
                                                   isolate_decoding=cfg.run.isolate_decoding)


def _outcomes(workdir: str, run_id: str) -> dict[str, dict]:
    out = {}
    for uri in _list_parts(outcomes_prefix(workdir, run_id), ".jsonl"):
        for line in storage.read_bytes(uri).decode().splitlines():
            if line.strip():
                o = outcome_from_json(line)
                out[o.uri] = dataclasses.asdict(o)
    return out


def _write_lost(workdir: str, run_id: str, lost: list[MediaItem]) -> None:
    """Items with neither an outcome nor a dead letter still get a dead-letter row."""
    now = datetime.datetime.now(datetime.timezone.utc)
    rows = [dict(uri=i.uri, etag=i.etag, stage="pipeline", error_type="NoOutcome",
                 message="the DAG finished without an outcome for this item", run_id=run_id, at=now) for i in lost]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=DEADLETTER_SCHEMA), buf)
    storage.write_bytes(storage.join(deadletter_prefix(workdir, run_id), "part-lost.parquet"), buf.getvalue())


def live_batches(workdir: str, ledger: dict[str, LedgerEntry], model_id: str) -> Callable[[], Iterator[pa.RecordBatch]]:
    """Rows of every indexed ledger entry, read (streamed) from the run that wrote them."""
    live = [e for e in ledger.values() if e.state == "indexed"]
    runs = sorted({e.run_id for e in live})
    files = [f for r in runs for f in _list_parts(embeddings_prefix(workdir, r), ".parquet")]
    return batch_reader(files, uri_etags=[(e.uri, e.etag) for e in live], model_id=model_id)


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


def execute(req: RunRequest, echo: Callable[[str], None] = lambda s: None) -> RunSummary:
    """Run the whole job; returns the summary (also written to runs/RUN_ID/summary.json)."""
    t0 = time.monotonic()
    run_id = new_run_id()
    summary = RunSummary(run_id=run_id, source=req.source, workdir=req.workdir, index_name=req.index_name,
                         started_at=datetime.datetime.now(datetime.timezone.utc).isoformat())
    cfg = req.config
    run_dir = storage.join(req.workdir, "runs", run_id)
    storage.write_bytes(storage.join(run_dir, "config.json"), json.dumps(
        {"source": req.source, "workdir": req.workdir, "index_name": req.index_name, "runner": req.runner,
         "beam_args": list(req.beam_args), "full": req.full, "retry_failed": req.retry_failed,
         **cfg.to_dict()}, indent=2, default=str).encode())

    encoder = load_encoder(cfg.encoder)
    summary.model_id = encoder.model_id
    items = list_items(req.source, cfg.source)
    ledger = read_ledger(req.workdir)
    unpublished = ledger_snapshot_name(req.workdir) != published_snapshot_name(req.workdir)
    todo, unchanged, deleted = plan_work(items, ledger, encoder.model_id, req.full, req.retry_failed)
    summary.inputs_total = len(items)
    summary.unchanged = len(unchanged)
    summary.deleted = len(deleted)
    echo(f"run {run_id}: {len(items)} inputs, {len(todo)} to process, {len(unchanged)} unchanged, {len(deleted)} deleted")

    new_entries: dict[str, LedgerEntry] = {e.uri: e for e in unchanged}
    new_entries.update({e.uri: e for e in deleted})
    if todo:
        run_dag(req, run_id, todo, encoder.dim, encoder.bits)
        dead = read_deadletters(req.workdir, run_id)
        outcomes = _outcomes(req.workdir, run_id)
        dead_uris: dict[str, str] = {}
        for d in dead:
            dead_uris.setdefault(d["uri"], d["stage"])
        lost = [i for i in todo if i.uri not in outcomes and i.uri not in dead_uris]
        if lost:
            _write_lost(req.workdir, run_id, lost)
            dead_uris.update({i.uri: "pipeline" for i in lost})
        for item in todo:
            if item.uri in dead_uris:
                stage = dead_uris[item.uri]
                summary.failed += 1
                summary.failed_by_stage[stage] = summary.failed_by_stage.get(stage, 0) + 1
                new_entries[item.uri] = LedgerEntry(item.uri, item.etag, item.size, item.mtime, "failed", 0,
                                                    encoder.model_id, run_id)
            else:
                n = outcomes[item.uri]["segments"]
                summary.indexed += 1
                summary.segments += n
                new_entries[item.uri] = LedgerEntry(item.uri, item.etag, item.size, item.mtime, "indexed", n,
                                                    encoder.model_id, run_id)
    summary.rows_written = _count_rows(req.workdir, run_id) if todo else 0
    snapshot = write_ledger(req.workdir, run_id, new_entries.values())

    processed = len(todo)
    too_many = processed > 0 and summary.failed / processed > cfg.run.max_error_fraction
    index_root = storage.join(req.workdir, "indexes", req.index_name)
    latest = read_latest(index_root)
    dropped = sum(1 for e in deleted if ledger[e.uri].state == "indexed")
    changed = summary.indexed > 0 or dropped > 0 or latest is None or unpublished
    if too_many:
        summary.exit_code = EXIT_TOO_MANY_FAILURES
        summary.index_version = latest
        summary.index_note = (f"not published: {summary.failed}/{processed} items failed, over "
                              f"max_error_fraction {cfg.run.max_error_fraction}")
    elif not changed:
        summary.index_version = latest
        summary.index_note = "nothing changed: LATEST stays"
    elif not any(e.state == "indexed" for e in new_entries.values()):
        summary.index_version = latest
        summary.index_note = "no indexed items: no version built"
    else:
        echo("building index version ...")
        with tempfile.TemporaryDirectory(prefix="xmodal-enc-") as tmp:
            manifest = build_version(
                live_batches(req.workdir, new_entries, encoder.model_id), index_root, model_id=encoder.model_id, dim=encoder.dim,
                bits=encoder.bits, config=cfg.index, extra_files=_encoder_files(encoder, cfg, tmp),
                metrics_extra={"run_id": run_id}, publish=True,
            )
        mark_published(req.workdir, snapshot)
        summary.index_version = manifest.version
        summary.index_published = True
        summary.index_note = f"published {manifest.version} ({manifest.ntotal} vectors)"
    summary.wall_s = round(time.monotonic() - t0, 3)
    storage.write_bytes(storage.join(run_dir, "summary.json"), json.dumps(dataclasses.asdict(summary), indent=2).encode())
    return summary


def _count_rows(workdir: str, run_id: str) -> int:
    total = 0
    for uri in _list_parts(embeddings_prefix(workdir, run_id), ".parquet"):
        with storage.open_read(uri) as fh:
            total += pq.ParquetFile(fh).metadata.num_rows
    return total
