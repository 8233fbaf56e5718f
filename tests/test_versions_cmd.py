"""`xmodal-index versions | promote | gc` through click's CliRunner."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from tests.test_loader import Archive
from xmodal_index.jobs.cli import cli
from xmodal_index.sinks.index import manifest as mf
from xmodal_index.sinks.index.build import IndexBuildConfig

CONFIG = IndexBuildConfig(recall_sample=10)


@pytest.fixture()
def root(tmp_path):
    """An index root holding v000001 .. v000004 (LATEST v000004, each the parent of the next)."""
    path = tmp_path / "work" / "indexes" / "main"
    for seed in range(4):
        Archive({"text": 40 + seed}, seed=seed).build(path, CONFIG)
    return path


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


# ---------------------------------------------------------------- versions


def test_versions_lists_every_version_with_its_metrics_and_marks_latest(root):
    result = invoke("versions", "--index", str(root))
    assert result.exit_code == 0
    lines = [ln for ln in result.output.splitlines() if ln.lstrip("* ").startswith("v0000")]
    assert [ln.lstrip("* ").split()[0] for ln in lines] == ["v000001", "v000002", "v000003", "v000004"]
    assert lines[-1].startswith("* v000004")
    assert "1.000/1.000" in lines[0]


def test_versions_json_gives_recall_vectors_and_parent(root):
    result = invoke("versions", "--index", str(root), "--json")
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [(r["version"], r["parent_version"], r["ntotal"], r["latest"]) for r in rows] == [
        ("v000001", None, 40, False), ("v000002", "v000001", 41, False),
        ("v000003", "v000002", 42, False), ("v000004", "v000003", 43, True)]
    assert rows[0]["recall_at_10"] == {"float": 1.0, "binary": 1.0}


def test_versions_accepts_a_workdir(root):
    result = invoke("versions", "--index", str(root.parent.parent), "--json")
    assert len(result.output.splitlines()) == 4


def test_versions_lists_interrupted_builds_as_incomplete(root):
    (root / "v000005").mkdir()
    (root / "v000005" / "shard-x.float.faiss").write_bytes(b"half")
    assert "v000005   incomplete" in invoke("versions", "--index", str(root)).output


# ---------------------------------------------------------------- promote


def test_promote_rolls_latest_back_to_an_older_version(root):
    result = invoke("promote", "v000002", "--index", str(root))
    assert result.exit_code == 0
    assert "v000004 -> v000002" in result.output
    assert mf.read_latest(str(root)) == "v000002"


def test_promote_refuses_an_unknown_version(root):
    result = CliRunner().invoke(cli, ["promote", "v000009", "--index", str(root)])
    assert result.exit_code == 1
    assert "v000009" in result.output
    assert mf.read_latest(str(root)) == "v000004"


def test_promote_refuses_a_version_with_a_missing_file(root):
    manifest = mf.read_manifest(str(root), "v000002")
    os.unlink(root / "v000002" / manifest.id_maps[0].file)
    result = CliRunner().invoke(cli, ["promote", "v000002", "--index", str(root)])
    assert result.exit_code == 1
    assert manifest.id_maps[0].file in result.output and "missing" in result.output
    assert mf.read_latest(str(root)) == "v000004"


def test_promote_and_gc_wait_for_no_one_while_a_run_holds_the_workdir(root):
    from xmodal_index.sinks.storage.lease import Lease, lease_uri

    with Lease(lease_uri(str(root.parent.parent)), "run-in-progress"):
        promoted = CliRunner().invoke(cli, ["promote", "v000002", "--index", str(root)])
        collected = CliRunner().invoke(cli, ["gc", "--index", str(root), "--keep", "1"])
    assert promoted.exit_code == 1 and "run-in-progress" in promoted.output
    assert collected.exit_code == 1 and "run-in-progress" in collected.output
    assert mf.read_latest(str(root)) == "v000004"
    assert mf.list_versions(str(root)) == ["v000001", "v000002", "v000003", "v000004"]


# ---------------------------------------------------------------- gc


def test_gc_keeps_the_newest_and_deletes_the_rest(root):
    result = invoke("gc", "--index", str(root), "--keep", "2")
    assert result.exit_code == 0
    assert mf.list_versions(str(root)) == ["v000003", "v000004"]
    assert not (root / "v000001").exists()


def test_gc_never_deletes_latest_or_its_parent(root):
    invoke("promote", "v000002", "--index", str(root))
    invoke("gc", "--index", str(root), "--keep", "0")
    assert mf.list_versions(str(root)) == ["v000001", "v000002"]  # LATEST v000002 and its parent v000001
    assert mf.read_latest(str(root)) == "v000002"


def test_gc_dry_run_deletes_nothing(root):
    result = invoke("gc", "--index", str(root), "--keep", "1", "--dry-run")
    assert "would delete v000001" in result.output
    assert mf.list_versions(str(root)) == ["v000001", "v000002", "v000003", "v000004"]


def test_gc_removes_stale_interrupted_builds_but_not_a_newer_one(root):
    for name in ("v000000", "v000007"):
        (root / name).mkdir()
        (root / name / "shard-x.float.faiss").write_bytes(b"half")
    invoke("gc", "--index", str(root), "--keep", "4")
    assert not (root / "v000000").exists()
    assert (root / "v000007" / "shard-x.float.faiss").exists()


def test_a_deleted_version_cannot_be_promoted(root):
    invoke("gc", "--index", str(root), "--keep", "1")
    result = CliRunner().invoke(cli, ["promote", "v000001", "--index", str(root)])
    assert result.exit_code == 1
    assert mf.read_latest(str(root)) == "v000004"


def test_every_option_is_documented():
    for command in ("versions", "promote", "gc"):
        result = invoke(command, "--help")
        assert result.exit_code == 0
        assert "--index" in result.output


def test_promote_and_gc_work_on_object_storage(s3_bucket):
    root = f"{s3_bucket}/work/indexes/main"
    for seed in range(3):
        Archive({"text": 30 + seed}, seed=seed).build(root, CONFIG)
    assert invoke("promote", "v000002", "--index", root).exit_code == 0
    assert mf.read_latest(root) == "v000002"
    invoke("gc", "--index", f"{s3_bucket}/work", "--keep", "0")  # a workdir: indexes/main under it
    assert mf.list_versions(root) == ["v000001", "v000002"]  # LATEST and its parent
    rows = [json.loads(line) for line in invoke("versions", "--index", root, "--json").output.splitlines()]
    assert [(r["version"], r["latest"]) for r in rows] == [("v000001", False), ("v000002", True)]
