"""`serve`'s API beyond text and uploads: raw embedding queries, GET /versions, Prometheus GET /metrics,
GET /openapi.json, and a schema-driven fuzz run (schemathesis, slow). Real HTTP on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import math
import re
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from xmodal_index.jobs.cli import cli
from xmodal_index.jobs.query_support import prepare_encoder
from xmodal_index.jobs.server import QueryServer, ServerConfig
from xmodal_index.pipeline.sample_archive import build_sample_archive
from xmodal_index.query.fusion import FUSIONS
from xmodal_index.sinks.serving.hot_swap import HotSwapConfig, IndexHandle

CONFIG = '[decode]\nsegment_s = 1.0\n[encoder]\ncheckpoint = ""\nseed = {seed}\n'


def run_job(archive, workdir, config) -> None:
    result = CliRunner().invoke(cli, ["run", "--source", str(archive), "--workdir", str(workdir),
                                      "--config", str(config)], catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An index with two versions: v000001 (seed 0) and v000002 (seed 1, one more text file)."""
    base = tmp_path_factory.mktemp("serve-api")
    archive, workdir = base / "archive", base / "work"
    build_sample_archive(str(archive), videos=1, segments_per_video=2)
    config = base / "job.toml"
    config.write_text(CONFIG.format(seed=0))
    run_job(archive, workdir, config)
    (archive / "text" / "added.txt").write_text("nine")
    config.write_text(CONFIG.format(seed=1))
    run_job(archive, workdir, config)
    return workdir / "indexes" / "main"


@pytest.fixture(scope="module")
def server(built):
    with IndexHandle(str(built), HotSwapConfig(poll_s=60, version="v000001"), prepare=prepare_encoder) as handle, \
            QueryServer(handle, ServerConfig(port=0, max_k=20)) as srv:
        yield srv


