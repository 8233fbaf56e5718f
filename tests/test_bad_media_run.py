"""The whole bad-input corpus mixed with the sample archive in one `xmodal-index run`.

The run is a subprocess with a hard timeout (a hang fails the test instead of
blocking the session). Checked afterwards: exit 0, the summary's counts add up,
every good input is indexed with rows of its modalities, every bad one has a dead
letter with its documented stage, error class and reason, no row of a failed
input is in the embeddings, and nothing outside the workdir changed (the
source, the folder the links point into, the folder around them). A second run
with --retry-failed and a low max_error_fraction exits 3 and publishes nothing.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests import bad_media as bm
from xmodal_index.pipeline.listing import list_items
from xmodal_index.pipeline.sample_archive import build_sample_archive

RUN_TIMEOUT_S = 300  # a run over this corpus takes ~20 s on 2 cores


def job_config(max_error_fraction: float) -> str:
    decode = "".join(f"{key} = {value!r}\n" for key, value in bm.CORPUS_DECODE.items())
    return (f"[decode]\n{decode}[encoder]\ncheckpoint = \"\"\nbatch_size = 32\n"
            f"[run]\nmax_error_fraction = {max_error_fraction}\n")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONHASHSEED="0")
    try:
        return subprocess.run([sys.executable, "-m", "xmodal_index", *args], capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"xmodal-index {' '.join(args[:1])} did not finish within {RUN_TIMEOUT_S} s: a hang\n"
                    f"{(err.stderr or b'')[-3000:]!r}")


def snapshot(root: Path, skip: Path) -> dict[str, tuple]:
    """Every path under ``root`` but ``skip``: type, size, mtime, link target (never
    opened: the corpus has a FIFO)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if Path(path) == skip:
                continue
            st = os.lstat(path)
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
            out[path] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, target)
    return out


def read_parquet(paths) -> list[dict]:
    tables = [pq.read_table(p) for p in paths]
    return pa.concat_tables(tables).to_pylist() if tables else []


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    archive = root / "archive"
    build_sample_archive(str(archive), videos=3, segments_per_video=4)
    good = [i.uri for i in list_items(str(archive))]
    # the non-UTF-8 name has a test of its own (below)
    cases = bm.build_corpus(archive / "bad", root / "outside", skip=(bm.non_utf8_name,))
    config = root / "job.toml"
    config.write_text(job_config(max_error_fraction=0.9))
    work = root / "work"
    before = snapshot(root, skip=work)
    result = run_cli("run", "--source", str(archive), "--workdir", str(work), "--config", str(config))
    after = snapshot(root, skip=work)
    summaries = list(work.glob("runs/*/summary.json"))
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    assert len(summaries) == 1
    return dict(root=root, archive=archive, work=work, config=config, cases=cases, good=good, result=result,
                summary=json.loads(summaries[0].read_text()), before=before, after=after)


def ledger_of(work: Path) -> dict[str, dict]:
    name = (work / "ledger" / "CURRENT").read_text().strip()
    return {row["uri"]: row for row in pq.read_table(work / "ledger" / name).to_pylist()}


def cases_with(run, outcome: str) -> list[bm.Case]:
    return [c for c in run["cases"] if c.outcome == outcome]


def test_summary_counts_add_up_over_every_listed_input(mixed_run):
    s = mixed_run["summary"]
    listed = len(mixed_run["good"]) + len(cases_with(mixed_run, bm.INDEXED)) + len(cases_with(mixed_run, bm.DEAD))
    assert s["inputs_total"] == listed
    assert s["inputs_total"] == s["indexed"] + s["unchanged"] + s["failed"]
    assert s["failed"] == len(cases_with(mixed_run, bm.DEAD))
    assert sum(s["failed_by_stage"].values()) == s["failed"]
    assert s["index_published"] and s["exit_code"] == 0


def test_every_good_input_is_indexed_with_rows_of_its_modalities(mixed_run):
    ledger = ledger_of(mixed_run["work"])
    rows = read_parquet(mixed_run["work"].glob("embeddings/*/part-*.parquet"))
    modalities: dict[str, set] = {}
    for r in rows:
        modalities.setdefault(r["uri"], set()).add(r["modality"])
    for uri in mixed_run["good"]:
        assert ledger[uri]["state"] == "indexed", uri
        assert modalities.get(uri), uri
    for case in cases_with(mixed_run, bm.INDEXED):
        uri = str(case.path)
        assert ledger[uri]["state"] == "indexed", case.name
        assert modalities.get(uri) == set(case.modalities), case.name


