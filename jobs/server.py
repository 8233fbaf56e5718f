"""The HTTP query service behind `xmodal-index serve` (standard library http.server).

Routes:
  GET  /healthz  200 {"status": "ok", "version", "model_id", "ntotal", "loaded_at", ...}
                 503 {"status": "unavailable", "error"} while no version can be served
  POST /query    200 {"version", "hits": [{uri, modality, start_s, end_s, score, segment_id, text}]}

Every error is JSON {"error": "<one line>"}: 400 malformed request, 404 unknown path,
405 wrong method, 408 body not received in time, 411 no Content-Length, 413 body
over the limit, 415 unsupported Content-Type, 422 k or modality out of range, 503 no
servable version, 504 query over its time budget. Connections are handled by one
thread each; queries run on a bounded pool of worker threads, and each worker holds
the version it searches until it is done, so a hot swap never cuts a query short.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import http
import http.server
import json
import logging
import math
import socket
import threading
import time
import urllib.parse
from typing import Any

from xmodal_index.jobs.query_support import QueryRequest, RequestError, parse_request, run_query
from xmodal_index.sinks.serving.hot_swap import IndexHandle, NoServableVersionError

logger = logging.getLogger(__name__)

MiB = 1 << 20
_LINGER_S = 2.0  # how long an early-closed connection keeps reading what the client still sends
_LINGER_MAX_BYTES = 64 * MiB


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Where the service listens and how much one request may ask of it."""

    host: str = "127.0.0.1"
    port: int = 8080  # 0 picks a free port
    max_body_bytes: int = 32 * MiB
    max_k: int = 1000
    default_k: int = 10
    request_timeout_s: float = 30.0
    threads: int = 4

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
        if not (math.isfinite(self.request_timeout_s) and self.request_timeout_s > 0):
            raise ValueError(f"{self.request_timeout_s = } must be a finite number of seconds > 0")
        if self.threads < 1:
            raise ValueError(f"{self.threads = } must be >= 1")


