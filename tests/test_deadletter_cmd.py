"""`xmodal-index deadletter`: failures grouped by stage and error class, on workdirs
written here the way runs write them (dead-letter Parquet parts and a ledger)."""

from __future__ import annotations

import datetime
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from xmodal_index.jobs.cli import cli
from xmodal_index.jobs.deadletter_cmd import failure_groups, printable
from xmodal_index.sinks.ledger import LedgerEntry, write_ledger
from xmodal_index.sinks.schema import DEADLETTER_SCHEMA

RUN_1 = "20261101T000000000Z-aaaaaa"
RUN_2 = "20261102T000000000Z-bbbbbb"
AT = datetime.datetime(2026, 11, 1, tzinfo=datetime.timezone.utc)


def letter(uri: str, stage: str, error_type: str, reason: str, run_id: str) -> dict:
    return dict(uri=uri, etag="e-" + uri, stage=stage, error_type=error_type, message=f"{uri}: {reason}",
                run_id=run_id, at=AT)


def write_letters(work, run_id: str, rows: list[dict], part: str = "part-00000-of-00001.parquet") -> None:
    folder = work / "deadletter" / f"run_id={run_id}"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=DEADLETTER_SCHEMA), folder / part)
    (work / "runs" / run_id).mkdir(parents=True, exist_ok=True)


def entry(uri: str, state: str, run_id: str) -> LedgerEntry:
    return LedgerEntry(uri, "e-" + uri, 1, 0.0, state, 0, "model@1", run_id)


@pytest.fixture
def work(tmp_path):
    """Run 1 failed a.mp4, b.mp4 (probe) and c.png (decode); run 2 retried a.mp4 and
    b.mp4: a.mp4 was fixed, b.mp4 failed again; d.wav failed in run 2 with no letter left."""
    work = tmp_path / "work"
    write_letters(work, RUN_1, [letter("/a/a.mp4", "probe", "ProbeError", "empty file (0 bytes)", RUN_1),
                                letter("/a/b.mp4", "probe", "ProbeError", "not a readable media container", RUN_1),
                                letter("/a/c.png", "decode", "DecodeError", "cannot decode image", RUN_1)])
    write_letters(work, RUN_2, [letter("/a/b.mp4", "probe", "ProbeError", "not a readable media container", RUN_2)])
    write_ledger(str(work), RUN_2, [entry("/a/a.mp4", "indexed", RUN_2), entry("/a/b.mp4", "failed", RUN_2),
                                    entry("/a/c.png", "failed", RUN_1), entry("/a/d.wav", "failed", RUN_2),
                                    entry("/a/e.txt", "indexed", RUN_1)])
    return work


def invoke(*args: str):
    return CliRunner().invoke(cli, ["deadletter", *args], catch_exceptions=False)


def groups_of(result) -> dict[tuple[str, str], int]:
    report = json.loads(result.output)
    return {(g["stage"], g["error_type"]): g["count"] for g in report["groups"]}


def test_default_lists_what_the_ledger_says_is_failed_now(work):
    result = invoke("--workdir", str(work), "--json")
    assert result.exit_code == 0, result.output
    assert groups_of(result) == {("probe", "ProbeError"): 1, ("decode", "DecodeError"): 1, ("?", "NoDeadLetter"): 1}
    report = json.loads(result.output)
    assert report["total"] == 3
    (probe,) = [g for g in report["groups"] if g["stage"] == "probe"]
    assert probe["examples"][0]["uri"] == "/a/b.mp4" and probe["examples"][0]["run_id"] == RUN_2


def test_run_shows_the_rows_of_one_run(work):
    result = invoke("--workdir", str(work), "--run", RUN_1, "--json")
    assert groups_of(result) == {("probe", "ProbeError"): 2, ("decode", "DecodeError"): 1}


def test_run_latest_is_the_newest_run_with_dead_letters(work):
    result = invoke("--workdir", str(work), "--run", "latest", "--json")
    assert json.loads(result.output)["scope"] == f"run {RUN_2}"
    assert groups_of(result) == {("probe", "ProbeError"): 1}


