"""`xmodal-index serve`: answer queries over HTTP from a published index, following LATEST."""

from __future__ import annotations

import logging
import signal
import sys
import threading

import click

from xmodal_index.query.errors import QueryError
from xmodal_index.query.resolve import resolve_index_root
from xmodal_index.sinks.errors import SinkError
from xmodal_index.sinks.serving.hot_swap import HotSwapConfig, IndexHandle

from .serve_encoder import prepare_serving_encoder
from .serve_media import MediaQueryConfig
from .server import MiB, QueryServer, ServerConfig

logger = logging.getLogger(__name__)

EXIT_ERROR = 1
_SERVICE_LOGGERS = ("xmodal_index.jobs.server", "xmodal_index.jobs.serve_http", "xmodal_index.jobs.serve_media",
                    "xmodal_index.jobs.serve_cmd", "xmodal_index.sinks.serving.hot_swap")


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
@click.option("--max-inflight-body-bytes", type=click.IntRange(min=1), default=128 * MiB,
              help="Request bodies held in memory at once, in bytes (128 MiB); a request that would pass it "
                   "gets 503 with Retry-After.")
@click.option("--max-k", type=click.IntRange(min=1), default=1000,
              help="Largest k (hits per query) a request may ask for; more gets 422.")
@click.option("--request-timeout-s", type=click.FloatRange(min=0, min_open=True), default=30.0,
              help="Seconds one request may take, from its first byte to its answer: a body still arriving "
                   "then gets 408, a query still running 504.")
@click.option("--header-timeout-s", type=click.FloatRange(min=0, min_open=True), default=10.0,
              help="Seconds a client has to send a request line and its headers (and that a kept-alive "
                   "connection may stay idle); then the connection is closed.")
@click.option("--threads", type=click.IntRange(min=1), default=4,
              help="Worker threads encoding and searching queries at the same time.")
@click.option("--max-connections", type=click.IntRange(min=1), default=64,
              help="Open connections at most (each holds a thread); more are answered 503 and closed.")
@click.option("--media-workers", type=click.IntRange(min=1), default=2,
              help="Decode worker processes: uploads decoded at the same time.")
@click.option("--media-queue", type=click.IntRange(min=0), default=4,
              help="Media queries that may wait for a decode worker; more get 503 with Retry-After.")
@click.option("--media-max-duration-s", type=click.FloatRange(min=0, min_open=True), default=600.0,
              help="Longest audio or video query in seconds (declared or decoded); longer uploads get 422.")
@click.option("--media-memory-mb", type=click.IntRange(min=512), default=1536,
              help="Address-space limit of one decode worker in MiB; an upload that needs more gets 400.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where versions of a remote (s3://) index are fetched (default: $XMODAL_INDEX_CACHE or "
                   "~/.cache/xmodal-index).")
def serve(index_uri, version, host, port, poll_s, max_body_bytes, max_inflight_body_bytes, max_k, request_timeout_s,
          header_timeout_s, threads, max_connections, media_workers, media_queue, media_max_duration_s,
          media_memory_mb, cache_dir):
    """Serve queries over HTTP, hot-swapping to each new LATEST version.

    POST /query takes JSON {"text": ..., "k": ..., "modality": [...]} or {"embedding": [...], ...},
    or multipart/form-data with one file field named audio, image or video (and optional k and
    modality fields); it answers {"version": ..., "hits": [{uri, modality, start_s, end_s, score,
    segment_id, text}]}. GET /healthz, /versions, /metrics (Prometheus) and /openapi.json describe
    the service. Uploads are decoded in isolated worker processes under the limits above.
    """
    for name in _SERVICE_LOGGERS:  # access lines and swaps are this command's output
        log = logging.getLogger(name)
        log.setLevel(min(log.getEffectiveLevel(), logging.INFO))
    try:
        media = MediaQueryConfig(workers=media_workers, queue=media_queue, max_duration_s=media_max_duration_s,
                                 memory_mb=media_memory_mb)
        server_config = ServerConfig(host=host, port=port, max_body_bytes=max_body_bytes,
                                     max_inflight_body_bytes=max_inflight_body_bytes, max_k=max_k,
                                     request_timeout_s=request_timeout_s, header_timeout_s=header_timeout_s,
                                     threads=threads, max_connections=max_connections, media=media)
        swap_config = HotSwapConfig(poll_s=poll_s, version=version, cache_dir=cache_dir)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    try:
        handle = IndexHandle(resolve_index_root(index_uri), swap_config, prepare=prepare_serving_encoder)
        handle.start()
    except (SinkError, QueryError) as err:
        click.echo(f"xmodal-index serve: error: {err}".splitlines()[0], err=True)
        sys.exit(EXIT_ERROR)
    except Exception as err:  # noqa: BLE001 - an unreachable store or an unreadable pinned version: one line
        click.echo(f"xmodal-index serve: error: {type(err).__name__}: {err}".splitlines()[0], err=True)
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