class QueryServer:
    """An HTTP server answering /healthz and /query over an IndexHandle."""

    def __init__(self, handle: IndexHandle, config: ServerConfig | None = None) -> None:
        self.handle = handle
        self.config = config or ServerConfig()
        self._workers = concurrent.futures.ThreadPoolExecutor(max_workers=self.config.threads,
                                                              thread_name_prefix="query")
        server_class = _HTTPServer6 if ":" in self.config.host else _HTTPServer
        self._httpd = server_class((self.config.host, self.config.port), _Handler)
        self._httpd.app = self
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self.config.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def start(self) -> "QueryServer":
        """Serve from a background thread (returns at once); stop with shutdown()."""
        if self._thread is None:
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

    def __enter__(self) -> "QueryServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ------------------------------------------------------------ endpoints

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

    def query(self, body: bytes, content_type: str, started: float) -> tuple[int, dict[str, Any]]:
        request = parse_request(body, content_type, max_k=self.config.max_k, default_k=self.config.default_k)
        future = self._workers.submit(self._run, request)
        remaining = self.config.request_timeout_s - (time.monotonic() - started)
        try:
            return 200, future.result(timeout=max(remaining, 0.0))
        except concurrent.futures.TimeoutError as err:
            future.cancel()  # still queued: never runs; already running: finishes, its answer is dropped
            raise RequestError(504, f"the query took longer than request_timeout_s="
                                    f"{self.config.request_timeout_s:g}") from err

    def _run(self, request: QueryRequest) -> dict[str, Any]:
        try:
            with self.handle.acquire() as served:
                return run_query(request, served)
        except NoServableVersionError as err:
            raise RequestError(503, str(err)) from err


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    app: QueryServer


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "xmodal-index"

    _ROUTES = {"/healthz": "GET", "/query": "POST"}

    def setup(self) -> None:
        self.timeout = self.server.app.config.request_timeout_s  # socket reads: idle and slow clients
        self._started = time.monotonic()
        self._linger = False
        self._extra_headers: dict[str, str] = {}
        super().setup()

    def finish(self) -> None:
        super().finish()
        if self._linger:
            self._drain()

    def _drain(self) -> None:
        """Read what the client still sends after an early answer, so closing does not reset
        the connection before the client has read that answer (a lingering close)."""
        deadline = time.monotonic() + _LINGER_S
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(_LINGER_S)
            drained = 0
            while drained < _LINGER_MAX_BYTES and time.monotonic() < deadline:
                chunk = self.connection.recv(1 << 16)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass

    def handle_expect_100(self) -> bool:
        """Refuse an announced oversized body before the client sends it."""
        limit = self.server.app.config.max_body_bytes
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = 0
        if length > limit:
            self._close_unread()
            self._send_json(413, {"error": f"the body has {length} bytes, over max_body_bytes={limit}"})
            return False
        return super().handle_expect_100()

    def parse_request(self) -> bool:
        self._started = time.monotonic()
        return super().parse_request()

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        path = urllib.parse.urlsplit(self.path).path
        app = self.server.app
        try:
            allowed = self._ROUTES.get(path)
            if allowed is None:
                raise RequestError(404, f"no such path {path!r}: use GET /healthz or POST /query")
            if method != allowed:
                self._close_unread()
                raise RequestError(405, f"{path} takes {allowed}, not {method}")
            if path == "/healthz":
                status, body = app.health()
            else:
                status, body = app.query(self._read_body(), self.headers.get("Content-Type", ""), self._started)
        except RequestError as err:
            status, body = err.status, {"error": str(err)}
            if err.status == 405:
                self._extra_headers = {"Allow": self._ROUTES[path]}
        except Exception as err:  # noqa: BLE001 - one broken request must not take the server down
            logger.exception("%s %s failed", method, self.path)
            status, body = 500, {"error": f"internal error: {type(err).__name__}: {err}".splitlines()[0]}
        self._send_json(status, body)

    def _read_body(self) -> bytes:
        limit = self.server.app.config.max_body_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._close_unread()
            raise RequestError(411, "chunked bodies are not accepted: send a Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            self._close_unread()
            raise RequestError(411, "POST /query needs a Content-Length header")
        try:
            length = int(raw)
            if length < 0:
                raise ValueError(raw)
        except ValueError as err:
            self._close_unread()
            raise RequestError(400, f"Content-Length {raw!r} is not a byte count") from err
        if length > limit:
            self._close_unread()
            raise RequestError(413, f"the body has {length} bytes, over max_body_bytes={limit}")
        return self._read_exactly(length)

    def _read_exactly(self, length: int) -> bytes:
        """The body, read within what is left of the request's time budget (408 otherwise)."""
        budget_s = self.server.app.config.request_timeout_s
        deadline = self._started + budget_s
        chunks, got = [], 0
        try:
            while got < length:
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    raise TimeoutError
                self.connection.settimeout(left_s)
                chunk = self.rfile.read1(min(length - got, 1 << 20))
                if not chunk:
                    self.close_connection = True
                    raise RequestError(400, f"the body ended after {got} of {length} bytes")
                chunks.append(chunk)
                got += len(chunk)
        except TimeoutError as err:
            self._close_unread()
            raise RequestError(408, f"the body was not received within request_timeout_s={budget_s:g}") from err
        finally:
            self.connection.settimeout(budget_s)
        return b"".join(chunks)

    def _close_unread(self) -> None:
        """The body (if any) stays unread: answer, then close the connection."""
        self.close_connection = True
        self._linger = self.headers.get("Content-Length", "0").strip() != "0" or "Transfer-Encoding" in self.headers

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        data = (json.dumps(body) + "\n").encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in self._extra_headers.items():
            self.send_header(name, value)
        self._extra_headers = {}
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        ms = (time.monotonic() - self._started) * 1000.0
        logger.info("%s %s %d %.1f ms", self.command or "-", getattr(self, "path", "") or "-", status, ms)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, unknown method): JSON like the rest."""
        self.close_connection = True
        self._send_json(code, {"error": message or http.HTTPStatus(code).phrase})

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Access lines are written by _send_json, with the time taken."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        logger.debug("%s " + format, self.address_string(), *args)
