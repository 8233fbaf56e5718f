"""The workdir layout (sinks/workdir.py), its one index-root resolver, part listings and dead letters."""

import os

import pytest

from xmodal_index.sinks import storage
from xmodal_index.sinks.deadletters import read_deadletters, run_ids_with_dead_letters, write_deadletters
from xmodal_index.sinks.parts import list_parts
from xmodal_index.sinks.workdir import Workdir, WorkdirLayoutError, resolve_index_root


def test_the_layout_of_spec_4_2(tmp_path):
    wd = Workdir(str(tmp_path))
    root = str(tmp_path)
    assert wd.embeddings("r1") == f"{root}/embeddings/run_id=r1"
    assert wd.deadletter("r1") == f"{root}/deadletter/run_id=r1"
    assert wd.run_dir("r1") == f"{root}/runs/r1"
    assert wd.summary("r1") == f"{root}/runs/r1/summary.json"
    assert wd.ledger == f"{root}/ledger"
    assert wd.lease == f"{root}/LEASE"
    assert wd.index_root("main") == f"{root}/indexes/main"


def test_relative_and_file_uris_become_the_absolute_path_listings_return(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    absolute = Workdir(str(tmp_path / "work"))
    assert Workdir("work") == absolute
    assert Workdir("file://" + str(tmp_path / "work") + "/") == absolute
    assert Workdir("s3://bucket/work/").uri == "s3://bucket/work"


@pytest.mark.parametrize("bad", ["", "a/b", "..", ".", "x\\y"])
def test_a_run_id_or_index_name_must_be_one_plain_name(tmp_path, bad):
    wd = Workdir(str(tmp_path))
    with pytest.raises(WorkdirLayoutError, match="run id"):
        wd.run_dir(bad)
    with pytest.raises(WorkdirLayoutError, match="index name"):
        wd.index_root(bad)


def test_the_workdir_of_an_index_root(tmp_path):
    assert Workdir.of_index_root(str(tmp_path / "w" / "indexes" / "main")) == Workdir(str(tmp_path / "w"))
    assert Workdir.of_index_root("s3://b/w/indexes/main") == Workdir("s3://b/w")
    assert Workdir.of_index_root(str(tmp_path / "some-index")) is None


def test_the_resolver_takes_an_index_root_or_a_workdir(tmp_path, monkeypatch):
    work = tmp_path / "work"
    index = work / "indexes" / "main"
    (index / "v000001").mkdir(parents=True)
    (index / "v000001" / "manifest.json").write_text("{}")
    # a workdir whose index has versions but nothing published yet: its index root
    assert resolve_index_root(str(work)) == str(index)
    (index / "LATEST").write_text("v000001\n")
    assert resolve_index_root(str(work)) == str(index)
    assert resolve_index_root(str(index)) == str(index)
    monkeypatch.chdir(tmp_path)
    assert resolve_index_root("work") == str(index)  # relative: the absolute spelling
    assert resolve_index_root(str(tmp_path / "empty")) == str(tmp_path / "empty")  # nothing there: as given
    with pytest.raises(WorkdirLayoutError, match="index name"):
        resolve_index_root(str(work), "../other")


def test_part_listings_skip_temporary_folders_even_under_a_relative_prefix(tmp_path, monkeypatch):
    folder = tmp_path / "work" / "embeddings" / "run_id=r1"
    (folder / "beam-temp-part-123").mkdir(parents=True)
    (folder / "beam-temp-part-123" / "part-00000-of-00001.parquet").write_bytes(b"half")
    (folder / "part-00000-of-00001.parquet").write_bytes(b"done")
    (folder / ".tmp-part-00001.parquet").write_bytes(b"writing")
    monkeypatch.chdir(tmp_path)
    parts = list_parts("work/embeddings/run_id=r1", ".parquet")
    assert [os.path.relpath(p, tmp_path) for p in parts] == ["work/embeddings/run_id=r1/part-00000-of-00001.parquet"]
    assert list_parts("work/embeddings/run_id=missing", ".parquet") == []


def test_dead_letters_written_by_the_job_are_read_back_with_their_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_deadletters("work", "r2", "lost", [dict(uri="/a.mp4", etag="e1", stage="pipeline",
                                                  error_type="NoOutcome", message="no outcome")])
    write_deadletters(str(tmp_path / "work"), "r1", "names", [dict(uri="/b.mp4", etag="e2", stage="list",
                                                                   error_type="BadName", message="bad")])
    assert run_ids_with_dead_letters("work") == ["r1", "r2"]  # relative workdir: the same runs as absolute
    (row,) = read_deadletters("file://" + str(tmp_path / "work"), "r2")
    assert (row["uri"], row["stage"], row["error_type"], row["run_id"]) == ("/a.mp4", "pipeline", "NoOutcome", "r2")
    assert row["at"] is not None
    assert read_deadletters("work", "r3") == []


def test_dead_letters_on_s3(s3_bucket):
    work = s3_bucket + "/work/"
    write_deadletters(work, "r1", "lost", [dict(uri="s3://src/a.mp4", etag="e", stage="decode",
                                                error_type="DecodeError", message="broken")])
    assert storage.exists(s3_bucket + "/work/deadletter/run_id=r1/part-lost.parquet")
    assert run_ids_with_dead_letters(work) == ["r1"]
    assert [r["error_type"] for r in read_deadletters(work, "r1")] == ["DecodeError"]
