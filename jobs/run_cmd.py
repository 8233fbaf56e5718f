"""`xmodal-index run`: the whole DAG over an archive, then a new index version."""

from __future__ import annotations

import logging
import sys

import click

from xmodal_index.jobs.config import ConfigError, load_config
from xmodal_index.jobs.run_job import EXIT_ERROR, RunRequest, RunSummary, execute

logger = logging.getLogger(__name__)


def one_line(err: BaseException) -> str:
    """The root cause of an error as one line (Beam wraps worker errors in long tracebacks)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[-1] if lines else ""
    if not text:
        return type(err).__name__
    return text if ":" in text.split(" ", 1)[0] else f"{type(err).__name__}: {text}"


def print_summary(s: RunSummary) -> None:
    click.echo(f"run {s.run_id}  ({s.wall_s:.1f} s)")
    click.echo(f"  inputs   {s.inputs_total:>7}  = indexed {s.indexed} + unchanged {s.unchanged} + failed {s.failed}")
    click.echo(f"  deleted  {s.deleted:>7}")
    if s.failed_by_stage:
        click.echo("  failures by stage: " + ", ".join(f"{k} {v}" for k, v in sorted(s.failed_by_stage.items())))
    click.echo(f"  segments {s.segments:>7}  rows written {s.rows_written}")
    click.echo(f"  model    {s.model_id}")
    click.echo(f"  index    {s.workdir.rstrip('/')}/indexes/{s.index_name}  version {s.index_version or '-'}: {s.index_note}")
    click.echo(f"  summary  {s.workdir.rstrip('/')}/runs/{s.run_id}/summary.json")
    if s.failed:
        click.echo(f"  dead letters: {s.workdir.rstrip('/')}/deadletter/run_id={s.run_id}/")


@click.command(context_settings={"ignore_unknown_options": False, "show_default": True})
@click.option("--source", required=True, help="Archive to index: a local path, file:// or s3:// URI (prefix).")
@click.option("--workdir", required=True, help="Where embeddings, dead letters, ledger, runs and indexes go (local path, file:// or s3://).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML or JSON job config with [source] [decode] [encoder] [index] [run] tables (default: built-in defaults).")
@click.option("--index-name", default="main", help="Index to publish under WORKDIR/indexes/NAME.")
@click.option("--runner", default="DirectRunner", help="Beam runner (DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, ...).")
@click.option("--full", is_flag=True, help="Reprocess every input, even those the ledger says are unchanged.")
@click.option("--retry-failed", is_flag=True, help="Reprocess inputs that failed in earlier runs even if unchanged.")
@click.option("--segment-s", type=float, default=None, help="Override [decode] segment_s: segment length in seconds (default: from config, 2.0).")
@click.option("--max-error-fraction", type=float, default=None,
              help="Override [run] max_error_fraction: fail (exit 3, nothing published) above this fraction of failed items (default: from config, 0.1).")
@click.option("--progress/--no-progress", default=None, help="Live progress line on stderr (default: only when stderr is a terminal).")
@click.argument("beam_args", nargs=-1, type=click.UNPROCESSED)
def run(source, workdir, config_path, index_name, runner, full, retry_failed, segment_s, max_error_fraction, progress,
        beam_args):
    """Index the archive at SOURCE into WORKDIR and publish a new index version.

    Extra arguments after `--` go to Beam's PipelineOptions untouched, e.g.
    `-- --direct_num_workers=4 --direct_running_mode=multi_processing`.

    Exit codes: 0 the run completed (bad inputs are dead-lettered, not fatal);
    1 the run could not complete (bad config, unreachable storage, ...);
    3 more than max_error_fraction of the inputs failed (no version published).
    """
    try:
        cfg = load_config(config_path)
        if segment_s is not None:
            cfg = cfg.replace("decode", segment_s=segment_s)
        if max_error_fraction is not None:
            cfg = cfg.replace("run", max_error_fraction=max_error_fraction)
    except ConfigError as err:
        raise click.BadParameter(str(err), param_hint="--config" if config_path else None) from err
    bad_args = [a for a in beam_args if not a.startswith("--")]
    if bad_args:
        raise click.BadParameter(f"Beam arguments must look like --name=value, got {bad_args[0]!r}", param_hint="BEAM_ARGS")
    show = sys.stderr.isatty() if progress is None else progress
    req = RunRequest(source=source, workdir=workdir, config=cfg, index_name=index_name, runner=runner,
                     beam_args=tuple(beam_args), full=full, retry_failed=retry_failed, show_progress=show)
    try:
        summary = execute(req, echo=lambda m: click.echo(m, err=True))
    except Exception as err:  # noqa: BLE001 - one-line reason, non-zero exit
        logger.debug("run failed", exc_info=True)
        click.echo(f"xmodal-index run: error: {one_line(err)} (-vv shows the traceback)", err=True)
        sys.exit(EXIT_ERROR)
    print_summary(summary)
    sys.exit(summary.exit_code)
