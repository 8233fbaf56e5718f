"""`xmodal-index`: the command-line entry point (click)."""

from __future__ import annotations

import logging
import os
import sys

import click

from xmodal_index import __version__

logger = logging.getLogger(__name__)


class _DropImportNoise(logging.Filter):
    """Beam warns about optional parts this tool never uses: GCP client libraries (at
    import) and, without scipy, RunInference's memory metric (once per batch)."""

    NOISE = ("apitools not found", "Resource module is not available")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.NOISE)


class _DropLibraryChatter(logging.Filter):
    """Below -vv, INFO and DEBUG records that libraries log on the root logger itself
    (Beam's runners do: ``logging.info(...)``) stay out; this tool names its loggers."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != "root" or record.levelno >= logging.WARNING


# libraries whose INFO lines are noise for an operator: shown from -vv on
LIBRARY_LOGGERS = ("apache_beam", "botocore", "boto3", "urllib3", "s3transfer", "grpc", "numba", "matplotlib", "PIL")


def log_level(verbose: int, quiet: int) -> int:
    """WARNING by default; -v INFO, -vv DEBUG; -q ERROR only."""
    return min(max(logging.WARNING - 10 * (verbose - quiet), logging.DEBUG), logging.ERROR)


def setup_logging(verbose: int = 0, quiet: int = 0) -> None:
    """One stderr handler on the root logger at the level -v/-q ask for. Libraries
    (Beam, boto) log WARNING and above unless -vv."""
    level = log_level(verbose, quiet)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_DropImportNoise())
    if verbose - quiet < 2:
        handler.addFilter(_DropLibraryChatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING) if verbose - quiet < 2 else logging.NOTSET)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="xmodal-index")
@click.option("-v", "--verbose", count=True,
              help="More log output on stderr: -v adds INFO lines of this tool, -vv DEBUG and the INFO lines of "
                   "Beam and boto. Default: warnings and errors.")
@click.option("-q", "--quiet", count=True, help="Less log output on stderr: errors only (warnings hidden). Default: off.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: int) -> None:
    """Index media archives into one cross-modal space and query the published indexes."""
    setup_logging(verbose, quiet)


def _register() -> None:
    from xmodal_index.jobs.query_cmd import query
    from xmodal_index.jobs.run_cmd import run

    cli.add_command(run)
    cli.add_command(query)
    optional = [
        ("xmodal_index.jobs.sample_cmd", "make_sample"),
        ("xmodal_index.jobs.train_cmd", "train"),
        ("xmodal_index.jobs.eval_cmd", "eval_cmd"),
        ("xmodal_index.jobs.versions_cmd", "versions"),
        ("xmodal_index.jobs.versions_cmd", "promote"),
        ("xmodal_index.jobs.versions_cmd", "gc"),
        ("xmodal_index.jobs.deadletter_cmd", "deadletter"),
        ("xmodal_index.jobs.serve_cmd", "serve"),
        ("xmodal_index.jobs.report_cmd", "report"),
    ]
    import importlib

    for module, name in optional:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            continue
        cli.add_command(getattr(mod, name))


logging.getLogger().addFilter(_DropImportNoise())  # import-time warnings, before any handler is set up
_register()


def main() -> None:
    """Console entry point.

    Once a command has finished, the process ends with os._exit after flushing:
    native libraries loaded by the commands (threads of the decoders, grpc, torch)
    can otherwise abort during interpreter teardown ("terminate called without an
    active exception"), turning a completed command into a crash exit code.
    """
    code = 0
    try:
        cli(prog_name="xmodal-index")
    except SystemExit as exc:
        if isinstance(exc.code, int):
            code = exc.code
        elif exc.code is not None:
            print(exc.code, file=sys.stderr)
            code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
