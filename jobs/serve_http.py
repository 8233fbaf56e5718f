"""The HTTP layer of `serve`: connections, time limits and routing onto a QueryServer.

One thread per connection, at most ``max_connections`` of them: a connection beyond
the cap is answered 503 (with Retry-After) and closed by the accepting thread, which
never blocks on it. Every read from a client runs against a deadline, not a per-read
timeout, so a client trickling bytes cannot hold a thread: the request line and
headers (and the wait for the next request on a kept-alive connection) must arrive
within ``header_timeout_s``, after which the connection is closed; the body must
arrive within what is left of ``request_timeout_s`` (408 otherwise).
"""

from __future__ import annotations

import http
import http.server
import io
import json
import logging
import socket
import threading
import time
import urllib.parse
from typing import TYPE_CHECKING, Any

from .query_support import RequestError
from .serve_media import MediaBusyError

if TYPE_CHECKING:
    from .server import QueryServer

logger = logging.getLogger(__name__)

MiB = 1 << 20
_LINGER_S = 2.0  # how long an early-closed connection keeps reading what the client still sends
_LINGER_MAX_BYTES = 64 * MiB
_BUSY_RETRY_AFTER_S = 1


class BusyError(RequestError):
    """The server is at one of its limits: 503 with Retry-After."""

    def __init__(self, message: str, retry_after_s: int = _BUSY_RETRY_AFTER_S) -> None:
        super().__init__(503, message)
        self.retry_after_s = retry_after_s


class BodyBudget:
    """Bytes of request bodies held in memory at once, reserved from Content-Length before reading."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> bool:
        with self._lock:
            if self.held + nbytes > self.limit:
                return False
            self.held += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.held -= nbytes


class HTTPServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on connections (each one holds a thread)."""

    daemon_threads = True
    app: QueryServer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._conn_lock = threading.Lock()
        self.connections = 0
        self.refused_connections = 0
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conn_lock:
            full = self.connections >= self.app.config.max_connections
            if full:
                self.refused_connections += 1
            else:
                self.connections += 1
        if full:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self._conn_lock:
                self.connections -= 1
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._conn_lock:
                self.connections -= 1

    def _refuse(self, request: socket.socket) -> None:
        """503 and close, without reading the request and without ever blocking the accepting thread."""
        limit = self.app.config.max_connections
        data = (json.dumps({"error": f"the server holds max_connections={limit} connections: retry later"})
                + "\n").encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nRetry-After: {_BUSY_RETRY_AFTER_S}\r\nConnection: close\r\n\r\n")
        try:
            request.setblocking(False)
            request.send(head.encode() + data)
        except OSError:
            pass
        self.shutdown_request(request)
        logger.warning("refused a connection: max_connections=%d reached", limit)


class HTTPServer6(HTTPServer):
    address_family = socket.AF_INET6


