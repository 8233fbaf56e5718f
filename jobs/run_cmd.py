"""`xmodal-index run`: the whole DAG over an archive, then a new index version."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import re
import sys
from typing import NoReturn

import click

from xmodal_index.sinks.storage import S3Config, configure_s3
from xmodal_index.sinks.storage.lease import LeaseConfig, LeaseHeldError
from xmodal_index.sinks.workdir import Workdir

from . import loopback
from .beam_args import BeamArgsError, check_beam_args
from .config import ConfigError, load_config, user_message
from .deadletter_cmd import failure_groups, format_groups, printable
from .portable import PortableEndpointError, check_portable_endpoints
from .progress_display import DEFAULT_EVERY_S, ProgressSettings
from .progress_display import configure as configure_progress
from .run_job import (
    EXIT_ERROR,
    EXIT_GATE_REFUSED,
    EXIT_LEASE_HELD,
    RunRequest,
    RunSummary,
    Selection,
    execute,
    read_deadletters,
)

logger = logging.getLogger(__name__)

EXIT_USAGE = 2  # bad command line, config file or Beam flag: nothing was done

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now: datetime.datetime | None = None) -> datetime.datetime:
    """An ISO 8601 date or date-time (UTC unless it names an offset; a trailing Z is
    accepted), or an age such as 36h, 7d, 2w (that long before ``now``)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    text = text.strip()
    match = _RELATIVE.fullmatch(text)
    if match:
        return now - datetime.timedelta(seconds=float(match.group(1)) * _UNITS_S[match.group(2)])
    iso = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
    try:
        value = datetime.datetime.fromisoformat(iso)
    except ValueError as err:
        raise ValueError(f"{text!r} is neither an ISO 8601 date/time (2024-05-01, 2024-05-01T06:00:00Z) "
                         "nor an age like 36h, 7d, 2w") from err
    return value if value.tzinfo is not None else value.replace(tzinfo=datetime.timezone.utc)


def _beam_io_cause(err: BaseException) -> str | None:
    """Beam's file-system errors nest the real cause per path in ``exception_details``."""
    path, inner = None, None
    while isinstance(details := getattr(err, "exception_details", None), dict) and details:
        path, cause = next(iter(details.items()))
        if not isinstance(cause, BaseException):
            break
        err = inner = cause
    if inner is None:
        return None
    text = inner.args[0] if inner.args and isinstance(inner.args[0], str) else str(inner)
    return f"{type(inner).__name__}: {' '.join(text.split())} ({path})"


def one_line(err: BaseException) -> str:
    """The root cause of an error as one line (Beam wraps worker errors in long tracebacks)."""
    cause = _beam_io_cause(err)
    if cause is not None:
        return cause
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[-1] if lines else ""
    if not text:
        return type(err).__name__
    return text if ":" in text.split(" ", 1)[0] else f"{type(err).__name__}: {text}"


def _usage_error(message: str) -> NoReturn:
    """A bad config file, config value or Beam flag: one line, exit 2, nothing done."""
    click.echo(f"xmodal-index run: error: {printable(message)}", err=True)
    sys.exit(EXIT_USAGE)


def _check_index_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]+", value) or value in (".", ".."):
        raise click.BadParameter(f"{value!r} must be letters, digits, '.', '_' or '-' "
                                 "(it names a folder of the workdir)",
                                 param_hint="--index-name")
    return value


def print_summary(s: RunSummary) -> None:
    click.echo(f"run {s.run_id}  ({s.wall_s:.1f} s)")
    click.echo(f"  inputs   {s.inputs_total:>7}  = indexed {s.indexed} + unchanged {s.unchanged} + failed {s.failed}")
    click.echo(f"  deleted  {s.deleted:>7}")
    if s.prefix or s.since or s.until:
        click.echo(f"  range    prefix {s.prefix or '-'!r}, modified in [{s.since or '-'}, {s.until or '-'}), "
                   f"{s.skipped_by_range} listed inputs outside it")
    if s.failed_by_stage:
        click.echo("  failures by stage: " + ", ".join(f"{k} {v}" for k, v in sorted(s.failed_by_stage.items())))
    click.echo(f"  segments {s.segments:>7}  rows written {s.rows_written}")
    click.echo(f"  model    {s.model_id}")
    click.echo(f"  index    {Workdir(s.workdir).index_root(s.index_name)}  "
               f"version {s.index_version or '-'}: {s.index_note}")
    if s.gate:
        click.echo(f"  gate     {s.gate}")
    click.echo(f"  summary  {Workdir(s.workdir).summary(s.run_id)}")
    click.echo(f"  report   {Workdir(s.workdir).report(s.run_id)}  (xmodal-index report --workdir {s.workdir} --open)")
    if s.deadletters:
        click.echo(f"  dead letters: {s.deadletters}/  (xmodal-index deadletter --workdir {s.workdir})")
        try:
            groups = failure_groups(read_deadletters(s.workdir, s.run_id), examples=1)
        except Exception:
            logger.debug("cannot read dead letters back", exc_info=True)
            return
        for line in format_groups(groups[:8]):
            click.echo("    " + line)


