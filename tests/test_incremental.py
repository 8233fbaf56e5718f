"""Incremental versions: delta shards on the parent's trained indexes, tombstones,
files referenced by origin, and query nodes that fetch only what a version adds."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from xmodal_index.sinks import storage
from xmodal_index.sinks.embeddings_io import rows_batch
from xmodal_index.sinks.errors import ChecksumMismatchError, IndexVersionError
from xmodal_index.sinks.index import manifest as mf
from xmodal_index.sinks.index.build import IndexBuildConfig, build_version
from xmodal_index.sinks.index.incremental import IncrementalError, build_increment
from xmodal_index.sinks.serving import cache
from xmodal_index.sinks.serving.loader import IndexVersion

DIM, BITS, MODEL = 16, 32, "tiny@feedbeef"
PROJ = np.random.default_rng(99).standard_normal((DIM, BITS))


def rows(start: int, n: int, *, seed: int, modality: str = "video", model: str = MODEL):
    """(batch, ids, vectors) of ``n`` rows with segment ids start .. start + n - 1."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    codes = np.packbits((x @ PROJ > 0).astype(np.uint8), axis=1)
    ids = np.arange(start, start + n, dtype=np.int64)
    uris = [f"s3://a/{i}.mp4" for i in ids]
    batch = rows_batch(ids, uris, ["e"] * n, [modality] * n, [0.0] * n, [1.0] * n, x, codes, model_id=model,
                       run_id="r")
    return batch, ids, x


def full(root, batches, factory="Flat", binary="BFlat"):
    config = IndexBuildConfig(float_factory=factory, binary_factory=binary, recall_sample=20, nprobe=64)
    return build_version(lambda: iter(batches), str(root), model_id=MODEL, dim=DIM, bits=BITS, config=config,
                         publish=False)


@pytest.fixture
def base(tmp_path):
    root = tmp_path / "idx"
    batch, ids, x = rows(0, 400, seed=1)
    full(root, [batch], "IVF8,Flat", "BIVF4")
    return root, batch, ids, x


def top_ids(version: IndexVersion, queries: np.ndarray, k: int = 10) -> list[list[int]]:
    return [[h.segment_id for h in hits] for hits in version.search(queries, k)]


def test_an_increment_lists_the_parents_files_by_origin_and_stores_only_what_it_adds(base):
    root, *_ = base
    batch, _, _ = rows(1000, 30, seed=2)
    manifest = build_increment(str(root), "v000001", [batch], deleted_ids=[3, 5])
    assert manifest.version == "v000002" and manifest.parent_version == "v000001"
    parent = mf.read_manifest(str(root), "v000001")
    assert {s.file for s in manifest.shards if s.origin == "v000001"} == {s.file for s in parent.shards}
    added = {f.file for f in manifest.all_files() if not f.origin}
    assert added == {"delta-v000002-video.float.faiss", "delta-v000002-video.binary.faiss",
                     "delta-v000002-video.ids.parquet", "delta-v000002-video.vectors.npy", "tombstones-v000002.npy"}
    assert set(os.listdir(root / "v000002")) == added | {"manifest.json", "SEAL"}
    assert manifest.ntotal == 400 + 30 - 2
    assert manifest.extra["base_version"] == "v000001" and manifest.extra["delta_count"] == 1
    assert np.load(root / "v000002" / "tombstones-v000002.npy").tolist() == [3, 5]


def test_increments_search_like_a_full_build_of_the_live_rows(base, tmp_path):
    root, batch, ids, x = base
    new1, _, x1 = rows(1000, 60, seed=2)
    new2, _, x2 = rows(2000, 40, seed=3)
    build_increment(str(root), "v000001", [new1], deleted_ids=ids[:25])
    build_increment(str(root), "v000002", [new2], deleted_ids=np.r_[ids[100:110], [1005, 1006]])
    dead = set(ids[:25].tolist()) | set(ids[100:110].tolist()) | {1005, 1006}
    batches = [b.filter(np.array([i not in dead for i in b.column("segment_id").to_pylist()]))
               for b in (batch, new1, new2)]
    reference = full(tmp_path / "ref", batches, "IVF8,Flat", "BIVF4")
    queries = np.vstack([x[:30], x1[:10], x2[:10]])
    with IndexVersion.open(str(root), "v000003") as inc, IndexVersion.open(str(tmp_path / "ref"),
                                                                          reference.version) as ref:
        assert inc.manifest.ntotal == ref.manifest.ntotal == 400 + 100 - len(dead)
        assert top_ids(inc, queries) == top_ids(ref, queries)


