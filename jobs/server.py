"""The HTTP query service behind `xmodal-index serve` (standard library http.server).

Routes:
  GET  /healthz       200 {"status": "ok", "version", "model_id", "ntotal", "loaded_at", ...}
                      503 {"status": "unavailable", "error"} while no version can be served
  POST /query         200 {"version", "hits": [{uri, modality, start_s, end_s, score, segment_id, text}]}
                      JSON {"text" | "embedding", "k", "modality"} or a multipart upload of audio/image/video
  GET  /versions      200 {"index", "current", "latest", "pinned", "versions": [{version, current, latest, ...}]}
  GET  /metrics       Prometheus text format (see serve_metrics)
  GET  /openapi.json  the OpenAPI 3 document of these routes (see serve_openapi)

Every error is JSON {"error": "<one line>"}: 400 malformed request (bad JSON, JSON
nested deeper than max_json_depth, an embedding of the wrong dim or not finite, an
undecodable upload), 404 unknown path, 405 wrong method, 408 body not received in
time, 411 no Content-Length, 413 body over the limit, 415 unsupported Content-Type,
422 k or modality out of range or media over its limits, 503 no servable version,
media decode workers and their queue full, or connections at max_connections (with
Retry-After), 504 query over its time budget.

Limits, all in ServerConfig: connections (each holds a thread) are capped; slow
request lines and headers are cut at header_timeout_s; bodies at max_body_bytes and
request_timeout_s. Uploads decode in isolated worker processes (serve_media), a
bounded number at a time, killed when their request runs out of time. Encoding and
searching run on a bounded pool of worker threads, and each worker holds the version
it searches until it is done, so a hot swap never cuts a query short.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from xmodal_index.pipeline.decode import DecodeConfig, decode_item
from xmodal_index.pipeline.types import MediaItem, Segment
from xmodal_index.query.core import QueryIndex
from xmodal_index.query.errors import BadQueryError, QueryError
from xmodal_index.query.request import Query
from xmodal_index.sinks.errors import SinkError
from xmodal_index.sinks.index import manifest as mf
from xmodal_index.sinks.serving.hot_swap import IndexHandle, NoServableVersionError, Served

from .query_support import QueryRequest, RequestError
from .serve_http import BodyBudget, Handler, HTTPServer, HTTPServer6
from .serve_media import MEDIA_MODALITIES, MediaDecoders, MediaQueryConfig, MediaQueryError
from .serve_metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .serve_metrics import ServeMetrics
from .serve_request import EmbeddingRequest, SearchOptions, parse_request

logger = logging.getLogger(__name__)

MiB = 1 << 20
VERSIONS_TTL_S = 2.0  # GET /versions lists the index store at most this often


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Where the service listens and how much one request, or all of them, may ask of it."""

    host: str = "127.0.0.1"
    port: int = 8080  # 0 picks a free port
    max_body_bytes: int = 32 * MiB
    max_k: int = 1000
    default_k: int = 10
    request_timeout_s: float = 30.0  # first byte of a request to its answer
    header_timeout_s: float = 10.0  # request line and headers (and keep-alive idle time)
    threads: int = 4  # encode + search workers
    max_connections: int = 64  # open connections (each holds a thread); more get 503
    max_json_depth: int = 32  # nesting of a JSON body
    max_inflight_body_bytes: int = 128 * MiB  # request bodies held in memory at once; more get 503
    media: MediaQueryConfig = MediaQueryConfig()

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError(f"{self.host = } must name an interface, e.g. 127.0.0.1")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"{self.port = } must be in [0, 65535] (0 picks a free port)")
        if self.max_body_bytes <= 0:
            raise ValueError(f"{self.max_body_bytes = } must be > 0")
        if self.max_k < 1:
            raise ValueError(f"{self.max_k = } must be >= 1")
        if not 1 <= self.default_k <= self.max_k:
            raise ValueError(f"{self.default_k = } must be in [1, max_k={self.max_k}]")
        for name in ("request_timeout_s", "header_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} = {value!r} must be a finite number of seconds > 0")
        if self.threads < 1:
            raise ValueError(f"{self.threads = } must be >= 1")
        if self.max_connections < 1:
            raise ValueError(f"{self.max_connections = } must be >= 1")
        if self.max_inflight_body_bytes < self.max_body_bytes:
            raise ValueError(f"{self.max_inflight_body_bytes = } must be >= max_body_bytes={self.max_body_bytes}")
        if self.max_json_depth < 2:
            raise ValueError(f"{self.max_json_depth = } must be >= 2 (a query object holds a list)")