def _s3_settings(endpoint_url: str | None, region: str | None, profile: str | None) -> None:
    if not (endpoint_url or region or profile):
        return
    try:
        base = S3Config.from_env()
        configure_s3(dataclasses.replace(base, endpoint_url=endpoint_url or base.endpoint_url,
                                         region=region or base.region, profile=profile or base.profile))
    except ValueError as err:
        raise click.BadParameter(user_message(err), param_hint="--s3-endpoint-url/--s3-region/--s3-profile") from err


def _selection(prefix: str, since: str | None, until: str | None) -> Selection:
    now = datetime.datetime.now(datetime.timezone.utc)
    bounds = {}
    for name, text in (("since", since), ("until", until)):
        if text is not None:
            try:
                bounds[name] = parse_time(text, now)
            except ValueError as err:
                raise click.BadParameter(str(err), param_hint=f"--{name}") from err
    try:
        return Selection(prefix=prefix, **bounds)
    except ValueError as err:
        raise click.BadParameter(user_message(err), param_hint="--prefix/--since/--until") from err


@click.command(context_settings={"ignore_unknown_options": False, "show_default": True})
@click.option("--source", required=True, help="Archive to index: a local path, file:// or s3:// URI (prefix).")
@click.option("--workdir", required=True,
              help="Where embeddings, dead letters, ledger, runs and indexes go (local path, file:// or s3://).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML or JSON job config with [source] [decode] [encoder] [index] [run] tables "
                   "(default: built-in defaults).")
@click.option("--index-name", default="main", callback=lambda ctx, param, value: _check_index_name(value),
              help="Index to publish under WORKDIR/indexes/NAME (letters, digits, '.', '_', '-').")
@click.option("--runner", default="DirectRunner",
              help="Beam runner (DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, ...).")
@click.option("--full", is_flag=True, help="Reprocess every selected input, even those the ledger says are unchanged.")
@click.option("--rebuild-index", is_flag=True,
              help="Build the index version from every live row, retraining its quantizers, even where an "
                   "incremental version (delta shards and tombstones on LATEST, [incremental] policy) would do.")
@click.option("--retry-failed", is_flag=True, help="Reprocess inputs that failed in earlier runs even if unchanged.")
@click.option("--force", is_flag=True,
              help="Publish the new version even if the publish gate refuses it: recall or mAP regressed beyond [gate] "
                   "tolerances, or it drops more live items or vectors than [gate] max_deleted_fraction (0.2) / "
                   "max_ntotal_drop_fraction (0.5) allow.")
@click.option("--prefix", default="", show_default="whole source",
              help="Backfill only objects whose path relative to --source starts with this (e.g. videos/2024/). "
                   "Only objects under it can be marked deleted.")
@click.option("--since", default=None, show_default="no lower bound",
              help="Only objects last modified at or after this UTC time: 2024-05-01, 2024-05-01T06:00:00Z, "
                   "or an age like 36h, 7d.")
@click.option("--until", default=None, show_default="no upper bound",
              help="Only objects last modified before this UTC time (same forms as --since).")
@click.option("--segment-s", type=float, default=None,
              help="Override [decode] segment_s: segment length in seconds (default: from config, 2.0).")
@click.option("--max-error-fraction", type=float, default=None,
              help="Override [run] max_error_fraction: fail (exit 3, nothing published) above this fraction of "
                   "failed items (default: from config, 0.1).")
@click.option("--wait-for-lease", type=click.FloatRange(min=0), default=0.0,
              help="Seconds to wait while another run holds the workdir lease (0: exit 4 at once).")
@click.option("--lease-ttl", type=click.FloatRange(min=1), default=LeaseConfig.ttl_s,
              help="Seconds after which the lease of a run that stopped renewing it may be taken over "
                   "(renewed every ttl/4).")
