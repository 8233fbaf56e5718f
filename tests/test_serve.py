"""`xmodal-index serve` over real HTTP on 127.0.0.1: health, queries in every modality, errors, hot swap."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import threading
import time
import uuid

import pytest
from click.testing import CliRunner

from tests.latest_file import write_latest_unchecked
from xmodal_index.jobs.cli import cli
from xmodal_index.jobs.query_support import prepare_encoder
from xmodal_index.jobs.server import QueryServer, ServerConfig
from xmodal_index.pipeline.sample_archive import build_sample_archive
from xmodal_index.sinks.serving.hot_swap import HotSwapConfig, IndexHandle

HIT_FIELDS = {"uri", "modality", "start_s", "end_s", "score", "segment_id", "text"}
# An untrained built-in encoder: fast, deterministic, independent of the bundled checkpoint.
CONFIG = '[decode]\nsegment_s = 1.0\n[encoder]\ncheckpoint = ""\nseed = {seed}\n'


def run_job(source, workdir, config) -> None:
    result = CliRunner().invoke(cli, ["run", "--source", str(source), "--workdir", str(workdir),
                                      "--config", str(config)], catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve")
    archive, workdir = base / "archive", base / "work"
    build_sample_archive(str(archive), videos=2, segments_per_video=3)
    config = base / "job.toml"
    config.write_text(CONFIG.format(seed=0))
    run_job(archive, workdir, config)
    return archive, workdir


@pytest.fixture(scope="module")
def handle(built):
    _, workdir = built
    with IndexHandle(str(workdir / "indexes" / "main"), HotSwapConfig(poll_s=60), prepare=prepare_encoder) as h:
        yield h


@pytest.fixture(scope="module")
def server(handle):
    with QueryServer(handle, ServerConfig(port=0, max_body_bytes=256 * 1024, max_k=50)) as s:
        yield s


# ---------------------------------------------------------------- a small client


def request(server, method, path, body=b"", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null"), dict(resp.getheaders())
    finally:
        conn.close()


def post_json(server, obj, raw=None):
    body = raw if raw is not None else json.dumps(obj).encode()
    status, data, _ = request(server, "POST", "/query", body, {"Content-Type": "application/json"})
    return status, data


def multipart(fields):
    """fields: name -> str (a form value) or (filename, bytes) (a file upload)."""
    boundary = uuid.uuid4().hex
    out = []
    for name, value in fields.items():
        if isinstance(value, tuple):
            filename, data = value
            head = (f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                    "Content-Type: application/octet-stream\r\n")
        else:
            head, data = f'Content-Disposition: form-data; name="{name}"\r\n', value.encode()
        out.append(f"--{boundary}\r\n{head}\r\n".encode() + data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def post_form(server, fields):
    body, ctype = multipart(fields)
    status, data, _ = request(server, "POST", "/query", body, {"Content-Type": ctype})
    return status, data


def upload(path):
    return path.name, path.read_bytes()


# ---------------------------------------------------------------- health and queries


def test_healthz_names_the_loaded_version(server):
    status, body, headers = request(server, "GET", "/healthz")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert body["status"] == "ok" and body["version"] == "v000001"
    assert body["model_id"].startswith("builtin-untrained-seed0@") and body["ntotal"] > 0 and body["loaded_at"]


def test_text_query_returns_spec_hits_best_first(server):
    status, body = post_json(server, {"text": "seven", "k": 5, "modality": ["text"]})
    assert status == 200 and body["version"] == "v000001"
    hits = body["hits"]
    assert len(hits) == 5 and all(set(h) == HIT_FIELDS for h in hits)
    assert all(h["modality"] == "text" for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_default_k_is_ten(server):
    status, body = post_json(server, {"text": "three"})
    assert status == 200 and len(body["hits"]) == 10


def test_audio_upload_finds_its_own_recording_first(server, built):
    archive, _ = built
    wav = sorted((archive / "audio").glob("*.wav"))[0]
    status, body = post_form(server, {"audio": upload(wav), "k": "3", "modality": "audio"})
    assert status == 200
    assert body["hits"][0]["uri"].endswith(wav.name) and body["hits"][0]["modality"] == "audio"


def test_image_upload_finds_its_own_image_first(server, built):
    archive, _ = built
    png = sorted((archive / "images").glob("*.png"))[3]
    status, body = post_form(server, {"image": upload(png), "modality": "image"})
    assert status == 200 and body["hits"][0]["uri"].endswith(png.name)


def test_video_upload_returns_hits(server, built):
    archive, _ = built
    clip = sorted((archive / "videos").glob("*.mp4"))[0]
    status, body = post_form(server, {"video": upload(clip), "k": "4"})
    assert status == 200 and len(body["hits"]) == 4 and all(set(h) == HIT_FIELDS for h in body["hits"])


def test_uploads_leave_no_temporary_files(server, built, tmp_path, monkeypatch):
    archive, _ = built
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    wav = sorted((archive / "audio").glob("*.wav"))[0]
    assert post_form(server, {"audio": upload(wav)})[0] == 200
    assert post_form(server, {"image": ("noise.png", b"\x89PNG not really")})[0] == 400
    assert list(tmp_path.iterdir()) == []


def test_one_connection_serves_several_requests(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        for text in ("one", "two", "three"):
            conn.request("POST", "/query", body=json.dumps({"text": text, "k": 2}),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200 and len(json.loads(resp.read())["hits"]) == 2
    finally:
        conn.close()


# ---------------------------------------------------------------- bad requests


@pytest.mark.parametrize("raw, needle", [
    (b'{"text": "seven"', "not valid JSON"),
    (b'["seven"]', "JSON object"),
    (b'{"k": 3}', "exactly one of"),
    (b'{"text": ""}', "non-empty"),
    (b'{"text": "seven", "kk": 3}', "unknown keys"),
    (b'{"audio": "/etc/passwd"}', "multipart/form-data"),
])
def test_malformed_json_queries_get_400(server, raw, needle):
    status, body = post_json(server, None, raw=raw)
    assert status == 400 and needle in body["error"] and "\n" not in body["error"]


def test_several_query_fields_get_400(server):
    status, body = post_form(server, {"text": "seven", "image": ("a.png", b"x")})
    assert status == 400 and "exactly one of" in body["error"]


def test_undecodable_upload_gets_400_naming_the_file(server):
    status, body = post_form(server, {"video": ("broken.mp4", b"\x00" * 2000)})
    assert status == 400 and "broken.mp4" in body["error"]


def test_truncated_multipart_body_gets_400(server):
    body, ctype = multipart({"text": "seven"})
    status, data, _ = request(server, "POST", "/query", body[:-20], {"Content-Type": ctype})
    assert status == 400 and "truncated" in data["error"]


@pytest.mark.parametrize("k", [0, -1, 51, "ten", 2.5, True])
def test_k_out_of_bounds_gets_422(server, k):
    status, body = post_json(server, {"text": "seven", "k": k})
    assert status == 422 and "[1, 50]" in body["error"]


@pytest.mark.parametrize("modality", [["smell"], [], "video,smell", 3])
def test_unknown_modality_gets_422(server, modality):
    status, body = post_json(server, {"text": "seven", "modality": modality})
    assert status == 422 and "modality" in body["error"]


def test_body_over_the_limit_gets_413(server):
    body, ctype = multipart({"video": ("big.mp4", b"\x00" * (300 * 1024))})
    status, data, _ = request(server, "POST", "/query", body, {"Content-Type": ctype})
    assert status == 413 and "max_body_bytes" in data["error"]


def test_announced_oversized_body_is_refused_before_it_is_sent(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000000\r\n\r\n")
        reply = sock.makefile("rb").readline()
    assert reply.startswith(b"HTTP/1.1 413")


def test_body_trickling_in_past_the_time_budget_gets_408(handle):
    with QueryServer(handle, ServerConfig(port=0, request_timeout_s=0.5)) as srv, \
            socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(b"POST /query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n")
        for _ in range(8):  # one byte every 0.15 s: each read is quick, the whole body is not
            sock.sendall(b" ")
            time.sleep(0.15)
        reply = sock.makefile("rb").readline()
    assert reply.startswith(b"HTTP/1.1 408")


def test_unsupported_content_type_gets_415(server):
    status, body, _ = request(server, "POST", "/query", b"seven", {"Content-Type": "text/plain"})
    assert status == 415 and "multipart/form-data" in body["error"]


def test_unknown_path_gets_404(server):
    status, body, _ = request(server, "GET", "/search")
    assert status == 404 and "/search" in body["error"]


@pytest.mark.parametrize("method, path, allowed", [("GET", "/query", "POST"), ("POST", "/healthz", "GET"),
                                                    ("DELETE", "/query", "POST")])
def test_wrong_method_gets_405(server, method, path, allowed):
    status, body, headers = request(server, method, path)
    assert status == 405 and headers["Allow"] == allowed and body["error"]


def test_no_servable_version_gets_503(tmp_path):
    with IndexHandle(str(tmp_path / "empty"), HotSwapConfig(poll_s=60)) as handle, \
            QueryServer(handle, ServerConfig(port=0)) as srv:
        health, health_body, _ = request(srv, "GET", "/healthz")
        status, body = post_json(srv, {"text": "seven"})
    assert health == 503 and health_body["status"] == "unavailable"
    assert status == 503 and "LATEST" in body["error"]


class _SlowEncoder:
    def __init__(self, inner):
        self.inner, self.modalities = inner, inner.modalities

    def encode(self, modality, payloads):
        time.sleep(1.5)
        return self.inner.encode(modality, payloads)


def test_query_over_the_time_budget_gets_504(built):
    _, workdir = built
    slow = IndexHandle(str(workdir / "indexes" / "main"), HotSwapConfig(poll_s=60),
                       prepare=lambda index, current: _SlowEncoder(prepare_encoder(index, current)))
    with slow, QueryServer(slow, ServerConfig(port=0, request_timeout_s=0.3)) as srv:
        status, body = post_json(srv, {"text": "seven"})
    assert status == 504 and "request_timeout_s" in body["error"]


# ---------------------------------------------------------------- hot swap


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def tamper_copy(index_root, src: str, dst: str) -> None:
    """Publish ``dst``: a copy of ``src`` whose first float shard no longer matches its sha256."""
    shutil.copytree(index_root / src, index_root / dst)
    manifest = json.loads((index_root / dst / "manifest.json").read_text())
    manifest.update(version=dst, parent_version=src)
    (index_root / dst / "manifest.json").write_text(json.dumps(manifest))
    shard = next(s["file"] for s in manifest["shards"] if s["kind"] == "float")
    data = bytearray((index_root / dst / shard).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (index_root / dst / shard).write_bytes(bytes(data))
    write_latest_unchecked(str(index_root), dst)


def test_serve_keeps_answering_while_a_new_version_is_swapped_in(tmp_path):
    archive, workdir = tmp_path / "archive", tmp_path / "work"
    build_sample_archive(str(archive), videos=1, segments_per_video=2)
    config = tmp_path / "job.toml"
    config.write_text(CONFIG.format(seed=0))
    run_job(archive, workdir, config)
    index_root = workdir / "indexes" / "main"
    poll_s = 0.2
    statuses, versions = [], set()
    stop = threading.Event()

    with IndexHandle(str(index_root), HotSwapConfig(poll_s=poll_s), prepare=prepare_encoder) as handle, \
            QueryServer(handle, ServerConfig(port=0)) as srv:
        def client():
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
            while not stop.is_set():
                conn.request("POST", "/query", body=b'{"text": "seven", "k": 3}',
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                statuses.append(resp.status)
                versions.add(json.loads(resp.read()).get("version"))
            conn.close()

        thread = threading.Thread(target=client)
        thread.start()
        try:
            # a new file and a new encoder seed: v000002 needs another encoder, loaded before the swap
            (archive / "text" / "added.txt").write_text("nine")
            config.write_text(CONFIG.format(seed=1))
            run_job(archive, workdir, config)
            assert wait_for(lambda: request(srv, "GET", "/healthz")[1]["version"] == "v000002", 20 * poll_s + 10)
            _, health, _ = request(srv, "GET", "/healthz")
            assert health["model_id"].startswith("builtin-untrained-seed1@")
            assert handle.current.extra.model_id == health["model_id"]  # queries embed with the new encoder
            queries_after_swap = len(statuses)
            assert wait_for(lambda: len(statuses) > queries_after_swap + 2, 10)

            tamper_copy(index_root, "v000002", "v000003")
            assert wait_for(lambda: "v000003" in request(srv, "GET", "/healthz")[1].get("refused", {}),
                            20 * poll_s + 10)
            _, health, _ = request(srv, "GET", "/healthz")
        finally:
            stop.set()
            thread.join()
    assert health["version"] == "v000002" and "sha256" in health["refused"]["v000003"]
    assert len(statuses) > 3 and set(statuses) == {200}
    assert versions == {"v000001", "v000002"}


# ---------------------------------------------------------------- the command


def test_serve_help_names_every_default_and_unit():
    result = CliRunner().invoke(cli, ["serve", "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for needle in ("--poll-s", "Seconds between", "default: 30.0", "--max-body-bytes", "32 MiB", "--max-k",
                   "default: 1000", "--request-timeout-s", "--threads", "default: 4", "--port", "default: 8080",
                   "0 picks a free port", "--host", "default: 127.0.0.1", "--version"):
        assert needle in text, needle


def test_serve_with_a_pinned_version_that_does_not_exist_exits_1(built):
    _, workdir = built
    result = CliRunner().invoke(cli, ["serve", "--index", str(workdir), "--version", "v000009", "--port", "0"])
    assert result.exit_code == 1 and "v000009" in result.output