def request(srv, method, path, body=b"", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(), dict(resp.getheaders())
    finally:
        conn.close()


def query(srv, obj=None, raw=None):
    body = raw if raw is not None else json.dumps(obj).encode()
    status, data, _ = request(srv, "POST", "/query", body, {"Content-Type": "application/json"})
    return status, json.loads(data)


def dim_of(srv) -> int:
    return srv.handle.current.manifest.dim


# ---------------------------------------------------------------- raw embeddings


def test_an_embedding_query_finds_the_row_it_came_from(server):
    served = server.handle.current
    text = "seven"
    vec = served.extra.encode("text", [text]).embeddings[0]
    status, by_text = query(server, {"text": text, "k": 3, "modality": ["text"]})
    status2, by_vec = query(server, {"embedding": [float(x) * 3.0 for x in vec], "k": 3, "modality": ["text"]})
    assert status == status2 == 200 and by_vec["version"] == "v000001"
    assert [h["segment_id"] for h in by_vec["hits"]] == [h["segment_id"] for h in by_text["hits"]]
    assert math.isclose(by_vec["hits"][0]["score"], by_text["hits"][0]["score"], abs_tol=1e-4)  # normalised


@pytest.mark.parametrize("values, needle", [
    (lambda d: [0.1] * (d - 1), "needs {d} numbers"),
    (lambda d: [0.1] * (d + 1), "needs {d} numbers"),
    (lambda d: [0.0] * d, "zero vector"),
    (lambda d: [0.1] * (d - 1) + ["x"], "is not a number"),
    (lambda d: [0.1] * (d - 1) + [True], "is not a number"),
    (lambda d: [0.1] * (d - 1) + [None], "is not a number"),
    (lambda d: [], "non-empty list"),
    (lambda d: "0.1,0.2", "non-empty list"),
    (lambda d: [[0.1] * d], "is not a number"),
])
def test_bad_embeddings_get_400_naming_the_problem(server, values, needle):
    d = dim_of(server)
    status, body = query(server, {"embedding": values(d)})
    assert status == 400 and needle.replace("{d}", str(d)) in body["error"] and "\n" not in body["error"], body


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_embedding_values_get_400(server, literal):
    raw = b'{"embedding": [' + b"0.1, " * (dim_of(server) - 1) + literal + b"]}"
    status, body = query(server, raw=raw)
    assert status == 400 and "finite" in body["error"] and f"embedding[{dim_of(server) - 1}]" in body["error"]


def test_k_per_modality_groups_hits_by_stream(server):
    status, body = query(server, {"text": "seven", "k_per_modality": 2, "modality": ["text", "audio"]})
    assert status == 200
    assert [h["modality"] for h in body["hits"]] == ["text", "text", "audio", "audio"]


@pytest.mark.parametrize("extra, needle", [({"k_per_modality": 0}, "k_per_modality"),
                                           ({"k_per_modality": 21}, "[1, 20]"),
                                           ({"fusion": "max"}, ", ".join(FUSIONS))])
def test_bad_grouping_options_get_422(server, extra, needle):
    status, body = query(server, {"text": "seven", **extra})
    assert status == 422 and needle in body["error"]


def test_text_and_embedding_together_get_400(server):
    status, body = query(server, {"text": "seven", "embedding": [0.1] * dim_of(server)})
    assert status == 400 and "exactly one of text, embedding" in body["error"]


# ---------------------------------------------------------------- /versions


def test_versions_lists_every_version_with_the_served_one_marked(server):
    status, data, headers = request(server, "GET", "/versions")
    body = json.loads(data)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert body["current"] == "v000001" and body["latest"] == "v000002" and body["pinned"] is True
    assert body["versions"] == [{"version": "v000001", "current": True, "latest": False},
                                {"version": "v000002", "current": False, "latest": True}]


# ---------------------------------------------------------------- /metrics


def sample(text: str, name: str, **labels) -> float | None:
    """The value of one sample of a Prometheus text exposition."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        if m is None or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if got == {k: str(v) for k, v in labels.items()}:
            return float(m.group(3))
    return None


def test_metrics_count_requests_errors_latency_and_the_loaded_version(built):
    with IndexHandle(str(built), HotSwapConfig(poll_s=60), prepare=prepare_encoder) as handle, \
            QueryServer(handle, ServerConfig(port=0)) as srv:
        for _ in range(3):
            query(srv, {"text": "seven"})
        query(srv, {"text": ""})
        request(srv, "GET", "/no/such/path")
        request(srv, "GET", "/healthz")
        status, data, headers = request(srv, "GET", "/metrics")
        served = handle.status()
    text = data.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert sample(text, "xmodal_serve_requests_total", endpoint="/query", code=200) == 3
    assert sample(text, "xmodal_serve_requests_total", endpoint="/query", code=400) == 1
    assert sample(text, "xmodal_serve_requests_total", endpoint="other", code=404) == 1
    assert sample(text, "xmodal_serve_request_errors_total", endpoint="/query", code=400) == 1
    assert sample(text, "xmodal_serve_request_errors_total", endpoint="/query", code=200) is None
    assert sample(text, "xmodal_serve_request_duration_seconds_count", endpoint="/query") == 4
    assert sample(text, "xmodal_serve_request_duration_seconds_bucket", endpoint="/query", le="+Inf") == 4
    assert sample(text, "xmodal_index_version_info", index=str(built), version="v000002",
                  model_id=served.model_id) == 1
    assert sample(text, "xmodal_index_vectors") == served.ntotal
    assert sample(text, "xmodal_serve_media_queries") == 0


def test_metrics_parse_as_prometheus_text(server):
    from prometheus_client.parser import text_string_to_metric_families

    _, data, _ = request(server, "GET", "/metrics")
    names = {family.name for family in text_string_to_metric_families(data.decode())}
    assert {"xmodal_serve_requests", "xmodal_serve_request_duration_seconds", "xmodal_index_version_info",
            "xmodal_serve_request_errors"} <= names


# ---------------------------------------------------------------- /openapi.json


def test_openapi_document_describes_every_route_with_the_servers_limits(server):
    status, data, _ = request(server, "GET", "/openapi.json")
    doc = json.loads(data)
    assert status == 200 and doc["openapi"].startswith("3.")
    assert {p: sorted(ops) for p, ops in doc["paths"].items()} == {
        p: [m.lower()] for p, m in server.ROUTES.items()}
    body = doc["paths"]["/query"]["post"]["requestBody"]["content"]
    text_schema, embedding_schema = body["application/json"]["schema"]["oneOf"]
    assert text_schema["properties"]["k"]["maximum"] == 20
    assert embedding_schema["required"] == ["embedding"]
    assert set(body["multipart/form-data"]["schema"]["properties"]) == {"text", "audio", "image", "video", "k",
                                                                         "modality"}


def test_openapi_document_is_valid_openapi(server):
    validator = pytest.importorskip("openapi_spec_validator")
    _, data, _ = request(server, "GET", "/openapi.json")
    validator.validate(json.loads(data))


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(server, tmp_path):
    """A schema-driven fuzz run over every route: no answer is a 5xx (needs the `fuzz` extra)."""
    pytest.importorskip("schemathesis")
    exe = shutil.which("schemathesis", path=str(sys.executable).rsplit("/", 1)[0])
    assert exe, "schemathesis is installed but its command is not beside the interpreter"
    result = subprocess.run([exe, "run", f"{server.url}/openapi.json", "--checks", "not_a_server_error",
                             "--max-examples", "200", "--workers", "1", "--phases", "examples,coverage,fuzzing",
                             "--suppress-health-check", "all", "--report-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    tested = re.search(r"(\d+) generated", result.stdout)
    assert tested and int(tested.group(1)) >= 100, result.stdout[-2000:]