@click.option("--summary-out", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write the run's summary.json to this local file (written on failures too).")
@click.option("--s3-endpoint-url", default=None, show_default="AWS_ENDPOINT_URL or AWS",
              help="S3-compatible endpoint (MinIO, Ceph), e.g. http://minio:9000; same as XMODAL_S3_ENDPOINT_URL.")
@click.option("--s3-region", default=None, show_default="AWS_REGION / profile",
              help="S3 region; same as XMODAL_S3_REGION.")
@click.option("--s3-profile", default=None, show_default="AWS_PROFILE",
              help="Profile of the shared AWS config files to take settings and credentials from.")
@click.option("--progress/--no-progress", default=True,
              help="Progress on stderr: items done/failed, media-seconds and their rate, elapsed, ETA; a bar when "
                   "stderr is a terminal, else a plain line every --progress-every-s.")
@click.option("--progress-every-s", type=click.FloatRange(min=0.1), default=DEFAULT_EVERY_S,
              help="Seconds between two plain progress lines when stderr is not a terminal (nightly logs).")
@click.argument("beam_args", nargs=-1, type=click.UNPROCESSED)
def run(source, workdir, config_path, index_name, runner, full, rebuild_index, retry_failed, force, prefix, since,
        until, segment_s, max_error_fraction, wait_for_lease, lease_ttl, summary_out, s3_endpoint_url, s3_region,
        s3_profile, progress, progress_every_s, beam_args):
    """Index the archive at SOURCE into WORKDIR and publish a new index version.

    Only inputs that are new or changed (etag or size), or that were embedded by
    another model, are processed; inputs gone from the source are marked deleted
    and leave the next index version. Extra arguments after `--` go to Beam's
    PipelineOptions untouched, e.g. `-- --direct_num_workers=4 --direct_running_mode=multi_processing`;
    a flag Beam does not define is refused, naming it. Beam's local worker servers
    listen on loopback only.

    Exit codes: 0 the run completed (bad inputs are dead-lettered, not fatal);
    1 the run started but could not complete (unreachable storage, lost lease,
    LATEST moved by another writer meanwhile: nothing published, ...);
    2 bad command line, config file (unknown key, bad value, broken TOML) or Beam
    flag after `--`: one line names it, nothing was done;
    3 more than max_error_fraction of the inputs failed (no version published);
    4 another run holds the workdir lease (nothing done);
    5 the publish gate refused the new version (its recall or mAP regressed, or it
    deletes more than [gate] max_deleted_fraction of the live items or loses more
    than max_ntotal_drop_fraction of the vectors; it stays unpublished: `promote`
    or `run --force` publishes it).
    """
    try:
        cfg = load_config(config_path)
        if segment_s is not None:
            cfg = cfg.replace("decode", segment_s=segment_s)
        if max_error_fraction is not None:
            cfg = cfg.replace("run", max_error_fraction=max_error_fraction)
    except ConfigError as err:
        _usage_error(str(err))
    try:
        check_beam_args(beam_args)
    except BeamArgsError as err:
        _usage_error(f"after --: {err}")
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG and not any(
            a.startswith("--default_sdk_harness_log_level") for a in beam_args):
        beam_args = (*beam_args, "--default_sdk_harness_log_level=WARNING")  # worker processes: Beam's INFO from -vv on
    try:
        check_portable_endpoints(beam_args, runner)
    except PortableEndpointError as err:
        _usage_error(f"after --: {err}")
    selection = _selection(prefix, since, until)
    _s3_settings(s3_endpoint_url, s3_region, s3_profile)
    configure_progress(ProgressSettings(enabled=progress, every_s=progress_every_s))
    req = RunRequest(source=source, workdir=workdir, config=cfg, index_name=index_name, runner=runner,
                     beam_args=tuple(beam_args), full=full, rebuild_index=rebuild_index, retry_failed=retry_failed,
                     force=force,
                     show_progress=progress,
                     selection=selection, lease=LeaseConfig(ttl_s=lease_ttl, wait_s=wait_for_lease),
                     summary_out=summary_out)
    loopback.install()  # Beam's worker servers listen on loopback only
    try:
        summary = execute(req, echo=lambda m: click.echo(m, err=True))
    except LeaseHeldError as err:
        hint = "" if wait_for_lease else " (--wait-for-lease SECONDS waits for it)"
        click.echo(f"xmodal-index run: {one_line(err)}{hint}", err=True)
        sys.exit(EXIT_LEASE_HELD)
    except Exception as err:
        logger.debug("run failed", exc_info=True)
        click.echo(f"xmodal-index run: error: {one_line(err)} (-vv shows the traceback)", err=True)
        sys.exit(EXIT_ERROR)
    print_summary(summary)
    if summary.exit_code == EXIT_GATE_REFUSED:
        click.echo(f"xmodal-index run: {' '.join(summary.index_note.split())}", err=True)
    sys.exit(summary.exit_code)
