"""`serve`'s media queries: decoded in isolated, killable workers, bounded, and never in the way of
text queries. Real HTTP on 127.0.0.1; faults injected with tests/serve_faults.py's decode function."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid

import av
import numpy as np
import pytest
from click.testing import CliRunner

from tests.serve_faults import misbehave
from xmodal_index.jobs.cli import cli
from xmodal_index.jobs.query_support import prepare_encoder
from xmodal_index.jobs.serve_media import MediaQueryConfig
from xmodal_index.jobs.server import QueryServer, ServerConfig
from xmodal_index.pipeline.sample_archive import build_sample_archive
from xmodal_index.sinks.serving.hot_swap import HotSwapConfig, IndexHandle

CONFIG = '[decode]\nsegment_s = 1.0\n[encoder]\ncheckpoint = ""\nseed = 0\n'


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve-media")
    archive, workdir = base / "archive", base / "work"
    build_sample_archive(str(archive), videos=1, segments_per_video=2)
    config = base / "job.toml"
    config.write_text(CONFIG)
    result = CliRunner().invoke(cli, ["run", "--source", str(archive), "--workdir", str(workdir),
                                      "--config", str(config)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return archive, workdir / "indexes" / "main"


@pytest.fixture(scope="module")
def handle(built):
    with IndexHandle(str(built[1]), HotSwapConfig(poll_s=60), prepare=prepare_encoder) as h:
        yield h


def serve(handle, media=None, **config):
    return QueryServer(handle, ServerConfig(port=0, media=media or MediaQueryConfig(), **config),
                       decode_fn=misbehave)


def multipart(fields):
    boundary = uuid.uuid4().hex
    out = []
    for name, value in fields.items():
        if isinstance(value, tuple):
            head = (f'Content-Disposition: form-data; name="{name}"; filename="{value[0]}"\r\n'
                    "Content-Type: application/octet-stream\r\n")
            data = value[1]
        else:
            head, data = f'Content-Disposition: form-data; name="{name}"\r\n', value.encode()
        out.append(f"--{boundary}\r\n{head}\r\n".encode() + data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def post(port, body, ctype, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/query", body=body, headers={"Content-Type": ctype})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read()), dict(resp.getheaders())
    finally:
        conn.close()


def upload(port, filename, data=b"x" * 64, modality="audio", timeout=60):
    body, ctype = multipart({modality: (filename, data)})
    return post(port, body, ctype, timeout)


def text_query(port, timeout=30):
    return post(port, b'{"text": "seven", "k": 2}', "application/json", timeout)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead too
        return f.read().split(") ")[-1].split()[0] != "Z"


def noise_wav(path, seconds: float, rate: int = 16000) -> None:
    out = av.open(str(path), "w", format="wav")
    stream = out.add_stream("pcm_s16le", rate=rate, layout="mono")
    rng = np.random.default_rng(0)
    for start in range(0, int(seconds * rate), rate * 10):
        n = min(rate * 10, int(seconds * rate) - start)
        frame = av.AudioFrame.from_ndarray((rng.standard_normal(n) * 3000).astype(np.int16)[None, :],
                                           format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)
    out.close()


def long_ogg(path, seconds: float, chunk_s: int = 10) -> None:
    """An Ogg/Opus file of ``seconds`` of noise at 6 kbit/s (about 2 MB an hour): one chunk is
    encoded and its packets repeated with shifted timestamps."""
    rng = np.random.default_rng(0)
    out = av.open(str(path), "w", format="ogg")
    stream = out.add_stream("libopus", rate=48000, layout="mono")
    stream.bit_rate = 6000
    fmt = stream.codec_context.format.name
    packets = []
    for i in range(chunk_s * 50):  # 20 ms frames
        samples = rng.standard_normal(960) * (3000 if fmt.startswith("s16") else 0.1)
        frame = av.AudioFrame.from_ndarray(samples.astype(np.int16 if fmt.startswith("s16") else np.float32)[None, :],
                                           format=fmt, layout="mono")
        frame.sample_rate, frame.pts = 48000, i * 960
        packets.extend(stream.encode(frame))
    packets.extend(stream.encode(None))
    span = chunk_s * 48000
    for r in range(int(seconds // chunk_s)):
        for p in packets:
            if p.pts is None:
                continue
            q = av.Packet(bytes(p))
            q.pts = q.dts = p.pts + r * span
            q.time_base, q.stream = p.time_base, stream
            out.mux(q)
    out.close()


# ---------------------------------------------------------------- isolation and limits


def test_real_uploads_decode_in_a_worker_process(handle, built):
    archive, _ = built
    wav = sorted((archive / "audio").glob("*.wav"))[0]
    with serve(handle) as srv:
        status, body, _ = upload(srv.port, wav.name, wav.read_bytes())
        pids = srv.media.pids
    assert status == 200 and body["hits"][0]["uri"].endswith(wav.name)
    assert pids and os.getpid() not in pids


def test_an_upload_past_the_request_budget_is_stopped_and_its_worker_replaced(handle):
    with serve(handle, request_timeout_s=3.0) as srv:
        for _ in range(20):  # real decodes until both workers are warm (starting one may take longer)
            first = upload(srv.port, "a.wav", b"RIFF")[0]
            if first == 400 and len(srv.media.pids) == 2:
                break
        before, kills = set(srv.media.pids), srv.media.killed
        status, body, _ = upload(srv.port, "hostile.hang")
        killed = [pid for pid in before if not pid_alive(pid)]
        after_status, _, _ = text_query(srv.port)
        again = upload(srv.port, "hostile.hang")[0]
    assert first == 400  # "RIFF" alone is no WAV: refused by a warm worker
    assert status == 504 and "worker was stopped" in body["error"]
    assert killed and srv.media.killed == kills + 2
    assert after_status == 200 and again == 504  # a fresh worker took the next upload


def test_media_queue_full_gets_503_with_retry_after_while_text_queries_answer(handle):
    media = MediaQueryConfig(workers=1, queue=1, retry_after_s=7)
    with serve(handle, media=media) as srv:
        results = []

        def client():
            results.append(upload(srv.port, "slow.slow"))

        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.2)
        text_status = text_query(srv.port)[0]  # while one upload decodes and one waits
        for t in threads:
            t.join()
    statuses = sorted(r[0] for r in results)
    assert statuses == [200, 200, 503]
    busy = next(r for r in results if r[0] == 503)
    assert busy[2]["Retry-After"] == "7" and "busy" in busy[1]["error"]
    assert text_status == 200


def test_media_decoding_past_max_duration_is_refused(handle):
    with serve(handle, media=MediaQueryConfig(max_duration_s=5)) as srv:
        status, body, _ = upload(srv.port, "noise.endless")
    assert status == 422 and "max_duration_s=5" in body["error"]


def test_media_declaring_a_duration_over_the_limit_is_refused_before_decoding(handle, tmp_path):
    wav = tmp_path / "long.wav"
    noise_wav(wav, 12.0)
    with serve(handle, media=MediaQueryConfig(max_duration_s=10)) as srv:
        status, body, _ = upload(srv.port, wav.name, wav.read_bytes())
    assert status == 422 and "max_duration_s=10" in body["error"] and "long.wav" in body["error"]


def test_an_upload_exhausting_worker_memory_gets_400_and_the_server_stays_small(handle):
    with serve(handle, media=MediaQueryConfig(memory_mb=512)) as srv:
        status, body, _ = upload(srv.port, "big.hog")
        health = text_query(srv.port)[0]
    assert status == 400 and "memory" in body["error"] and "memory_mb=512" in body["error"]
    assert health == 200


def test_a_long_video_query_is_encoded_from_at_most_max_video_frames():
    from xmodal_index.jobs.serve_media import MediaDecoders
    from xmodal_index.pipeline.types import Segment

    decoders = MediaDecoders(MediaQueryConfig(max_video_frames=16), max_bytes=1 << 20, timeout_s=5)
    segments = [Segment("q", "e", "video", t, t + 30.0, np.full((60, 4, 4, 3), t // 30, np.uint8))
                for t in range(0, 300, 30)]
    frames = decoders._collect(iter(segments), "video", "long.mp4")
    assert frames.shape == (16, 4, 4, 3)
    assert frames[0, 0, 0, 0] == 0 and frames[-1, 0, 0, 0] == 9  # spread over the whole clip


# ---------------------------------------------------------------- four hostile uploads


def rss_peak_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmHWM"].split()[0]) / 1024


@pytest.mark.slow
def test_four_hostile_uploads_leave_text_queries_answering(built, tmp_path):
    """Two 2-hour Ogg files and two 9-minute noise WAVs, uploaded again and again by four clients,
    while a fifth client keeps querying text: p99 under 1 s, server RSS under 1.5 GB."""
    _, index_root = built
    long_ogg(tmp_path / "two-hours.ogg", 7200)
    noise_wav(tmp_path / "nine-minutes.wav", 540)
    hostile = [tmp_path / "two-hours.ogg", tmp_path / "nine-minutes.wav"] * 2
    proc = subprocess.Popen([sys.executable, "-m", "xmodal_index", "serve", "--index", str(index_root), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", line).group(1))
        for _ in range(50):  # the decode workers warm up
            if text_query(port)[0] == 200:
                break
        stop = threading.Event()
        hostile_statuses, latencies, text_statuses = [], [], []

        def attacker(path):
            data = path.read_bytes()
            while not stop.is_set():
                hostile_statuses.append(upload(port, path.name, data, timeout=120)[0])

        def reader():
            while not stop.is_set():
                started = time.monotonic()
                text_statuses.append(text_query(port)[0])
                latencies.append(time.monotonic() - started)
                time.sleep(0.02)

        threads = [threading.Thread(target=attacker, args=(p,)) for p in hostile] + [threading.Thread(target=reader)]
        for t in threads:
            t.start()
        time.sleep(20)
        stop.set()
        for t in threads:
            t.join()
        peak_mb = rss_peak_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    p99 = float(np.percentile(latencies, 99))
    counts = {code: hostile_statuses.count(code) for code in sorted(set(hostile_statuses))}
    print(f"text queries: {len(latencies)}, p50 {np.percentile(latencies, 50):.3f} s, p99 {p99:.3f} s, "
          f"max {max(latencies):.3f} s; server peak RSS {peak_mb:.0f} MB; hostile uploads by status {counts}")
    assert set(text_statuses) == {200} and len(latencies) > 50
    assert p99 < 1.0, f"text query p99 {p99:.3f} s"
    assert peak_mb < 1536, f"server peak RSS {peak_mb:.0f} MB"
    assert set(hostile_statuses) <= {200, 422, 503} and 422 in hostile_statuses
