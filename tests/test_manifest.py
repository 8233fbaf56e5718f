"""Manifest JSON, version names, checksums and the LATEST pointer."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.latest_file import write_latest_unchecked
from xmodal_index.sinks.errors import IndexVersionError
from xmodal_index.sinks.index import manifest as mf


def _manifest(version: str = "v000002", parent: str | None = "v000001") -> mf.Manifest:
    return mf.Manifest(
        version=version,
        created_at="2026-01-02T03:04:05Z",
        parent_version=parent,
        model_id="tiny@abc",
        dim=8,
        bits=16,
        metric="ip",
        index_factory={"float": "Flat", "binary": "BFlat"},
        shards=(
            mf.ShardEntry("shard-text-00000-of-00001.float.faiss", "a" * 64, 10, 3, "text", "float",
                          "shard-text-00000-of-00001.ids.parquet", "Flat", {}, 1.0),
            mf.ShardEntry("shard-text-00000-of-00001.binary.faiss", "b" * 64, 11, 3, "text", "binary",
                          "shard-text-00000-of-00001.ids.parquet", "BIVF4", {"nprobe": 2}, 0.9),
        ),
        id_maps=(mf.FileEntry("shard-text-00000-of-00001.ids.parquet", "c" * 64, 12),),
        files=(mf.FileEntry("model.safetensors", "d" * 64, 13),),
        ntotal=3,
        metrics={"recall_at_10": {"float": 1.0, "binary": 0.9}, "map_t2i_64": 0.5},
        search_params={"nprobe": 2},
    )


def test_manifest_round_trips_through_json():
    original = _manifest()
    assert mf.Manifest.from_json(original.to_json()) == original


def test_manifest_json_has_the_spec_fields():
    data = json.loads(_manifest().to_json())
    for key in ("version", "created_at", "parent_version", "model_id", "dim", "bits", "metric",
                "index_factory", "shards", "id_maps", "ntotal", "metrics", "search_params"):
        assert key in data
    assert set(data["shards"][0]) >= {"file", "sha256", "bytes", "ntotal", "modality", "kind", "id_map"}
    assert data["index_factory"] == {"float": "Flat", "binary": "BFlat"}


def test_unknown_manifest_keys_survive_a_rewrite():
    data = json.loads(_manifest().to_json())
    data["written_by_a_newer_release"] = {"x": 1}
    again = json.loads(mf.Manifest.from_dict(data).to_json())
    assert again["written_by_a_newer_release"] == {"x": 1}


def test_manifest_missing_a_field_is_rejected_by_name():
    data = json.loads(_manifest().to_json())
    del data["shards"]
    with pytest.raises(IndexVersionError, match="shards"):
        mf.Manifest.from_dict(data)


def test_manifest_that_is_not_json_is_rejected():
    with pytest.raises(IndexVersionError, match="not valid JSON"):
        mf.Manifest.from_json("{not json", source="x/manifest.json")


def test_all_files_lists_shards_id_maps_and_extra_files():
    names = [f.file for f in _manifest().all_files()]
    assert names == [
        "shard-text-00000-of-00001.float.faiss",
        "shard-text-00000-of-00001.binary.faiss",
        "shard-text-00000-of-00001.ids.parquet",
        "model.safetensors",
    ]


def test_version_names_are_six_digit_and_parse_back():
    assert mf.version_name(1) == "v000001"
    assert mf.version_number("v000123") == 123


@pytest.mark.parametrize("bad", ["000001", "v1", "latest", "v00000a", ""])
def test_malformed_version_names_are_rejected(bad):
    with pytest.raises(IndexVersionError):
        mf.version_number(bad)


def test_read_latest_is_none_before_any_publish(tmp_path):
    assert mf.read_latest(str(tmp_path / "indexes" / "main")) is None


def test_write_latest_then_read_latest(tmp_path):
    root = str(tmp_path / "idx")
    mf.write_manifest(root, _manifest("v000007", None))
    write_latest_unchecked(root, "v000007")
    digest = hashlib.sha256((tmp_path / "idx" / "v000007" / "manifest.json").read_bytes()).hexdigest()
    assert (tmp_path / "idx" / "LATEST").read_text() == f"v000007 sha256:{digest}\n"
    assert mf.read_latest(root) == "v000007"


def test_garbage_in_latest_is_an_error(tmp_path):
    (tmp_path / "LATEST").write_text("yesterday\n")
    with pytest.raises(IndexVersionError):
        mf.read_latest(str(tmp_path))


def test_list_versions_skips_directories_without_a_manifest(tmp_path):
    root = str(tmp_path)
    mf.write_manifest(root, _manifest("v000001", None))
    mf.write_manifest(root, _manifest("v000003", "v000001"))
    (tmp_path / "v000004").mkdir()
    (tmp_path / "v000004" / "shard-x.float.faiss").write_bytes(b"half written")
    assert mf.list_versions(root) == ["v000001", "v000003"]


def test_next_version_never_reuses_an_interrupted_version_number(tmp_path):
    root = str(tmp_path)
    mf.write_manifest(root, _manifest("v000001", None))
    (tmp_path / "v000002").mkdir()
    (tmp_path / "v000002" / "shard-x.float.faiss").write_bytes(b"half written")
    assert mf.next_version(root) == "v000003"


def test_next_version_of_an_empty_root_is_the_first(tmp_path):
    assert mf.next_version(str(tmp_path / "nothing-yet")) == "v000001"


def test_read_manifest_of_a_missing_version_names_it(tmp_path):
    with pytest.raises(IndexVersionError, match="v000009"):
        mf.read_manifest(str(tmp_path), "v000009")


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "blob"
    data = bytes(range(256)) * 5000
    path.write_bytes(data)
    assert mf.sha256_file(str(path), chunk_bytes=4096) == hashlib.sha256(data).hexdigest()
    assert mf.sha256_bytes(data) == hashlib.sha256(data).hexdigest()


def test_shard_kind_must_be_float_or_binary():
    with pytest.raises(IndexVersionError, match="kind"):
        mf.ShardEntry("f", "a" * 64, 1, 1, "text", "dense", "ids")
