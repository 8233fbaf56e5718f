from xmodal_index.jobs.run_job import plan_work
from xmodal_index.pipeline.types import MediaItem
from xmodal_index.sinks.ledger import LedgerEntry, read_ledger, write_ledger


def _item(uri, etag="e1"):
    return MediaItem(uri=uri, kind="image", size=1, mtime=1.0, etag=etag)


def _entry(uri, etag="e1", state="indexed", model="m@1"):
    return LedgerEntry(uri, etag, 1, 1.0, state, 1, model, "r0")


def test_new_changed_and_deleted_objects_are_planned():
    ledger = {"a": _entry("a"), "b": _entry("b"), "gone": _entry("gone")}
    todo, unchanged, deleted = plan_work([_item("a"), _item("b", "e2"), _item("c")], ledger, "m@1", False, False)
    assert sorted(i.uri for i in todo) == ["b", "c"]
    assert [e.uri for e in unchanged] == ["a"]
    assert [(e.uri, e.state) for e in deleted] == [("gone", "deleted")]


def test_model_change_reprocesses_everything():
    todo, unchanged, _ = plan_work([_item("a")], {"a": _entry("a")}, "m@2", False, False)
    assert [i.uri for i in todo] == ["a"] and unchanged == []


def test_failed_items_are_retried_only_when_asked():
    ledger = {"a": _entry("a", state="failed")}
    assert plan_work([_item("a")], ledger, "m@1", False, False)[0] == []
    assert [i.uri for i in plan_work([_item("a")], ledger, "m@1", False, True)[0]] == ["a"]


def test_full_reprocesses_unchanged_items():
    todo, unchanged, _ = plan_work([_item("a")], {"a": _entry("a")}, "m@1", True, False)
    assert [i.uri for i in todo] == ["a"] and unchanged == []


def test_ledger_round_trips_and_commits_last(tmp_path):
    assert read_ledger(str(tmp_path)) == {}
    write_ledger(str(tmp_path), "r1", [_entry("a"), _entry("b", state="failed")])
    got = read_ledger(str(tmp_path))
    assert got["b"].state == "failed" and got["a"] == _entry("a")
    assert (tmp_path / "ledger" / "CURRENT").read_text().strip() == "ledger-r1.parquet"


def test_only_entries_in_scope_can_be_marked_deleted():
    ledger = {"s3://b/a/x": _entry("s3://b/a/x"), "s3://b/other/y": _entry("s3://b/other/y")}
    _, _, deleted = plan_work([], ledger, "m@1", False, False, in_scope=lambda uri: uri.startswith("s3://b/a/"))
    assert [e.uri for e in deleted] == ["s3://b/a/x"]


def test_listed_objects_outside_the_time_range_are_not_deleted():
    ledger = {"a": _entry("a"), "b": _entry("b")}
    todo, unchanged, deleted = plan_work([_item("a", "e2")], ledger, "m@1", False, False, listed={"a", "b"})
    assert [i.uri for i in todo] == ["a"] and unchanged == [] and deleted == []


def test_a_deleted_object_that_comes_back_is_processed_again():
    todo, unchanged, deleted = plan_work([_item("a")], {"a": _entry("a", state="deleted")}, "m@1", False, False)
    assert [i.uri for i in todo] == ["a"] and unchanged == [] and deleted == []


def test_a_size_change_alone_reprocesses_the_object():
    item = MediaItem(uri="a", kind="image", size=2, mtime=1.0, etag="e1")
    todo, unchanged, _ = plan_work([item], {"a": _entry("a")}, "m@1", False, False)
    assert [i.uri for i in todo] == ["a"] and unchanged == []
