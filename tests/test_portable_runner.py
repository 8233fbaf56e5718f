"""The same DAG on Beam's portable path: PortableRunner -> job service -> external SDK worker pool.

Every distributed runner (Flink, Spark, Dataflow) runs the job this way: the
pipeline is submitted to a job service and executed by SDK workers in other
processes that share nothing with the submitting process but what travels with
the job. Here the job service and the worker pool run as separate processes on
127.0.0.1 (tests/beam_services.py), started from their own working directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.beam_services import free_port, start_portable_services
from tests.run_helpers import (
    assert_same_index,
    index_contents,
    invoke,
    run_args,
    upload_tree,
)
from xmodal_index.encoders.builtin import bundled_checkpoint_path, load_builtin
from xmodal_index.encoders.config import EncoderConfig
from xmodal_index.sinks import storage

PORTABLE_TIMEOUT_S = 600  # a job the workers never pick up fails the test instead of hanging it


@pytest.fixture(scope="module")
def services(tmp_path_factory, s3_server):
    """Job service + worker pool, run from their own folder, with the S3 test server's settings
    in their environment (workers take S3 settings from the environment, not from the job)."""
    cwd = tmp_path_factory.mktemp("beam-services")
    env = {**s3_server.env, "AWS_CONFIG_FILE": str(cwd / "no-aws-config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(cwd / "no-aws-credentials")}
    svc = start_portable_services(cwd, env=env)
    yield svc
    svc.stop()


def run_portable(svc, source, workdir, config_path, cwd, env=None) -> subprocess.CompletedProcess:
    """``xmodal-index run --runner PortableRunner -- <endpoints>`` as a child process in ``cwd``."""
    args = [*run_args(source, workdir, config_path), "--runner", "PortableRunner", "--", *svc.beam_args()]
    try:
        return subprocess.run([sys.executable, "-m", "xmodal_index", *map(str, args)], cwd=str(cwd),
                              env={**os.environ, **(env or {})}, capture_output=True, text=True,
                              timeout=PORTABLE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the portable run did not finish within {PORTABLE_TIMEOUT_S} s (are SDK workers starting?)")


def embedding_rows(workdir) -> dict[int, dict]:
    files = sorted(Path(workdir).glob("embeddings/*/part-*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    return {r["segment_id"]: r for r in table.to_pylist()}


def assert_same_rows(got: dict[int, dict], want: dict[int, dict]) -> None:
    assert sorted(got) == sorted(want)
    for sid, row in want.items():
        other = got[sid]
        for key in ("uri", "etag", "modality", "start_s", "end_s", "model_id", "text", "sampling"):
            assert other[key] == row[key], (sid, key)
        np.testing.assert_allclose(other["embedding"], row["embedding"], atol=1e-5)


def test_portable_runner_writes_what_the_direct_runner_writes(services, archive, config, tmp_path):
    direct = tmp_path / "direct"
    result = invoke(*run_args(archive, direct, config))
    assert result.exit_code == 0, result.output
    portable = tmp_path / "portable"
    proc = run_portable(services, archive, portable, config, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_rows(embedding_rows(portable), embedding_rows(direct))
    assert_same_index(index_contents(str(portable / "indexes" / "main")),
                      index_contents(str(direct / "indexes" / "main")))


def test_a_missing_worker_pool_fails_with_one_line(archive, config, tmp_path):
    # a job service may be up; nothing listens where the workers should be
    port = free_port()
    beam = [f"--job_endpoint=localhost:{free_port()}", "--environment_type=EXTERNAL",
            f"--environment_config=localhost:{port}"]
    t = time.monotonic()
    result = invoke(*run_args(archive, tmp_path / "work", config), "--runner", "PortableRunner", "--", *beam)
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--job_endpoint=localhost:" in lines[0] and "nothing answers" in lines[0]
    assert time.monotonic() - t < 60
    assert not (tmp_path / "work").exists()  # nothing was done


def test_a_missing_worker_pool_behind_a_live_job_service_is_named(services, archive, config, tmp_path):
    beam = [f"--job_endpoint=localhost:{services.job_port}", "--environment_type=EXTERNAL",
            f"--environment_config=localhost:{free_port()}"]
    result = invoke(*run_args(archive, tmp_path / "work", config), "--runner", "PortableRunner", "--", *beam)
    assert result.exit_code == 2
    (line,) = [ln for ln in result.output.splitlines() if ln.strip()]
    assert "--environment_config=localhost:" in line and "SDK worker pool" in line


@pytest.mark.slow
def test_portable_run_from_another_folder_on_s3_reads_nothing_local(services, archive, s3_bucket, tmp_path):
    """Source and workdir on S3, the command started from a folder of its own whose
    checkpoint is named by a relative path: the workers (elsewhere) must get it from
    the job, not from the submitting process's folder."""
    source = s3_bucket + "/archive"
    upload_tree(archive, source)
    submit = tmp_path / "submit"
    (submit / "models").mkdir(parents=True)
    shutil.copy(bundled_checkpoint_path(), submit / "models" / "model.safetensors")
    (submit / "job.toml").write_text('[decode]\nsegment_s = 1.0\n[encoder]\ncheckpoint = "models/model.safetensors"\n'
                                     '[run]\nmax_error_fraction = 0.5\n')
    workdir = s3_bucket + "/work"
    proc = run_portable(services, source, workdir, "job.toml", cwd=submit)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (summary_uri,) = [o.uri for o in storage.list_objects(workdir + "/runs", include=("*/summary.json",))]
    summary = json.loads(storage.read_bytes(summary_uri))
    assert summary["failed"] == 0 and summary["rows_written"] > 0
    index = index_contents(workdir + "/indexes/main")
    assert len(index) == summary["rows_written"]
    assert summary["model_id"] == load_builtin(EncoderConfig()).model_id  # the same weights as the bundled ones


@pytest.mark.slow
def test_portable_runner_matches_the_direct_runner_on_the_sample_archive(services, tmp_path):
    from xmodal_index.pipeline.sample_archive import build_sample_archive

    sample = tmp_path / "sample"
    build_sample_archive(str(sample), videos=3, segments_per_video=4)
    config_path = Path(__file__).resolve().parents[1] / "examples" / "sample.toml"
    direct = tmp_path / "direct"
    result = invoke(*run_args(sample, direct, config_path))
    assert result.exit_code == 0, result.output
    portable = tmp_path / "portable"
    proc = run_portable(services, sample, portable, config_path, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_rows(embedding_rows(portable), embedding_rows(direct))
    assert_same_index(index_contents(str(portable / "indexes" / "main")),
                      index_contents(str(direct / "indexes" / "main")))


@pytest.mark.parametrize("runner, args, checked", [
    ("PortableRunner", ["--job_endpoint=localhost:8099", "--environment_type=EXTERNAL",
                        "--environment_config=localhost:50000"], ["--job_endpoint", "--environment_config"]),
    # a remote job service: localhost:50000 is each cluster worker's own sidecar, not this machine's
    ("PortableRunner", ["--job_endpoint=jobserver.internal:8099", "--environment_type=EXTERNAL",
                        "--environment_config=localhost:50000"], ["--job_endpoint"]),
    ("FlinkRunner", ["--flink_master=flink:8081", "--environment_type=EXTERNAL",
                     "--environment_config=localhost:50000"], []),
    ("DirectRunner", ["--direct_num_workers=2"], []),
])
def test_only_endpoints_this_machine_must_reach_are_checked(runner, args, checked):
    from xmodal_index.jobs.portable import portable_endpoints

    assert [flag for flag, _ in portable_endpoints(args, runner)] == checked