class QueryServer:
    """An HTTP server answering the routes above over an IndexHandle."""

    ROUTES = {"/healthz": "GET", "/query": "POST", "/versions": "GET", "/metrics": "GET", "/openapi.json": "GET"}

    def __init__(self, handle: IndexHandle, config: ServerConfig | None = None, *,
                 decode_fn: Callable[[MediaItem, DecodeConfig], Iterable[Segment]] = decode_item) -> None:
        self.handle = handle
        self.config = config or ServerConfig()
        self._workers = concurrent.futures.ThreadPoolExecutor(max_workers=self.config.threads,
                                                              thread_name_prefix="query")
        self._media_lane = concurrent.futures.ThreadPoolExecutor(max_workers=self.config.media.encode_threads,
                                                                 thread_name_prefix="media-query")
        self.media = MediaDecoders(self.config.media, max_bytes=self.config.max_body_bytes,
                                   timeout_s=self.config.request_timeout_s, decode_fn=decode_fn)
        server_class = HTTPServer6 if ":" in self.config.host else HTTPServer
        self._httpd = server_class((self.config.host, self.config.port), Handler)
        self._httpd.app = self
        self.body_budget = BodyBudget(self.config.max_inflight_body_bytes)
        self.metrics = ServeMetrics(self.ROUTES, handle.status, lambda: self._httpd.connections,
                                    lambda: (self.media.in_flight, self.media.rejected, self.media.killed))
        self._openapi: bytes | None = None
        self._versions_lock = threading.Lock()
        self._versions_listing: tuple[float, tuple[list[str], str | None] | None] = (0.0, None)
        self._core_lock = threading.Lock()
        self._core: tuple[Served, QueryIndex] | None = None  # the query core over the served version
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self.config.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def start(self) -> QueryServer:
        """Serve from a background thread (returns at once); stop with shutdown()."""
        if self._thread is None:
            self.media.start()
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                            name="http-server", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop accepting requests, let running queries finish, release the socket."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()
        self._workers.shutdown(wait=True, cancel_futures=True)
        self._media_lane.shutdown(wait=True, cancel_futures=True)
        self.media.close()

    def __enter__(self) -> QueryServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ------------------------------------------------------------ GET endpoints

    def get(self, path: str) -> tuple[int, Any]:
        if path == "/healthz":
            return self.health()
        if path == "/versions":
            return self.versions()
        if path == "/metrics":
            return 200, self.metrics.render()
        return 200, self.openapi()

    def content_type(self, path: str) -> str:
        return METRICS_CONTENT_TYPE if path == "/metrics" else "application/json"

    def health(self) -> tuple[int, dict[str, Any]]:
        st = self.handle.status()
        body: dict[str, Any] = {"index": st.index_root, "pinned": st.pinned, "last_check_at": st.last_check_at}
        if st.refused:
            body["refused"] = dict(st.refused)
        if st.version is None:
            return 503, {"status": "unavailable", "error": st.last_error or "no version loaded", **body}
        if st.last_error:
            body["last_error"] = st.last_error  # the last poll failed; the loaded version is still served
        return 200, {"status": "ok", "version": st.version, "model_id": st.model_id, "ntotal": st.ntotal,
                     "modalities": list(st.modalities), "loaded_at": st.loaded_at, **body}

    def versions(self) -> tuple[int, dict[str, Any]]:
        """The complete versions of the served index, the served one marked ``current`` (the store is
        listed at most once per VERSIONS_TTL_S, however often clients ask)."""
        st = self.handle.status()
        with self._versions_lock:
            listed_at, listing = self._versions_listing
            if listing is None or time.monotonic() - listed_at > VERSIONS_TTL_S:
                try:
                    listing = (mf.list_versions(st.index_root), mf.read_latest(st.index_root))
                except SinkError as err:
                    raise RequestError(503, f"cannot list the versions of {st.index_root}: "
                                            f"{err}".splitlines()[0]) from err
                self._versions_listing = (time.monotonic(), listing)
        names, latest = listing
        entries = []
        for name in names:
            entry: dict[str, Any] = {"version": name, "current": name == st.version, "latest": name == latest}
            if name in st.refused:
                entry["refused"] = st.refused[name]
            entries.append(entry)
        return 200, {"index": st.index_root, "current": st.version, "latest": latest, "pinned": st.pinned,
                     "versions": entries}

    def openapi(self) -> bytes:
        if self._openapi is None:
            from .serve_openapi import openapi_document

            self._openapi = json.dumps(openapi_document(self.config)).encode()
        return self._openapi

    # ------------------------------------------------------------ POST /query

    def query(self, body: bytes, content_type: str, started: float) -> tuple[int, dict[str, Any]]:
        cfg = self.config
        request, options = parse_request(body, content_type, max_k=cfg.max_k, default_k=cfg.default_k,
                                         max_json_depth=cfg.max_json_depth)
        deadline = started + cfg.request_timeout_s
        if isinstance(request, QueryRequest) and request.modality in MEDIA_MODALITIES:
            self._check_encodable(request.modality)
            with self.media.admit():
                try:
                    payload = self.media.decode(request.modality, request.data or b"", request.filename, deadline)
                except MediaQueryError as err:
                    raise RequestError(err.status, str(err)) from err
                return self._answer(self._media_lane, request, options, payload, deadline)
        return self._answer(self._workers, request, options, None, deadline)

    def _answer(self, pool: concurrent.futures.ThreadPoolExecutor, request: QueryRequest | EmbeddingRequest,
                options: SearchOptions, payload: Any, deadline: float) -> tuple[int, dict[str, Any]]:
        future = pool.submit(self._run, request, options, payload)
        try:
            return 200, future.result(timeout=max(deadline - time.monotonic(), 0.0))
        except concurrent.futures.TimeoutError as err:
            future.cancel()  # still queued: never runs; already running: finishes, its answer is dropped
            raise RequestError(504, f"the query took longer than request_timeout_s="
                                    f"{self.config.request_timeout_s:g}") from err

    def _check_encodable(self, modality: str) -> None:
        """Refuse a media query the served encoder cannot embed before spending a decode worker on it."""
        served = self.handle.current
        encoder = served.extra if served is not None else None
        if served is not None and encoder is not None and modality not in encoder.modalities:
            raise RequestError(422, f"the encoder of {served.version} cannot embed {modality} queries "
                                    f"(it takes {', '.join(encoder.modalities)})")

    def _core_of(self, served: Served) -> QueryIndex:
        """The query core over a served version and its encoder, kept while that version is served."""
        with self._core_lock:
            if self._core is None or self._core[0] is not served:
                self._core = (served, QueryIndex(served.index, served.extra))
            return self._core[1]

    def _run(self, request: QueryRequest | EmbeddingRequest, options: SearchOptions, payload: Any) -> dict[str, Any]:
        """Embed (text here, media from its decoded payload) and search through the query core."""
        try:
            with self.handle.acquire() as served:
                core = self._core_of(served)
                if isinstance(request, EmbeddingRequest):
                    query = Query("embedding", list(request.embedding))
                elif request.modality == "text":
                    query = Query("text", request.text)
                else:
                    encoder = served.extra
                    if request.modality not in encoder.modalities:
                        raise RequestError(422, f"the encoder of {served.version} cannot embed {request.modality} "
                                                f"queries (it takes {', '.join(encoder.modalities)})")
                    vec = encoder.encode(request.modality, [payload]).embeddings
                    query = Query("embedding", np.asarray(vec[0], dtype=np.float32))
                hits = core.run(query, k=request.k, modalities=request.search, per_modality=options.per_modality,
                                fusion=options.fusion)
                return {"version": served.version, "hits": [h.to_json() for h in hits]}
        except NoServableVersionError as err:
            raise RequestError(503, str(err)) from err
        except BadQueryError as err:
            raise RequestError(400, str(err).splitlines()[0]) from err
        except QueryError as err:
            raise RequestError(503, f"the served version cannot answer: {err}".splitlines()[0]) from err
