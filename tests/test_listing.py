import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.media_factory import make_png
from tests.run_helpers import invoke, run_args, write_config
from xmodal_index.jobs.run_plan import list_selection
from xmodal_index.pipeline.listing import LINK_BROKEN, LINK_OUTSIDE, SourceConfig, list_items, plan_items, refused_links
from xmodal_index.sinks import storage
from xmodal_index.sinks.storage import ObjectInfo


def _obj(uri, etag="e"):
    return ObjectInfo(uri=uri, size=10, mtime=1.0, etag=etag)


def test_caption_with_same_stem_becomes_sidecar_of_its_video():
    items = plan_items([_obj("/a/clip.mp4"), _obj("/a/clip.vtt"), _obj("/a/other.vtt")])
    by_uri = {i.uri: i for i in items}
    assert set(by_uri) == {"/a/clip.mp4", "/a/other.vtt"}
    assert by_uri["/a/clip.mp4"].sidecars == ("/a/clip.vtt",)
    assert by_uri["/a/other.vtt"].kind == "text"


def test_changed_sidecar_changes_the_item_etag():
    a = plan_items([_obj("/a/clip.mp4"), _obj("/a/clip.vtt", "1")])[0]
    b = plan_items([_obj("/a/clip.mp4"), _obj("/a/clip.vtt", "2")])[0]
    assert a.etag != b.etag


def test_unknown_extensions_are_not_items():
    items = plan_items([_obj("/a/notes.json"), _obj("/a/x.png")])
    assert [i.uri for i in items] == ["/a/x.png"]


def test_list_items_applies_globs(tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "a.mp4").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    items = list_items(str(tmp_path), SourceConfig(include=("v/*",)))
    assert [i.uri.rsplit("/", 1)[1] for i in items] == ["a.mp4"]


def test_source_config_refuses_a_bare_string():
    with pytest.raises(ValueError, match="include"):
        SourceConfig(include="*.mp4")


def _links_archive(tmp_path):
    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "sub").mkdir(parents=True)
    outside.mkdir()
    make_png(src / "sub" / "inside.png")
    make_png(outside / "secret.png")
    (src / "to_inside.png").symlink_to("sub/inside.png")
    (src / "to_outside.png").symlink_to(outside / "secret.png")
    (src / "to_outside_relative.png").symlink_to("../outside/secret.png")
    (src / "dangling.png").symlink_to(src / "missing.png")
    (src / "loop.png").symlink_to("loop.png")
    (src / "notes.bin").symlink_to(outside / "secret.png")  # not a media name: not an input at all
    (src / "linked_dir").symlink_to(outside, target_is_directory=True)
    return src


def test_refused_links_names_links_the_listing_does_not_follow(tmp_path):
    src = _links_archive(tmp_path)
    refused = {Path(link.info.uri).name: link.error_type for link in refused_links(str(src))}
    assert refused == {"to_outside.png": LINK_OUTSIDE, "to_outside_relative.png": LINK_OUTSIDE,
                       "dangling.png": LINK_BROKEN, "loop.png": LINK_BROKEN}
    listed = {Path(o.uri).name for o in storage.list_objects(str(src))}
    assert not listed & set(refused) and "to_inside.png" in listed


def test_a_runs_listing_holds_refused_links_as_items_refused_at_stage_list(tmp_path):
    src = _links_archive(tmp_path)
    listing = list_selection(str(src))
    names = {Path(i.uri).name for i in listing.items}
    assert {"to_outside.png", "dangling.png", "inside.png", "to_inside.png"} <= names
    refused = {Path(uri).name: error for uri, (error, _reason) in listing.refused.items()}
    assert refused["to_outside.png"] == LINK_OUTSIDE and refused["loop.png"] == LINK_BROKEN
    assert "inside.png" not in refused and "to_inside.png" not in refused


def test_a_run_dead_letters_links_out_of_the_source_at_stage_list(tmp_path):
    src = _links_archive(tmp_path)
    for k in range(6):  # good inputs, so that the failures stay under max_error_fraction
        make_png(src / "sub" / f"good{k}.png", color=(10 * k, 20, 30))
    result = invoke(*run_args(src, tmp_path / "work", write_config(tmp_path)))
    assert result.exit_code == 0, result.output
    summary = json.loads(next((tmp_path / "work" / "runs").glob("*/summary.json")).read_text())
    assert summary["failed_by_stage"] == {"list": 4}
    assert summary["inputs_total"] == summary["indexed"] + summary["unchanged"] + summary["failed"]
    letters = {Path(r["uri"]).name: r for part in (tmp_path / "work" / "deadletter").rglob("part-*.parquet")
               for r in pq.read_table(part).to_pylist()}
    assert set(letters) == {"to_outside.png", "to_outside_relative.png", "dangling.png", "loop.png"}
    assert letters["to_outside.png"]["error_type"] == LINK_OUTSIDE
    assert "outside the source root" in letters["to_outside.png"]["message"]
    assert "secret" not in (tmp_path / "work").joinpath("runs").rglob("worklist.jsonl").__next__().read_text()
    rerun = invoke(*run_args(src, tmp_path / "work", write_config(tmp_path)))  # unchanged links are not redone
    assert rerun.exit_code == 0 and "0 to process" in rerun.stderr, rerun.stderr
