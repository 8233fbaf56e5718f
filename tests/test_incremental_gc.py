"""gc keeps every version whose files a kept incremental version lists by origin;
rolling back to an incremental version still works after a compaction."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner

from tests.test_incremental import full, rows, top_ids
from xmodal_index.jobs.cli import cli
from xmodal_index.sinks.index import manifest as mf
from xmodal_index.sinks.index.incremental import build_increment
from xmodal_index.sinks.serving.loader import IndexVersion


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _chain(tmp_path):
    """v1 full; v2, v3 incremental on it; v4 full (compaction of the same live rows); v5 incremental on v4."""
    root = tmp_path / "work" / "indexes" / "main"
    b0, ids, x = rows(0, 300, seed=1)
    b1, _, x1 = rows(1000, 40, seed=2)
    b2, _, _ = rows(2000, 40, seed=3)
    full(root, [b0])
    build_increment(str(root), "v000001", [b1], deleted_ids=ids[:10])
    build_increment(str(root), "v000002", [b2], deleted_ids=ids[10:20])
    live = [b.filter(np.array([i >= 20 for i in b.column("segment_id").to_pylist()])) for b in (b0, b1, b2)]
    full(root, live)
    build_increment(str(root), "v000004", [rows(3000, 40, seed=4)[0]])
    return root, np.vstack([x[20:40], x1[:10]])


def test_gc_keeps_the_versions_a_kept_increment_takes_files_from(tmp_path):
    root, queries = _chain(tmp_path)
    assert invoke("promote", "v000003", "--index", root).exit_code == 0
    result = invoke("gc", "--index", root, "--keep", "0")
    assert result.exit_code == 0, result.output
    assert mf.list_versions(str(root)) == ["v000001", "v000002", "v000003"]  # v1 only through origin
    with IndexVersion.open(str(root)) as version:
        assert version.version == "v000003" and len(top_ids(version, queries)) == len(queries)


def test_rolling_back_to_an_increment_after_a_compaction_still_works(tmp_path):
    root, queries = _chain(tmp_path)
    assert invoke("promote", "v000005", "--index", root).exit_code == 0
    with IndexVersion.open(str(root), "v000004") as compacted:
        want = top_ids(compacted, queries)
    assert invoke("gc", "--index", root, "--keep", "3").exit_code == 0  # v3, v4, v5 kept; v1, v2 as v3's origins
    assert mf.list_versions(str(root)) == ["v000001", "v000002", "v000003", "v000004", "v000005"]
    assert invoke("gc", "--index", root, "--keep", "2").exit_code == 0
    assert mf.list_versions(str(root)) == ["v000004", "v000005"]
    result = invoke("promote", "v000003", "--index", root)
    assert "v000003" in result.output and result.exit_code != 0  # gone as a whole, never half

    root2, _ = _chain(tmp_path / "again")
    assert invoke("promote", "v000005", "--index", root2).exit_code == 0
    assert invoke("gc", "--index", root2, "--keep", "3").exit_code == 0
    assert invoke("promote", "v000003", "--index", root2).exit_code == 0  # the rollback
    with IndexVersion.open(str(root2)) as rolled_back:
        assert rolled_back.version == "v000003"
        assert top_ids(rolled_back, queries) == want  # the same live rows as the compacted v000004