def test_all_counts_every_run_once(work):
    result = invoke("--workdir", str(work), "--all", "--json")
    assert groups_of(result) == {("probe", "ProbeError"): 3, ("decode", "DecodeError"): 1}


def test_text_output_shows_groups_largest_first_with_reasons_and_retry_hint(work):
    result = invoke("--workdir", str(work), "--all", "--examples", "1")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0] == f"4 failure(s), all runs, in {work}"
    assert lines[2] == "probe / ProbeError: 3"
    assert lines[3].strip() == "/a/a.mp4" and lines[4].strip() == "empty file (0 bytes)"
    assert "    ... and 2 more" in lines
    assert lines.index("decode / DecodeError: 1") > 2
    assert "--retry-failed" in lines[-1]


def test_control_characters_in_uris_and_messages_are_escaped(tmp_path):
    work = tmp_path / "work"
    evil = "/a/x\x1b[2J\rname\u202e.png"
    write_letters(work, RUN_1, [letter(evil, "probe", "ProbeError", "bad\nline", RUN_1)])
    result = invoke("--workdir", str(work), "--run", RUN_1)
    assert "\x1b" not in result.output and "\r" not in result.output and "\u202e" not in result.output
    assert "/a/x\\x1b[2J\\x0dname\\u202e.png" in result.output and "bad\\x0aline" in result.output


def test_a_workdir_without_failures_says_so(tmp_path):
    work = tmp_path / "work"
    write_ledger(str(work), RUN_1, [entry("/a/e.txt", "indexed", RUN_1)])
    result = invoke("--workdir", str(work))
    assert result.exit_code == 0
    assert result.output.startswith("no failures")


def test_missing_workdir_and_unknown_run_are_errors(tmp_path, work):
    missing = invoke("--workdir", str(tmp_path / "nowhere"))
    assert missing.exit_code == 1 and "no workdir" in missing.output
    unknown = invoke("--workdir", str(work), "--run", "20990101T000000000Z-ffffff")
    assert unknown.exit_code == 1 and "no run" in unknown.output


def test_run_and_all_exclude_each_other(work):
    result = invoke("--workdir", str(work), "--run", RUN_1, "--all")
    assert result.exit_code == 2 and "exclude each other" in result.output


def test_beam_temporary_folders_are_not_read(work):
    temp = work / "deadletter" / f"run_id={RUN_1}" / "beam-temp-part-123"
    temp.mkdir()
    (temp / "part-00000-of-00001.parquet").write_bytes(b"half-written")
    result = invoke("--workdir", str(work), "--run", RUN_1, "--json")
    assert json.loads(result.output)["total"] == 3


def test_failure_groups_keep_examples_in_uri_order_and_cut_to_the_count():
    rows = [letter(f"/m/{n}.mp4", "probe", "ProbeError", "x", RUN_1) for n in "dcba"]
    (group,) = failure_groups(rows, examples=2)
    assert group.count == 4 and [r["uri"] for r in group.examples] == ["/m/a.mp4", "/m/b.mp4"]


def test_printable_leaves_ordinary_text_alone():
    assert printable("café – 東京.mp4") == "café – 東京.mp4"


@pytest.mark.parametrize("spelling", ["relative", "file"])
@pytest.mark.parametrize("scope", [[], ["--run", "latest"], ["--all"]])
def test_relative_and_file_uri_workdirs_list_the_same_failures(work, monkeypatch, spelling, scope):
    expected = groups_of(invoke("--workdir", str(work), "--json", *scope))
    monkeypatch.chdir(work.parent)
    workdir = "work" if spelling == "relative" else f"file://{work}"
    result = invoke("--workdir", workdir, "--json", *scope)
    assert groups_of(result) == expected
    assert sum(expected.values()) >= 1  # the absolute spelling finds failures in every scope
