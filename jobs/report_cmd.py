"""`xmodal-index report`: (re)write the HTML report of a past run from what it left in the workdir."""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile
import webbrowser

import click

from xmodal_index.sinks import storage
from xmodal_index.sinks.errors import SinkError

from .report import REPORT_NAME, ReportError, write_report

EXIT_ERROR = 1


@click.command(context_settings={"show_default": True})
@click.option("--workdir", required=True, help="The run's workdir (local path, file:// or s3://).")
@click.option("--run", "run_id", default="latest", help="Run id (a folder of WORKDIR/runs), or latest.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    show_default=f"WORKDIR/runs/RUN_ID/{REPORT_NAME}",
    help="Write the report to this local file instead.",
)
@click.option(
    "--samples/--no-samples",
    default=True,
    help="Sample hits of probe queries with thumbnails (loads the version's encoder: needs torch).",
)
@click.option("--open", "open_it", is_flag=True, help="Open the report in the default web browser.")
def report(workdir, run_id, out, samples, open_it):
    """Write a run's self-contained HTML report: counts, throughput, failures, index version, sample hits."""
    try:
        target = write_report(workdir, run_id, samples=samples, out=out)
    except (ReportError, SinkError) as err:
        click.echo(f"xmodal-index report: error: {err}", err=True)
        sys.exit(EXIT_ERROR)
    click.echo(target)
    if open_it:
        local = target
        if storage.is_s3(target):
            fd, local = tempfile.mkstemp(prefix="xmodal-report-", suffix=".html")
            with os.fdopen(fd, "wb") as f:
                f.write(storage.read_bytes(target))
        webbrowser.open(pathlib.Path(local.removeprefix("file://")).resolve().as_uri())
