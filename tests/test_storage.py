"""The storage API on local paths and file:// URIs."""

from __future__ import annotations

import os

import pytest

from xmodal_index.sinks import storage
from xmodal_index.sinks.errors import ObjectNotFoundError, StorageError


def _make_tree(root, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _rels(root, infos) -> list[str]:
    return [os.path.relpath(i.uri, root) for i in infos]


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "archive"
    _make_tree(
        root,
        {
            "a.mp4": b"video",
            "b.wav": b"audio",
            "clips/c.mp4": b"clip",
            "clips/c.vtt": b"WEBVTT",
            "clips/raw/d.mp4": b"raw",
            "z.jpg": b"image",
        },
    )
    return root


def test_listing_returns_every_file_sorted_by_relative_path(tree):
    assert _rels(tree, storage.list_objects(str(tree))) == [
        "a.mp4",
        "b.wav",
        "clips/c.mp4",
        "clips/c.vtt",
        "clips/raw/d.mp4",
        "z.jpg",
    ]


def test_listing_reports_size_mtime_and_a_fingerprint(tree):
    info = next(i for i in storage.list_objects(str(tree)) if i.uri.endswith("b.wav"))
    st = os.stat(tree / "b.wav")
    assert (info.size, info.mtime) == (5, st.st_mtime)
    assert info.etag


def test_fingerprint_changes_when_a_file_is_rewritten(tree):
    before = storage.stat(str(tree / "a.mp4")).etag
    (tree / "a.mp4").write_bytes(b"another video")
    assert storage.stat(str(tree / "a.mp4")).etag != before


def test_include_globs_select_by_relative_path(tree):
    infos = storage.list_objects(str(tree), include=("*.mp4",))
    assert _rels(tree, infos) == ["a.mp4", "clips/c.mp4", "clips/raw/d.mp4"]


def test_exclude_globs_drop_matches_after_include(tree):
    infos = storage.list_objects(str(tree), include=("*.mp4", "*.jpg"), exclude=("clips/raw/*",))
    assert _rels(tree, infos) == ["a.mp4", "clips/c.mp4", "z.jpg"]


def test_file_uri_prefix_lists_like_a_path(tree):
    assert _rels(tree, storage.list_objects("file://" + str(tree))) == _rels(tree, storage.list_objects(str(tree)))


def test_listing_a_missing_directory_names_it(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ObjectNotFoundError, match="nowhere"):
        list(storage.list_objects(missing))


def test_symlink_to_a_file_outside_the_root_is_not_listed(tree, tmp_path):
    secret = tmp_path / "outside" / "secret.mp4"
    secret.parent.mkdir()
    secret.write_bytes(b"not part of the archive")
    os.symlink(secret, tree / "leak.mp4")
    assert "leak.mp4" not in _rels(tree, storage.list_objects(str(tree)))


def test_symlinked_directory_outside_the_root_is_not_descended(tree, tmp_path):
    outside = tmp_path / "elsewhere"
    _make_tree(outside, {"x.mp4": b"x"})
    os.symlink(outside, tree / "linked", target_is_directory=True)
    assert not any(r.startswith("linked") for r in _rels(tree, storage.list_objects(str(tree))))


def test_symlink_to_a_file_inside_the_root_is_listed_under_its_own_name(tree):
    os.symlink(tree / "clips" / "c.mp4", tree / "alias.mp4")
    assert "alias.mp4" in _rels(tree, storage.list_objects(str(tree)))


def test_dangling_symlink_is_skipped(tree):
    os.symlink(tree / "gone.mp4", tree / "dangling.mp4")
    assert "dangling.mp4" not in _rels(tree, storage.list_objects(str(tree)))


def test_write_bytes_creates_parents_and_reads_back(tmp_path):
    uri = str(tmp_path / "deep" / "dir" / "obj.bin")
    storage.write_bytes(uri, b"payload")
    assert storage.read_bytes(uri) == b"payload"


def test_write_bytes_leaves_no_temporary_files(tmp_path):
    storage.write_bytes(str(tmp_path / "obj.bin"), b"one")
    storage.write_bytes(str(tmp_path / "obj.bin"), b"two")
    assert os.listdir(tmp_path) == ["obj.bin"]


def test_failed_write_keeps_the_previous_content(tmp_path, monkeypatch):
    uri = str(tmp_path / "LATEST")
    storage.write_bytes(uri, b"v000001")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StorageError, match="LATEST"):
        storage.write_bytes(uri, b"v000002")
    monkeypatch.undo()
    assert storage.read_bytes(uri) == b"v000001"
    assert os.listdir(tmp_path) == ["LATEST"]


def test_read_of_a_missing_file_names_the_path(tmp_path):
    missing = str(tmp_path / "missing.bin")
    with pytest.raises(ObjectNotFoundError, match="missing.bin"):
        storage.read_bytes(missing)


def test_open_read_of_a_missing_file_names_the_path(tmp_path):
    with pytest.raises(ObjectNotFoundError, match="missing.bin"):
        with storage.open_read(str(tmp_path / "missing.bin")):
            pass


def test_open_read_streams_and_seeks(tmp_path):
    uri = str(tmp_path / "obj.bin")
    storage.write_bytes(uri, bytes(range(256)))
    with storage.open_read(uri) as f:
        f.seek(250)
        assert f.read() == bytes(range(250, 256))


def test_local_path_yields_the_file_itself(tmp_path):
    uri = str(tmp_path / "clip.mp4")
    storage.write_bytes(uri, b"data")
    with storage.local_path("file://" + uri) as path:
        assert os.path.samefile(path, uri)
    assert os.path.exists(uri)


def test_local_path_of_a_missing_file_names_it(tmp_path):
    with pytest.raises(ObjectNotFoundError, match="nothing-here.mp4"):
        with storage.local_path(str(tmp_path / "nothing-here.mp4")):
            pass


def test_put_file_copies_and_creates_parents(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"shard bytes")
    dest = str(tmp_path / "out" / "v000001" / "shard.faiss")
    storage.put_file(str(src), dest)
    assert storage.read_bytes(dest) == b"shard bytes"


def test_put_file_of_a_missing_source_names_it(tmp_path):
    with pytest.raises(ObjectNotFoundError, match="no-such-source"):
        storage.put_file(str(tmp_path / "no-such-source"), str(tmp_path / "dest"))


def test_exists_and_delete(tmp_path):
    uri = str(tmp_path / "obj.bin")
    storage.write_bytes(uri, b"x")
    assert storage.exists(uri)
    storage.delete(uri)
    assert not storage.exists(uri)
    storage.delete(uri)  # deleting twice is fine


def test_stat_of_a_missing_file_names_it(tmp_path):
    with pytest.raises(ObjectNotFoundError, match="ghost"):
        storage.stat(str(tmp_path / "ghost"))


def test_join_builds_uris_with_single_slashes():
    assert storage.join("s3://bucket/", "/indexes/", "name") == "s3://bucket/indexes/name"
    assert storage.join("/data/work", "runs", "r1/summary.json") == "/data/work/runs/r1/summary.json"


def test_unknown_scheme_is_rejected_with_the_uri():
    with pytest.raises(StorageError, match="gs://bucket/key"):
        storage.read_bytes("gs://bucket/key")