@pytest.mark.parametrize("factory, selector", [("IVF8,Flat", True), ("Flat", True), ("HNSW16", False)])
def test_deleted_rows_are_never_returned_and_k_results_still_come_back(tmp_path, factory, selector):
    root = tmp_path / "idx"
    batch, ids, x = rows(0, 400, seed=1)
    full(root, [batch], factory, "BIVF4")
    build_increment(str(root), "v000001", [], deleted_ids=ids[:200])
    with IndexVersion.open(str(root), "v000002") as version:
        shard = next(s for s in version._shards if s.entry.kind == "float")
        assert (version._tombstones.search_params(shard.index, shard.entry.id_map) is not None) == selector
        for hits in version.search(x[:20], 10):  # each query is a deleted row's own vector
            assert len(hits) == 10
            assert not {h.segment_id for h in hits} & set(ids[:200].tolist())
        codes = np.packbits((x[:5] @ PROJ > 0).astype(np.uint8), axis=1)
        for hits in version.search_codes(codes, 10) + version.search(x[:5], 10, mode="two_stage", codes=codes):
            assert len(hits) == 10 and min(h.segment_id for h in hits) >= 200


def test_a_row_the_parent_holds_is_not_added_twice_and_a_deleted_one_comes_back(base):
    root, batch, ids, x = base
    build_increment(str(root), "v000001", [], deleted_ids=[7])
    again = build_increment(str(root), "v000002", [batch.slice(0, 10)])  # ids 0..9, 7 among them
    assert again.ntotal == 400 and again.tombstones is None
    assert not any(s.file.startswith("delta-") for s in again.shards)
    with IndexVersion.open(str(root), "v000003") as version:
        assert version.search(x[7:8], 1)[0][0].segment_id == 7


def test_rows_of_another_model_or_a_new_modality_need_a_full_build(base):
    root, *_ = base
    with pytest.raises(IncrementalError, match="model"):
        build_increment(str(root), "v000001", [rows(1000, 5, seed=2, model="other@beef")[0]])
    with pytest.raises(IncrementalError, match="modality 'audio'"):
        build_increment(str(root), "v000001", [rows(1000, 5, seed=2, modality="audio")[0]])


@pytest.mark.parametrize("name", ["delta-v000002-video.float.faiss", "tombstones-v000002.npy"])
def test_a_tampered_delta_or_tombstone_file_is_refused(base, tmp_path, name):
    root, *_ = base
    build_increment(str(root), "v000001", [rows(1000, 30, seed=2)[0]], deleted_ids=[1, 2])
    path = root / "v000002" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=name):
        IndexVersion.open(str(root), "v000002")
    with pytest.raises(ChecksumMismatchError, match=name):
        IndexVersion.open(str(root), "v000002", cache_dir=str(tmp_path / "cache"))


def test_a_tampered_parent_file_is_refused_through_the_increment(base, tmp_path):
    root, *_ = base
    build_increment(str(root), "v000001", [rows(1000, 30, seed=2)[0]])
    shard = next(s for s in mf.read_manifest(str(root), "v000001").shards if s.kind == "binary")
    path = root / "v000001" / shard.file
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=shard.file):
        IndexVersion.open(str(root), "v000002", cache_dir=str(tmp_path / "cache"))


def _manifest_json(root, version) -> dict:
    return json.loads((root / version / "manifest.json").read_bytes())


def test_the_schema_refuses_a_bad_origin_or_tombstone_count(base):
    root, *_ = base
    build_increment(str(root), "v000001", [rows(1000, 30, seed=2)[0]], deleted_ids=[1, 2])
    data = _manifest_json(root, "v000002")
    mf.Manifest.from_dict(data)
    for origin in ("v000002", "v000009", "../v000001", 1):
        bad = json.loads(json.dumps(data))
        bad["shards"][0]["origin"] = origin
        with pytest.raises(IndexVersionError, match=r"shards\[0\]\.origin"):
            mf.Manifest.from_dict(bad)
    bad = json.loads(json.dumps(data))
    bad["tombstones"]["count"] = 3
    with pytest.raises(IndexVersionError, match="less 3 tombstones"):
        mf.Manifest.from_dict(bad)
    bad = json.loads(json.dumps(data))
    bad["tombstones"]["file"] = "../x.npy"
    with pytest.raises(IndexVersionError, match="tombstones.file"):
        mf.Manifest.from_dict(bad)
    bad = json.loads(json.dumps(data))
    bad["delta_count"] = -1
    with pytest.raises(IndexVersionError, match="delta_count"):
        mf.Manifest.from_dict(bad)


def test_a_node_downloads_only_the_files_an_increment_adds(base, tmp_path, monkeypatch):
    root, *_ = base
    manifest = build_increment(str(root), "v000001", [rows(1000, 30, seed=2)[0]], deleted_ids=[1, 2])
    fetched: list[str] = []
    real = storage.open_read

    def counting(uri, *args, **kwargs):
        fetched.append(uri)
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(storage, "open_read", counting)
    cache_dir = str(tmp_path / "cache")
    IndexVersion.open(str(root), "v000001", cache_dir=cache_dir).close()
    fetched.clear()
    with IndexVersion.open(str(root), "v000002", cache_dir=cache_dir) as version:
        assert version.manifest.ntotal == 428
    got = {u.rsplit("/", 1)[-1] for u in fetched} - {"manifest.json", "SEAL"}
    added = [f for f in manifest.all_files() if not f.origin]
    assert got == {f.file for f in added}
    assert sum(os.path.getsize(os.path.join(cache.version_dir(str(root), "v000002", cache_dir), f.file))
               for f in added) == sum(f.bytes for f in added)


