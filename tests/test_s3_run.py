"""Whole `xmodal-index run` jobs with s3:// source and workdir, against the local
S3-compatible server (tests/s3_server.py), with injected faults."""

import threading
import time

import boto3
import pyarrow.parquet as pq
import pytest

from tests.media_factory import make_png
from tests.run_helpers import (
    index_contents,
    invoke,
    run_args,
    summaries,
    upload_tree,
)
from xmodal_index.jobs.run_job import live_batches
from xmodal_index.sinks import storage
from xmodal_index.sinks.index import manifest as mf
from xmodal_index.sinks.ledger import read_ledger
from xmodal_index.sinks.storage import s3


@pytest.fixture(autouse=True)
def _beam_retry_env(monkeypatch):
    # the job sets these for Beam's S3 client when unset; keep them from leaking into other tests
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "5")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")


@pytest.fixture
def s3_archive(s3_bucket, archive):
    uri = s3_bucket + "/archive"
    upload_tree(archive, uri)
    return uri


def _index_uris(root: str) -> dict[str, str]:
    version = mf.read_latest(root)
    out = {}
    for entry in mf.read_manifest(root, version).id_maps:
        with storage.local_path(storage.join(root, version, entry.file)) as path:
            for row in pq.read_table(path, columns=["uri", "etag"]).to_pylist():
                out[row["uri"]] = row["etag"]
    return out


def test_nightly_run_on_s3_processes_exactly_the_new_changed_and_deleted_objects(s3_archive, config, tmp_path):
    work = s3_archive.rsplit("/", 1)[0] + "/work"
    first = invoke(*run_args(s3_archive, work, config))
    assert first.exit_code == 0, first.output
    root = work + "/indexes/main"
    v1 = index_contents(root)

    for k in range(2):
        storage.put_file(str(make_png(tmp_path / f"new{k}.png", color=(10, 200 - 50 * k, 90))),
                         s3_archive + f"/images/new{k}.png")
    storage.write_bytes(s3_archive + "/texts/new.txt", b"a new note")
    changed = s3_archive + "/images/img1.png"
    storage.put_file(str(make_png(tmp_path / "changed.png", color=(250, 250, 0))), changed)
    gone = s3_archive + "/audio/tone0.wav"
    storage.delete(gone)

    second = invoke(*run_args(s3_archive, work, config))
    assert second.exit_code == 0, second.output
    last = summaries(work)[-1]
    assert (last["indexed"], last["deleted"], last["unchanged"], last["failed"]) == (4, 1, 6, 0)
    assert last["inputs_total"] == 10 and last["index_version"] == "v000002"

    uris = _index_uris(root)
    listed = {o.uri for o in storage.list_objects(s3_archive) if not o.uri.endswith(".vtt")}
    assert set(uris) == listed and gone not in uris
    assert uris[changed] == storage.stat(changed).etag
    v2 = index_contents(root)
    kept = {sid for sid, row in v1.items() if row[0] not in (changed, gone)}
    assert kept <= set(v2)  # unchanged objects keep their rows (same segment ids)
    ledger = read_ledger(work)
    assert ledger[gone].state == "deleted"
    ids = [i for b in live_batches(work, ledger, last["model_id"])() for i in b.column("segment_id").to_pylist()]
    assert sorted(ids) == sorted(v2)  # the live set is exactly the new version, no duplicates


def test_missing_workdir_bucket_is_one_clear_line(s3_archive, config):
    result = invoke(*run_args(s3_archive, "s3://no-such-bucket-xmodal/work", config))
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert "bucket 'no-such-bucket-xmodal' does not exist" in result.output


def test_missing_source_bucket_is_one_clear_line(s3_bucket, config):
    result = invoke(*run_args("s3://no-such-source-xmodal/media", s3_bucket + "/work", config))
    assert result.exit_code == 1
    assert "bucket 'no-such-source-xmodal' does not exist" in result.output.strip()


def test_rejected_credentials_are_one_clear_line(s3_archive, config, fault_proxy):
    fault_proxy.fail_always(403, "InvalidAccessKeyId")
    result = invoke(*run_args(s3_archive, s3_archive + "-work", config))
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert "rejected the credentials (InvalidAccessKeyId)" in result.output
    assert "testing" not in result.output  # the key and secret are never shown


def test_denied_writes_are_one_clear_line(s3_archive, config, fault_proxy):
    fault_proxy.fail_always(403, "AccessDenied", methods=("PUT", "POST"))
    result = invoke(*run_args(s3_archive, s3_archive + "-work", config))
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "access denied (AccessDenied)" in result.output


def test_run_survives_throttling_and_server_errors(s3_archive, config, fault_proxy):
    work = s3_archive + "-work"
    fault_proxy.fail_next(3, 503, "SlowDown", methods=("PUT",))
    fault_proxy.fail_next(2, 500, "InternalError", methods=("GET",))
    fault_proxy.fail_next(2, 503, "SlowDown", methods=("HEAD", "DELETE", "POST"))
    result = invoke(*run_args(s3_archive, work, config))
    assert result.exit_code == 0, result.output
    assert fault_proxy.count(status=503) >= 4 and fault_proxy.count(status=500) == 2
    (summary,) = summaries(work)
    assert (summary["indexed"], summary["failed"], summary["index_version"]) == (8, 0, "v000001")


def test_a_permanent_fault_midway_fails_cleanly_and_a_rerun_finishes(s3_archive, config, fault_proxy, s3_env,
                                                                      monkeypatch):
    work = s3_archive + "-work"
    bucket, key = s3.split_uri(work)
    direct = boto3.client("s3", endpoint_url=s3_env.endpoint_url)
    armed = threading.Event()

    def deny_once_the_dag_starts():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            page = direct.list_objects_v2(Bucket=bucket, Prefix=key + "/runs/")
            if any(o["Key"].endswith("worklist.jsonl") for o in page.get("Contents", ())):
                fault_proxy.fail_always(403, "AccessDenied")
                armed.set()
                return
            time.sleep(0.02)

    threading.Thread(target=deny_once_the_dag_starts, daemon=True).start()
    result = invoke(*run_args(s3_archive, work, config))
    assert armed.is_set()
    assert result.exit_code == 1
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("xmodal-index run: error:") and "403" in error and work in error

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint_url)  # the store works again
    s3.configure_s3(None)
    root = work + "/indexes/main"
    assert mf.read_latest(root) is None and read_ledger(work) == {}  # nothing was committed
    rerun = invoke(*run_args(s3_archive, work, config))
    assert rerun.exit_code == 0, rerun.output
    last = summaries(work)[-1]
    assert (last["indexed"], last["index_version"]) == (8, "v000001")
    assert len(index_contents(root)) == last["rows_written"]
