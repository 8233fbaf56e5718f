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
    import), without scipy RunInference's memory metric (once per batch), and in
    multi_processing mode its workers' start-up (relayed by the job service)."""

    NOISE = ("apitools not found", "Resource module is not available", "No semi_persistent_directory found",
             "Discarding unparseable args: ['--pipeline_type_check', '--direct_runner_use_stacked_bundle']")

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


class _LazyGroup(click.Group):
    """A group whose commands (LAZY_COMMANDS) import their modules only when they run."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        return _load_command(cmd_name) if cmd_name in LAZY_COMMANDS else None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        limit = formatter.width - 6 - max(len(n) for n in self.list_commands(ctx))
        for name in self.list_commands(ctx):
            if name in self.commands:
                command = self.commands[name]
                if command.hidden:
                    continue
                rows.append((name, command.get_short_help_str(limit)))
            else:
                rows.append((name, click.Command(name, help=LAZY_COMMANDS[name][2]).get_short_help_str(limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="xmodal-index")
@click.option("-v", "--verbose", count=True,
              help="More log output on stderr: -v adds INFO lines of this tool, -vv DEBUG and the INFO lines of "
                   "Beam and boto. Default: warnings and errors.")
@click.option("-q", "--quiet", count=True,
              help="Less log output on stderr: errors only (warnings hidden). Default: off.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: int) -> None:
    """Index media archives into one cross-modal space and query the published indexes."""
    setup_logging(verbose, quiet)


# name -> (module, attribute, one-line summary). Commands load on first use, so `--help`
# and every command import only what they need (not Beam, torch or faiss up front); the
# summaries are the commands' own first docstring lines (tests/test_query_fast_path.py checks).
LAZY_COMMANDS = {
    "run": ("xmodal_index.jobs.run_cmd", "run",
            "Index the archive at SOURCE into WORKDIR and publish a new index version."),
    "query": ("xmodal_index.jobs.query_cmd", "query",
              "Find the moments matching a query in every modality of a published index."),
    "make-sample": ("xmodal_index.jobs.sample_cmd", "make_sample",
                    "Write a small real media archive with known ground truth (spoken and handwritten digits)."),
    "train": ("xmodal_index.jobs.train_cmd", "train",
              "Learn the built-in encoder's towers and hash heads; write a safetensors checkpoint."),
    "eval": ("xmodal_index.jobs.eval_cmd", "eval_cmd",
             "Cross-modal retrieval mAP (float and hash codes) with leave-one-speaker-out folds."),
    "versions": ("xmodal_index.jobs.versions_cmd", "versions",
                 "List the index versions with their key metrics (LATEST marked with *)."),
    "promote": ("xmodal_index.jobs.versions_cmd", "promote",
                "Point LATEST at VERSION (e.g. v000003), newer or older (a rollback)."),
    "gc": ("xmodal_index.jobs.versions_cmd", "gc",
           "Delete old index versions: all but the KEEP newest, never LATEST or its parent."),
    "deadletter": ("xmodal_index.jobs.deadletter_cmd", "deadletter",
                   "List failed inputs of WORKDIR grouped by stage and error class, with example URIs."),
    "serve": ("xmodal_index.jobs.serve_cmd", "serve",
              "Serve queries over HTTP, hot-swapping to each new LATEST version."),
    "report": ("xmodal_index.jobs.report_cmd", "report",
               "Write a run's self-contained HTML report: counts, throughput, failures, index version, "
               "sample hits."),
}


def _load_command(name: str) -> click.Command | None:
    """The command ``name`` from its module (None when that optional module is not installed)."""
    import importlib

    module, attr, _ = LAZY_COMMANDS[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module:
            raise
        return None
    command = getattr(mod, attr)
    cli.add_command(command, name)
    return command


def _register() -> None:
    """Commands load lazily (``_LazyGroup``); nothing to import here."""


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