def test_cached_objects_are_dropped_once_no_cached_version_links_them(base, tmp_path):
    root, *_ = base
    build_increment(str(root), "v000001", [rows(1000, 30, seed=2)[0]])
    build_increment(str(root), "v000002", [rows(2000, 30, seed=3)[0]])
    cache_dir = str(tmp_path / "cache")
    for version in ("v000001", "v000002", "v000003"):
        IndexVersion.open(str(root), version, cache_dir=cache_dir, keep_versions=1).close()
    objects = os.path.join(cache.index_cache_dir(str(root), cache_dir), "objects")
    listed = {f.sha256 for f in mf.read_manifest(str(root), "v000003").all_files()}
    assert set(os.listdir(objects)) == listed


def test_increments_on_object_storage_fetch_only_what_they_add(s3_bucket, tmp_path, monkeypatch):
    root = f"{s3_bucket}/indexes/main"
    batch, ids, x = rows(0, 300, seed=1)
    full(root, [batch], "IVF8,Flat", "BIVF4")
    new, _, x1 = rows(1000, 30, seed=2)
    manifest = build_increment(root, "v000001", [new], deleted_ids=ids[:5])
    assert {o.uri.rsplit("/", 1)[-1] for o in storage.list_objects(f"{root}/v000002")} == {
        f.file for f in manifest.all_files() if not f.origin} | {"manifest.json", "SEAL"}
    cache_dir = str(tmp_path / "cache")
    IndexVersion.open(root, "v000001", cache_dir=cache_dir).close()
    fetched: list[int] = []
    real = cache.fetch_verified
    monkeypatch.setattr(cache, "fetch_verified", lambda uri, dest, entry, version: (
        fetched.append(entry.bytes), real(uri, dest, entry, version))[1])
    with IndexVersion.open(root, "v000002", cache_dir=cache_dir) as version:
        assert top_ids(version, x1[:3], 1) == [[1000], [1001], [1002]]
        assert all(h.segment_id >= 5 for hits in version.search(x[:5], 10) for h in hits)
    assert sum(fetched) == sum(f.bytes for f in manifest.all_files() if not f.origin)


def test_an_increment_serves_the_parents_extra_files(tmp_path):
    root = tmp_path / "idx"
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"weights")
    batch, _, _ = rows(0, 100, seed=1)
    config = IndexBuildConfig(float_factory="Flat", binary_factory="BFlat", recall_sample=10)
    build_version(lambda: iter([batch]), str(root), model_id=MODEL, dim=DIM, bits=BITS, config=config,
                  extra_files={"model.safetensors": str(checkpoint)}, publish=False)
    build_increment(str(root), "v000001", [rows(1000, 10, seed=2)[0]])
    for cache_dir in (None, str(tmp_path / "cache")):
        with IndexVersion.open(str(root), "v000002", cache_dir=cache_dir) as version:
            with open(version.file_path("model.safetensors"), "rb") as f:
                assert f.read() == b"weights"


def test_the_query_core_lists_the_live_rows_of_an_increment(base):
    from xmodal_index.query.core import QueryIndex

    root, *_ = base
    build_increment(str(root), "v000001", [rows(1000, 10, seed=2)[0]], deleted_ids=[0, 1, 2])
    with QueryIndex.open(str(root), version="v000002") as index:
        ids = index.to_arrow().column("segment_id").to_pylist()
    assert ids == list(range(3, 400)) + list(range(1000, 1010))


def test_a_delta_measures_its_recall_on_its_own_rows(tmp_path):
    import faiss

    from xmodal_index.sinks.index.incremental import delta_recall

    rng = np.random.default_rng(3)
    x = rng.standard_normal((2000, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(2000, dtype=np.int64) + 50
    index = faiss.index_factory(DIM, "IVF64,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add_with_ids(x, ids)
    faiss.extract_index_ivf(index).nprobe = 64
    assert delta_recall(index, x, ids) == 1.0
    faiss.extract_index_ivf(index).nprobe = 1
    assert delta_recall(index, x, ids) < 0.7
    assert delta_recall(index, x[:50], ids[:50]) is None  # too few rows to measure
    manifest = build_increment(*_increment_args(tmp_path))
    delta = next(s for s in manifest.shards if s.file.startswith("delta-") and s.kind == "float")
    assert delta.recall_at_10 == 1.0  # IVF8 searched with nprobe = nlist: exact
    assert manifest.metrics["delta_recall_at_10"] == {"video": 1.0}
    assert manifest.metrics["recall_measured_on"] == "v000001"


def _increment_args(tmp_path):
    root = tmp_path / "idx"
    full(root, [rows(0, 400, seed=1)[0]], "IVF8,Flat", "BIVF4")
    return str(root), "v000001", [rows(1000, 300, seed=2)[0]]