class _DeadlineReader(io.RawIOBase):
    """Socket reads that fail with TimeoutError once the handler's current deadline has passed."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left_s = self._handler.deadline - time.monotonic()
        if left_s <= 0:
            raise TimeoutError("the client did not send in time")
        sock = self._handler.connection
        sock.settimeout(left_s)
        return sock.recv_into(buffer)


class Handler(http.server.BaseHTTPRequestHandler):
    server: HTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "xmodal-index"

    def setup(self) -> None:
        config = self.server.app.config
        self.deadline = time.monotonic() + config.header_timeout_s
        self._started = time.monotonic()
        self._linger = False
        self._extra_headers: dict[str, str] = {}
        self._reserved = 0  # body bytes reserved in the server's BodyBudget
        super().setup()
        self.rfile = io.BufferedReader(_DeadlineReader(self), 1 << 16)

    def handle_one_request(self) -> None:
        # the request line and headers (or the wait for them) must arrive within header_timeout_s
        self.deadline = time.monotonic() + self.server.app.config.header_timeout_s
        super().handle_one_request()

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
        ok = super().parse_request()
        self.deadline = self._started + self.server.app.config.request_timeout_s  # the body's budget
        return ok

    def __getattr__(self, name: str) -> Any:
        """``do_<METHOD>`` for every method token: the route table answers (405 with Allow, or 404)."""
        method = name[3:]
        if name.startswith("do_") and method.isascii() and method.isalpha() and method.isupper():
            return lambda: self._dispatch(method)
        raise AttributeError(name)

    def _dispatch(self, method: str) -> None:
        path = urllib.parse.urlsplit(self.path).path
        app = self.server.app
        routes = app.ROUTES
        try:
            allowed = routes.get(path)
            if allowed is None:
                raise RequestError(404, f"no such path {path!r}: the service answers "
                                        f"{', '.join(f'{m} {p}' for p, m in routes.items())}")
            if method != allowed:
                self._close_unread()
                raise RequestError(405, f"{path} takes {allowed}, not {method}")
            if method == "POST":
                status, body = app.query(self._read_body(), self.headers.get("Content-Type", ""), self._started)
            else:
                status, body = app.get(path)
        except (BusyError, MediaBusyError) as err:
            status, body = err.status, {"error": str(err)}
            self._extra_headers = {"Retry-After": str(err.retry_after_s)}
        except RequestError as err:
            status, body = err.status, {"error": str(err)}
            if err.status == 405:
                self._extra_headers = {"Allow": routes[path]}
        except Exception as err:  # noqa: BLE001 - one broken request must not take the server down
            logger.exception("%s %s failed", method, self.path)
            status, body = 500, {"error": f"internal error: {type(err).__name__}: {err}".splitlines()[0]}
        finally:
            if self._reserved:
                app.body_budget.release(self._reserved)
                self._reserved = 0
        if isinstance(body, (bytes, str)):
            self._send(status, body.encode() if isinstance(body, str) else body, app.content_type(path))
        else:
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
        budget = self.server.app.body_budget
        if not budget.reserve(length):
            self._close_unread()
            raise BusyError(f"request bodies in memory are at max_inflight_body_bytes={budget.limit}: retry later")
        self._reserved = length
        return self._read_exactly(length)

    def _read_exactly(self, length: int) -> bytes:
        """The body, read within what is left of the request's time budget (408 otherwise)."""
        budget_s = self.server.app.config.request_timeout_s
        chunks, got = [], 0
        try:
            while got < length:
                chunk = self.rfile.read1(min(length - got, 1 << 20))
                if not chunk:
                    self.close_connection = True
                    raise RequestError(400, f"the body ended after {got} of {length} bytes")
                chunks.append(chunk)
                got += len(chunk)
        except TimeoutError as err:
            self._close_unread()
            raise RequestError(408, f"the body was not received within request_timeout_s={budget_s:g}") from err
        return b"".join(chunks)

    def _close_unread(self) -> None:
        """The body (if any) stays unread: answer, then close the connection."""
        self.close_connection = True
        self._linger = self.headers.get("Content-Length", "0").strip() != "0" or "Transfer-Encoding" in self.headers

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        self._send(status, (json.dumps(body) + "\n").encode("utf-8"), "application/json")

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.connection.settimeout(self.server.app.config.request_timeout_s)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in self._extra_headers.items():
            self.send_header(name, value)
        self._extra_headers = {}
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        seconds = time.monotonic() - self._started
        path = urllib.parse.urlsplit(getattr(self, "path", "") or "").path
        self.server.app.metrics.observe(path, status, seconds)
        logger.info("%s %s %d %.1f ms", self.command or "-", getattr(self, "path", "") or "-", status,
                    seconds * 1000.0)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, unknown method): JSON like the rest."""
        self.close_connection = True
        self._send_json(code, {"error": message or http.HTTPStatus(code).phrase})

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Access lines are written by _send, with the time taken."""

    def log_message(self, format: str, *args: Any) -> None:  # `format`: http.server's signature
        logger.debug("%s " + format, self.address_string(), *args)
