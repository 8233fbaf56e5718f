"""`xmodal-index run` builds incremental versions on LATEST, and full ones when asked
(--rebuild-index) or when the policy says so; both hold the same live rows."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.media_factory import make_png
from tests.run_helpers import assert_same_index, index_contents, invoke, make_archive, run_args, write_config
from xmodal_index.sinks.index import manifest as mf


@pytest.fixture
def archive(tmp_path):
    make_archive(tmp_path / "archive")
    return tmp_path / "archive"


@pytest.fixture
def config(tmp_path):
    return write_config(tmp_path)


def _last_summary(work) -> dict:
    return json.loads(sorted(work.glob("runs/*/summary.json"))[-1].read_text())


def test_a_nightly_run_adds_a_delta_and_tombstones_and_holds_what_a_rebuild_holds(archive, config, tmp_path):
    src, work = tmp_path / "src", tmp_path / "work"
    shutil.copytree(archive, src)
    assert invoke(*run_args(src, work, config)).exit_code == 0
    root = str(work / "indexes" / "main")
    (src / "images" / "img0.png").unlink()
    make_png(src / "images" / "img9.png", color=(200, 200, 10))
    result = invoke(*run_args(src, work, config))
    assert result.exit_code == 0, result.output
    version = mf.read_latest(root)
    manifest = mf.read_manifest(root, version)
    assert manifest.extra["base_version"] == manifest.parent_version and manifest.extra["delta_count"] == 1
    assert manifest.tombstones is not None and manifest.extra["tombstones"]["count"] >= 1
    assert {f.origin for f in manifest.all_files()} == {"", manifest.parent_version}
    assert _last_summary(work)["index_version"] == version

    rebuilt = tmp_path / "rebuilt"
    shutil.copytree(work, rebuilt)
    make_png(src / "images" / "img8.png", color=(10, 200, 200))
    result = invoke(*run_args(src, rebuilt, config, "--rebuild-index"))
    assert result.exit_code == 0 and "full build" in result.output
    full = mf.read_manifest(str(rebuilt / "indexes" / "main"), mf.read_latest(str(rebuilt / "indexes" / "main")))
    assert "base_version" not in full.extra and all(not f.origin for f in full.all_files())
    result = invoke(*run_args(src, work, config))  # the same change, incremental
    assert result.exit_code == 0 and ": incremental: " in result.output
    assert_same_index(index_contents(root), index_contents(str(rebuilt / "indexes" / "main")))
