"""`xmodal-index serve`: answer queries over HTTP from a published index, following LATEST."""

from __future__ import annotations

import logging
import signal
import sys
import threading

import click

from xmodal_index.jobs.query_cmd import resolve_index_root
from xmodal_index.jobs.query_support import prepare_encoder
from xmodal_index.jobs.server import MiB, QueryServer, ServerConfig
from xmodal_index.sinks.errors import SinkError
from xmodal_index.sinks.serving.hot_swap import HotSwapConfig, IndexHandle

logger = logging.getLogger(__name__)

EXIT_ERROR = 1
_SERVICE_LOGGERS = ("xmodal_index.jobs.server", "xmodal_index.jobs.serve_cmd", "xmodal_index.sinks.serving.hot_swap")


@click.command(context_settings={"show_default": True})
@click.option("--index", "index_uri", required=True,
              help="Index root (WORKDIR/indexes/NAME) or a workdir (then indexes/main); local path, file:// or s3://.")
@click.option("--version", default=None,
              help="Serve only this version, e.g. v000003 (disables hot swap). Default: the one LATEST names, "
                   "followed as it moves.")
@click.option("--host", default="127.0.0.1", help="Interface to listen on (0.0.0.0 for every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080,
              help="TCP port; 0 picks a free port and prints it.")
@click.option("--poll-s", type=click.FloatRange(min=0, min_open=True), default=30.0,
              help="Seconds between two reads of LATEST; a new version is verified and loaded before it is swapped in.")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=32 * MiB,
              help="Largest request body in bytes (32 MiB); larger requests get 413.")
@click.option("--max-k", type=click.IntRange(min=1), default=1000,
              help="Largest k (hits per query) a request may ask for; more gets 422.")
@click.option("--request-timeout-s", type=click.FloatRange(min=0, min_open=True), default=30.0,
              help="Seconds one request may take, from its first byte to its answer: a body still arriving "
                   "then gets 408, a query still running 504.")
@click.option("--threads", type=click.IntRange(min=1), default=4,
              help="Worker threads running queries at the same time.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where versions of a remote (s3://) index are fetched (default: $XMODAL_INDEX_CACHE or "
                   "~/.cache/xmodal-index).")
def serve(index_uri, version, host, port, poll_s, max_body_bytes, max_k, request_timeout_s, threads, cache_dir):
    """Serve GET /healthz and POST /query over HTTP, hot-swapping to each new LATEST version.

    POST /query takes JSON {"text": ..., "k": ..., "modality": [...]} or multipart/form-data
    with one file field named audio, image or video (and optional k and modality fields);
    it answers {"version": ..., "hits": [{uri, modality, start_s, end_s, score, segment_id, text}]}.
    """
    for name in _SERVICE_LOGGERS:  # access lines and swaps are this command's output
        log = logging.getLogger(name)
        log.setLevel(min(log.getEffectiveLevel(), logging.INFO))
    try:
        server_config = ServerConfig(host=host, port=port, max_body_bytes=max_body_bytes, max_k=max_k,
                                     request_timeout_s=request_timeout_s, threads=threads)
        swap_config = HotSwapConfig(poll_s=poll_s, version=version, cache_dir=cache_dir)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    handle = IndexHandle(resolve_index_root(index_uri), swap_config, prepare=prepare_encoder)
    try:
        handle.start()
    except SinkError as err:
        click.echo(f"xmodal-index serve: error: {err}", err=True)
        sys.exit(EXIT_ERROR)
    except Exception as err:  # noqa: BLE001 - an unreadable pinned version ends in one line
        click.echo(f"xmodal-index serve: error: {type(err).__name__}: {err}", err=True)
        sys.exit(EXIT_ERROR)
    try:
        server = QueryServer(handle, server_config)
    except OSError as err:
        handle.close()
        click.echo(f"xmodal-index serve: error: cannot listen on {host}:{port}: {err}", err=True)
        sys.exit(EXIT_ERROR)
    status = handle.status()
    serving = status.version or f"no version yet ({status.last_error})"
    click.echo(f"serving {handle.index_root} {serving} on {server.url}")
    sys.stdout.flush()
    _run_until_signalled(server)
    handle.close()


def _run_until_signalled(server: QueryServer) -> None:
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():  # signals can only be caught there
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        while not stop.wait(1.0):
            pass
        logger.info("stopping: finishing the queries in flight")
    finally:
        server.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
