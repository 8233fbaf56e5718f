"""`serve` stays up for everyone: slow clients, connection floods, hostile JSON, unreachable stores,
and versions opened read-only. Real HTTP on 127.0.0.1 against the real server."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

from xmodal_index.jobs.cli import cli
from xmodal_index.jobs.serve_encoder import prepare_serving_encoder, serving_encoder_config
from xmodal_index.jobs.server import QueryServer, ServerConfig
from xmodal_index.pipeline.sample_archive import build_sample_archive
from xmodal_index.sinks.errors import IndexVersionError
from xmodal_index.sinks.serving.hot_swap import HotSwapConfig, IndexHandle

CONFIG = '[decode]\nsegment_s = 1.0\n[encoder]\ncheckpoint = ""\nseed = 0\nthreads = 3\nbatch_size = 3\n'


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import torch

    base = tmp_path_factory.mktemp("serve-limits")
    archive, workdir = base / "archive", base / "work"
    build_sample_archive(str(archive), videos=1, segments_per_video=2)
    config = base / "job.toml"
    config.write_text(CONFIG)
    threads = torch.get_num_threads()
    try:
        result = CliRunner().invoke(cli, ["run", "--source", str(archive), "--workdir", str(workdir),
                                          "--config", str(config)], catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)  # the build's own setting, not this process's
    assert result.exit_code == 0, result.output
    return workdir / "indexes" / "main"


@pytest.fixture(scope="module")
def handle(built):
    with IndexHandle(str(built), HotSwapConfig(poll_s=60), prepare=prepare_serving_encoder) as h:
        yield h


def serve(handle, **config):
    return QueryServer(handle, ServerConfig(port=0, **config))


def request(port, method, path, body=b"", headers=None, timeout=30):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(), dict(resp.getheaders())
    finally:
        conn.close()


def post_json(port, raw: bytes):
    status, data, _ = request(port, "POST", "/query", raw, {"Content-Type": "application/json"})
    return status, json.loads(data)


def closed_by_server(sock: socket.socket, trickle: bytes, within_s: float) -> bool:
    """Send ``trickle`` one byte every 0.1 s; True once the server has closed the connection."""
    deadline = time.monotonic() + within_s
    sock.settimeout(0.1)
    for byte in trickle:
        if time.monotonic() > deadline:
            return False
        try:
            sock.sendall(bytes([byte]))
            if sock.recv(1 << 16) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:  # reset or broken pipe: closed
            return True
    return False


# ---------------------------------------------------------------- slow clients and floods


def test_headers_trickling_in_are_cut_at_header_timeout(handle):
    with serve(handle, header_timeout_s=0.5, request_timeout_s=30) as srv, \
            socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        endless = b"GET /healthz HTTP/1.1\r\n" + b"X-Slow: " + b"a" * 200
        assert closed_by_server(sock, endless, within_s=4.0)


def test_idle_connection_is_closed_at_header_timeout(handle):
    with serve(handle, header_timeout_s=0.3) as srv, \
            socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        assert sock.recv(10) == b""  # the server closed it; a hang would raise TimeoutError


def test_connections_over_the_cap_get_503_and_threads_stay_bounded(handle):
    with serve(handle, max_connections=4, header_timeout_s=20) as srv:
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(4)]
        try:
            deadline = time.monotonic() + 10
            while srv._httpd.connections < 4 and time.monotonic() < deadline:  # accepted, each on its thread
                time.sleep(0.05)
            threads_before = threading.active_count()
            extra = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(20)]
            replies = []
            for sock in extra:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                replies.append(sock.makefile("rb").read())
                sock.close()
            assert threading.active_count() <= threads_before + 1
        finally:
            for sock in idle:
                sock.close()
        assert all(r.startswith(b"HTTP/1.1 503") and b"max_connections=4" in r and b"Retry-After" in r
                   for r in replies), replies[0]
        deadline = time.monotonic() + 10
        while srv._httpd.connections > 0 and time.monotonic() < deadline:  # their threads end
            time.sleep(0.05)
        assert request(srv.port, "GET", "/healthz")[0] == 200


# ---------------------------------------------------------------- hostile bodies


def test_deeply_nested_json_gets_400_not_500(handle):
    with serve(handle) as srv:
        for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"text": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                    b'{"text": "x", "k": ' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}"):
            status, body = post_json(srv.port, raw)
            assert status == 400 and "max_json_depth=32" in body["error"], body


def test_brackets_inside_strings_are_not_nesting(handle):
    with serve(handle) as srv:
        status, body = post_json(srv.port, json.dumps({"text": "[" * 500 + "{" * 500, "k": 2}).encode())
    assert status == 200 and len(body["hits"]) == 2


def test_body_over_max_body_bytes_gets_413_without_being_read(handle):
    with serve(handle, max_body_bytes=1000) as srv:
        status, body = post_json(srv.port, json.dumps({"text": "x" * 5000}).encode())
    assert status == 413 and "max_body_bytes=1000" in body["error"]


def test_bodies_over_the_in_flight_budget_get_503_while_small_ones_pass(handle):
    with serve(handle, max_body_bytes=1000, max_inflight_body_bytes=1500) as srv, \
            socket.create_connection(("127.0.0.1", srv.port), timeout=10) as holder:
        holder.sendall(b"POST /query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 1000\r\n\r\n{")  # 1000 bytes reserved, the rest never comes
        time.sleep(0.3)
        body = json.dumps({"text": "seven" + " " * 900}).encode()
        status, data, headers = request(srv.port, "POST", "/query", body, {"Content-Type": "application/json"})
        small = post_json(srv.port, b'{"text": "seven", "k": 1}')[0]
    assert status == 503 and "max_inflight_body_bytes=1500" in json.loads(data)["error"]
    assert headers["Retry-After"] == "1" and small == 200


# ---------------------------------------------------------------- the command


def test_serve_on_a_missing_bucket_prints_one_line_and_exits_1(s3_env):
    result = CliRunner().invoke(cli, ["serve", "--index", "s3://no-such-bucket-xmodal/work", "--port", "0"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xmodal-index serve: error:") and "no-such-bucket-xmodal" in lines[0]


def test_the_serve_command_imports_no_beam():
    code = ("import sys, xmodal_index.jobs.serve_cmd, xmodal_index.jobs.server\n"
            "print(sorted(m for m in ('apache_beam', 'click') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "['click']", out.stderr[-2000:]


def test_serve_help_names_every_limit_and_its_default():
    result = CliRunner().invoke(cli, ["serve", "--help"], terminal_width=200)
    text = " ".join(result.output.split())
    for needle in ("--header-timeout-s", "default: 10.0", "--max-inflight-body-bytes", "128 MiB",
                   "--max-connections", "default: 64", "--media-workers",
                   "--media-queue", "Retry-After", "--media-max-duration-s", "default: 600.0", "--media-memory-mb",
                   "default: 1536"):
        assert needle in text, needle


# ---------------------------------------------------------------- versions opened read-only


def test_build_time_encoder_options_do_not_run_in_serve(built):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with IndexHandle(str(built), HotSwapConfig(poll_s=60), prepare=prepare_serving_encoder) as h:
            served_threads = torch.get_num_threads()
            config = serving_encoder_config(h.current.index)
            model_ids = (h.current.extra.model_id, h.status().model_id)
    finally:
        torch.set_num_threads(threads)
    assert served_threads == 2  # the build's threads = 3 was not applied on the query node
    assert config.threads == 0 and config.batch_size == 64 and config.seed == 0
    assert model_ids[0] == model_ids[1]


class _FakeVersion:
    """An IndexVersion stand-in whose encoder.json is written by the test."""

    def __init__(self, tmp_path, conf):
        self.version = "v000001"
        self.path = tmp_path / "encoder.json"
        self.path.write_text(json.dumps(conf))

    def file_path(self, name):
        if name != "encoder.json":
            raise IndexVersionError(f"no extra file {name!r}")
        return str(self.path)


@pytest.mark.parametrize("checkpoint", ["/home/builder/ckpt/model.safetensors", "../model.safetensors", "~/x"])
def test_a_builtin_checkpoint_outside_the_version_is_refused(tmp_path, checkpoint):
    version = _FakeVersion(tmp_path, {"kind": "builtin", "checkpoint": checkpoint, "dim": 256, "bits": 64})
    with pytest.raises(IndexVersionError, match="loads built-in weights only from the version"):
        serving_encoder_config(version)


def test_serving_a_read_only_index_tree_changes_nothing(built, tmp_path):
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in built.rglob("*")}
    modes = {p: p.stat().st_mode for p in [built, *built.rglob("*")]}
    for p in modes:
        p.chmod(modes[p] & ~0o222)
    try:
        with IndexHandle(str(built), HotSwapConfig(poll_s=60), prepare=prepare_serving_encoder) as h, \
                QueryServer(h, ServerConfig(port=0)) as srv:
            status, body = post_json(srv.port, b'{"text": "seven", "k": 2}')
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert status == 200 and len(body["hits"]) == 2
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in built.rglob("*")} == before
