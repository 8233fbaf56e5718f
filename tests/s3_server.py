"""pytest plugin: a real S3-compatible server (moto's standalone server) on 127.0.0.1.

Fixtures:
- ``s3_server`` (session): starts ``python -m moto.server`` on a free loopback port;
  yields a :class:`MotoServer` (``endpoint_url``, ``env``).
- ``s3_env`` (function): points boto3 at that server for one test: AWS_ENDPOINT_URL,
  dummy AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION; hides the
  developer's own AWS profile files and any XMODAL_S3_* settings; resets the
  storage layer's settings so the client is rebuilt for this server.
- ``s3_bucket`` (function): a fresh, empty bucket; returns ``"s3://<name>"``.
- ``fault_proxy`` (function): a :class:`FaultProxy` in front of the server, for
  injecting throttling, 5xx, 403 answers and truncated bodies.

Everything is HTTP over loopback; nothing is mocked inside the test process.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MotoServer:
    endpoint_url: str
    process: subprocess.Popen

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_moto(extra_env: dict[str, str] | None = None, timeout_s: float = 30.0) -> MotoServer:
    """Start moto's standalone server as a child process on a free loopback port."""
    last_error = "no attempt"
    for _ in range(3):
        port = free_port()
        env = dict(os.environ, **(extra_env or {}))
        # the request log goes to a file, never a pipe: an unread pipe fills up and stalls the server
        log = tempfile.TemporaryFile()
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return MotoServer(endpoint_url=f"http://127.0.0.1:{port}", process=proc)
            except OSError:
                time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.seek(0)
        last_error = log.read().decode(errors="replace")[-2000:]
        log.close()
    raise RuntimeError(f"moto server did not start: {last_error}")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoServer]:
    server = start_moto()
    try:
        yield server
    finally:
        server.stop()


def _reset_storage_settings(clear_exported: bool = False) -> None:
    """Drop settings installed with configure_s3; with ``clear_exported`` also the
    XMODAL_S3_* variables it exported (monkeypatch then restores the original ones)."""
    from xmodal_index.sinks.storage import s3

    s3.configure_s3(None)
    if clear_exported:
        for name in [n for n in os.environ if n.startswith("XMODAL_S3_")]:
            del os.environ[name]


def apply_s3_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], tmp_dir: str) -> None:
    """Point boto3 at a test server only: no profile files, no stray settings."""
    for name in list(os.environ):
        if name.startswith("XMODAL_S3_") or name in (
            "AWS_PROFILE",
            "AWS_SESSION_TOKEN",
            "AWS_ENDPOINT_URL_S3",
            "AWS_REGION",
            "AWS_CA_BUNDLE",
        ):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.path.join(tmp_dir, "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.path.join(tmp_dir, "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _reset_storage_settings()


@pytest.fixture
def s3_env(s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path) -> Iterator[MotoServer]:
    apply_s3_env(monkeypatch, s3_server.env, str(tmp_path))
    yield s3_server
    _reset_storage_settings(clear_exported=True)


def new_bucket_name() -> str:
    return "test-" + uuid.uuid4().hex[:20]


@pytest.fixture
def s3_bucket(s3_env: MotoServer) -> str:
    import boto3

    name = new_bucket_name()
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


# --------------------------------------------------------------------------- fault proxy


@dataclass
class _Rule:
    remaining: int | None  # None: forever
    methods: tuple[str, ...] | None
    status: int = 503
    code: str = "SlowDown"
    truncate: bool = False
    keep_fraction: float = 0.5


@dataclass
class FaultProxy:
    """A threaded HTTP proxy on 127.0.0.1 that passes requests to ``upstream`` except
    where a rule says to answer with an S3 XML error or to cut a response body short."""

    upstream: str
    endpoint_url: str = ""
    requests: list[tuple[str, str, int]] = field(default_factory=list)  # method, path, status sent
    _rules: list[_Rule] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: http.server.ThreadingHTTPServer | None = None

    def fail_next(self, n: int, status: int = 503, code: str = "SlowDown",
                  methods: tuple[str, ...] | None = None) -> None:
        """Answer the next ``n`` matching requests with an S3 error."""
        with self._lock:
            self._rules.append(_Rule(remaining=n, methods=methods, status=status, code=code))

    def fail_always(self, status: int = 403, code: str = "AccessDenied",
                    methods: tuple[str, ...] | None = None) -> None:
        with self._lock:
            self._rules.append(_Rule(remaining=None, methods=methods, status=status, code=code))

    def truncate_next(self, n: int, methods: tuple[str, ...] = ("GET",), keep_fraction: float = 0.5) -> None:
        """Send the next ``n`` matching responses with their full Content-Length but
        only ``keep_fraction`` of the body, then drop the connection."""
        with self._lock:
            self._rules.append(_Rule(remaining=n, methods=methods, truncate=True, keep_fraction=keep_fraction))

    def count(self, method: str | None = None, status: int | None = None) -> int:
        with self._lock:
            return sum(
                1 for m, _, s in self.requests if (method is None or m == method) and (status is None or s == status)
            )

    def _take_rule(self, method: str) -> _Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.methods is not None and method not in rule.methods:
                    continue
                if rule.remaining is None:
                    return rule
                if rule.remaining > 0:
                    rule.remaining -= 1
                    return rule
            return None

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, status))

    def start(self) -> FaultProxy:
        proxy = self
        host, port = self.upstream.removeprefix("http://").split(":")

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                rule = proxy._take_rule(self.command)
                if rule is not None and not rule.truncate:
                    self._send_error(rule)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    payload = resp.read()
                    out_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
                finally:
                    conn.close()
                proxy._record(self.command, self.path, resp.status)
                self.send_response(resp.status)
                has_length = False
                for k, v in out_headers:
                    if k.lower() == "content-length":
                        has_length = True
                        if self.command != "HEAD":
                            v = str(len(payload))
                    self.send_header(k, v)
                if not has_length and self.command != "HEAD":
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if rule is not None and rule.truncate and len(payload) > 1:
                    self.wfile.write(payload[: int(len(payload) * rule.keep_fraction)])
                    self.wfile.flush()
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(payload)

            def _send_error(self, rule: _Rule) -> None:
                xml = (
                    '<?xml version="1.0" encoding="UTF-8"?>\n'
                    f"<Error><Code>{rule.code}</Code><Message>injected {rule.code}</Message>"
                    "<RequestId>fault-proxy</RequestId></Error>"
                ).encode()
                proxy._record(self.command, self.path, rule.status)
                self.send_response(rule.status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(xml)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@pytest.fixture
def fault_proxy(s3_env: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """A proxy in front of the session's server; boto3 (and the storage layer) talk to
    the proxy for the rest of the test."""
    proxy = FaultProxy(upstream=s3_env.endpoint_url).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
    _reset_storage_settings()
    try:
        yield proxy
    finally:
        proxy.stop()