def test_every_bad_input_is_dead_lettered_with_its_stage_class_and_reason(mixed_run):
    letters = read_parquet(mixed_run["work"].glob("deadletter/*/part-*.parquet"))
    by_uri = {d["uri"]: d for d in letters}
    assert len(by_uri) == len(letters)  # one dead letter per failed input
    ledger = ledger_of(mixed_run["work"])
    for case in cases_with(mixed_run, bm.DEAD):
        letter = by_uri.get(str(case.path))
        assert letter is not None, case.name
        assert (letter["stage"], letter["error_type"]) == (case.stage, case.error), case.name
        assert re.search(case.reason, letter["message"]), (case.name, letter["message"])
        assert letter["run_id"] == mixed_run["summary"]["run_id"]
        assert ledger[str(case.path)]["state"] == "failed", case.name
    assert set(by_uri) == {str(c.path) for c in cases_with(mixed_run, bm.DEAD)}


def test_links_out_of_the_source_are_never_inputs(mixed_run):
    ledger = ledger_of(mixed_run["work"])
    worklist = (next(mixed_run["work"].glob("runs/*/worklist.jsonl"))).read_text()
    for case in cases_with(mixed_run, bm.NOT_LISTED):
        assert str(case.path) not in ledger, case.name
        assert json.dumps(str(case.path))[1:-1] not in worklist, case.name
    assert "secret.png" not in worklist


def test_no_row_of_a_failed_input_is_in_the_embeddings(mixed_run):
    """Items that failed after decoding some segments (truncated files found out at
    their end) had those segments held back and dropped."""
    ledger = ledger_of(mixed_run["work"])
    rows = read_parquet(mixed_run["work"].glob("embeddings/*/part-*.parquet"))
    assert rows and all(ledger[r["uri"]]["state"] == "indexed" and ledger[r["uri"]]["etag"] == r["etag"]
                        for r in rows)
    assert mixed_run["summary"]["rows_written"] == len(rows)


def test_nothing_outside_the_workdir_changed(mixed_run):
    before, after = mixed_run["before"], mixed_run["after"]
    assert after == before, sorted(set(after.items()) ^ set(before.items()))[:10]
    assert any(p.endswith("blocking.ts") for p in before)  # the FIFO a playlist names is still there, unread


def test_deadletter_command_groups_this_run_by_class(mixed_run):
    result = run_cli("deadletter", "--workdir", str(mixed_run["work"]), "--json", "--examples", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    expected: dict[tuple[str, str], int] = {}
    for case in cases_with(mixed_run, bm.DEAD):
        expected[(case.stage, case.error)] = expected.get((case.stage, case.error), 0) + 1
    assert {(g["stage"], g["error_type"]): g["count"] for g in report["groups"]} == expected
    assert report["total"] == mixed_run["summary"]["failed"]


def test_retrying_the_failures_over_max_error_fraction_exits_3_and_publishes_nothing(mixed_run):
    work = mixed_run["work"]
    latest = (work / "indexes" / "main" / "LATEST").read_text()
    result = run_cli("run", "--source", str(mixed_run["archive"]), "--workdir", str(work),
                     "--config", str(mixed_run["config"]), "--retry-failed", "--max-error-fraction", "0.1")
    assert result.returncode == 3, result.stdout + result.stderr[-3000:]
    failed = len(cases_with(mixed_run, bm.DEAD))
    assert f"not published: {failed}/{failed} items failed" in result.stdout
    assert "failures by stage: decode" in result.stdout and "probe" in result.stdout
    assert (work / "indexes" / "main" / "LATEST").read_text() == latest


def test_a_non_utf8_file_name_does_not_stop_the_run(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    bm.one_track_only(src, tmp_path)
    bm.non_utf8_name(src, tmp_path)
    config = tmp_path / "job.toml"
    config.write_text(job_config(max_error_fraction=0.9))
    result = run_cli("run", "--source", str(src), "--workdir", str(tmp_path / "work"), "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    (summary_path,) = (tmp_path / "work").glob("runs/*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["failed_by_stage"].get("list") == 1
    assert summary["inputs_total"] == summary["indexed"] + summary["unchanged"] + summary["failed"]
    again = run_cli("run", "--source", str(src), "--workdir", str(tmp_path / "work"), "--config", str(config))
    assert again.returncode == 0, again.stderr[-3000:]
