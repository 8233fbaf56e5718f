from xmodal_index.pipeline.listing import SourceConfig, list_items, plan_items
from xmodal_index.sinks.storage import ObjectInfo

import pytest


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
