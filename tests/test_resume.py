"""A run killed at any point and rerun gives the same index as an uninterrupted run.

The kill is XMODAL_CRASH_AT=<point>: the CLI (in a child process) ends itself with
os._exit there, leaving whatever a SIGKILL would leave (temporary parts, a half
uploaded version, its lease). The rerun happens in this process.
"""

import shutil

import pytest

from tests.run_helpers import (
    assert_same_index,
    index_contents,
    invoke,
    invoke_subprocess,
    make_archive,
    run_args,
    summaries,
)
from xmodal_index.jobs.run_job import CRASH_ENV, CRASH_EXIT_CODE, live_batches
from xmodal_index.sinks.index import manifest as mf
from xmodal_index.sinks.ledger import read_ledger


@pytest.fixture(scope="module")
def clean(archive, config, tmp_path_factory):
    """The index of an uninterrupted run."""
    work = tmp_path_factory.mktemp("clean")
    result = invoke(*run_args(archive, work, config))
    assert result.exit_code == 0, result.output
    return index_contents(str(work / "indexes" / "main"))


def _crash(archive, work, config, point):
    proc = invoke_subprocess(run_args(archive, work, config), env={CRASH_ENV: point})
    assert proc.returncode == CRASH_EXIT_CODE, proc.stderr[-3000:]


def _live_rows_are_unique(work):
    ledger = read_ledger(str(work))
    model_id = next(e.model_id for e in ledger.values() if e.state == "indexed")
    ids = [i for b in live_batches(str(work), ledger, model_id)() for i in b.column("segment_id").to_pylist()]
    assert len(ids) == len(set(ids)) > 0


@pytest.mark.parametrize("point", [
    "during_decode",  # nothing committed: the rerun redoes the work
    "during_write",  # Beam's temporary parts left behind
    pytest.param("after_dag", marks=pytest.mark.slow),  # complete parts, no ledger commit
    pytest.param("after_ledger", marks=pytest.mark.slow),  # ledger committed, no version
    "during_upload",  # a partial version directory without a manifest
    "before_publish",  # a complete version that LATEST does not name: published by the rerun
    pytest.param("after_publish", marks=pytest.mark.slow),  # LATEST written, ledger/PUBLISHED not
])
def test_rerun_after_a_crash_gives_the_clean_index(archive, config, clean, tmp_path, point):
    work = tmp_path / "work"
    _crash(archive, work, config, point)
    root = work / "indexes" / "main"
    if point != "after_publish":
        assert not (root / "LATEST").exists()  # nothing half-done is visible
    result = invoke(*run_args(archive, work, config))
    assert result.exit_code == 0, result.output
    assert_same_index(index_contents(str(root)), clean)
    _live_rows_are_unique(work)
    # the rerun finishes the crashed run's work instead of adding to it
    assert mf.read_latest(str(root)) in mf.list_versions(str(root))
    (last,) = summaries(str(work))
    assert last["inputs_total"] == last["indexed"] + last["unchanged"] + last["failed"] == 8


def test_crash_in_an_incremental_run_keeps_the_old_version_live_then_catches_up(config, tmp_path):
    src = tmp_path / "archive"
    make_archive(src)
    work = tmp_path / "work"
    assert invoke(*run_args(src, work, config)).exit_code == 0
    root = str(work / "indexes" / "main")
    (src / "images" / "img0.png").unlink()
    shutil.copy(src / "images" / "img1.png", src / "images" / "copy.png")
    (src / "texts" / "note0.txt").write_text("a changed note")

    _crash(src, work, config, "during_upload")
    assert mf.read_latest(root) == "v000001"  # readers still get the last complete version
    crashed = read_ledger(str(work))[str(src / "images" / "copy.png")].run_id
    result = invoke(*run_args(src, work, config))
    assert result.exit_code == 0, result.output
    last = summaries(str(work))[-1]
    # the crashed run had committed its ledger: the rerun publishes its changes
    assert (last["indexed"], last["unchanged"], last["completes_run"]) == (0, 8, crashed)
    assert last["index_version"] == "v000003"  # v000002 is the crashed run's partial upload, never published

    reference = tmp_path / "reference"
    assert invoke(*run_args(src, reference, config)).exit_code == 0
    assert_same_index(index_contents(root), index_contents(str(reference / "indexes" / "main")))
    _live_rows_are_unique(work)


def test_a_version_uploaded_before_a_crash_is_published_not_rebuilt(archive, config, tmp_path):
    work = tmp_path / "work"
    _crash(archive, work, config, "before_publish")
    root = str(work / "indexes" / "main")
    assert mf.list_versions(root) == ["v000001"] and mf.read_latest(root) is None
    uploaded = (work / "indexes" / "main" / "v000001" / "manifest.json").read_bytes()
    result = invoke(*run_args(archive, work, config))
    assert result.exit_code == 0, result.output
    assert "uploaded by an earlier run" in result.output
    # the crashed run's complete version is the one served: nothing rebuilt, nothing orphaned
    assert mf.list_versions(root) == ["v000001"] and mf.read_latest(root) == "v000001"
    assert (work / "indexes" / "main" / "v000001" / "manifest.json").read_bytes() == uploaded
    assert summaries(str(work))[-1]["index_published"]


def test_a_damaged_uploaded_version_is_rebuilt_not_published(archive, config, tmp_path):
    work = tmp_path / "work"
    _crash(archive, work, config, "before_publish")
    version_dir = work / "indexes" / "main" / "v000001"
    manifest = mf.read_manifest(str(work / "indexes" / "main"), "v000001")
    shard = version_dir / manifest.shards[0].file
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only its sha256 tells
    shard.write_bytes(bytes(data))
    result = invoke(*run_args(archive, work, config))
    assert result.exit_code == 0, result.output
    assert mf.read_latest(str(work / "indexes" / "main")) == "v000002"
