"""The query-node loader: verification, recall after a multi-shard build, ids, modalities, Hamming search."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from xmodal_index.sinks import storage
from xmodal_index.sinks.embeddings_io import rows_batch
from xmodal_index.sinks.errors import ChecksumMismatchError, IndexVersionError
from xmodal_index.sinks.index import manifest as mf
from xmodal_index.sinks.index.build import IndexBuildConfig, build_version
from xmodal_index.sinks.schema import segment_id
from xmodal_index.sinks.serving.loader import Hit, IndexVersion

DIM, BITS = 32, 64
MODEL = "tiny@feedbeef"



class Archive:
    """Clustered, L2-normalised synthetic rows of several modalities."""

    def __init__(self, counts: dict[str, int], seed: int = 0, clusters: int = 50) -> None:
        rng = np.random.default_rng(seed)
        self.centers = rng.standard_normal((clusters, DIM))
        self.planes = rng.standard_normal((DIM, BITS))
        self.rng = rng
        xs, self.uris, self.modalities, ids = [], [], [], []
        for modality, n in counts.items():
            xs.append(self.sample(n))
            for i in range(n):
                uri = f"s3://archive/{modality}/{i:06d}.mp4"
                self.uris.append(uri)
                self.modalities.append(modality)
                ids.append(segment_id(uri, "e1", modality, float(i % 7)))
        self.x = np.concatenate(xs)
        self.codes = self.hash(self.x)
        self.ids = np.array(ids, np.int64)
        self.row_of = {int(sid): i for i, sid in enumerate(self.ids)}

    def sample(self, n: int) -> np.ndarray:
        x = self.centers[self.rng.integers(0, len(self.centers), n)] + 0.35 * self.rng.standard_normal((n, DIM))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def hash(self, x: np.ndarray) -> np.ndarray:
        return np.packbits((x @ self.planes > 0).astype(np.uint8), axis=1)

    def batches(self, batch_rows: int = 2048):
        def gen():
            for start in range(0, len(self.ids), batch_rows):
                sl = slice(start, start + batch_rows)
                idx = np.arange(len(self.ids))[sl]
                yield rows_batch(
                    self.ids[sl], self.uris[sl], ["e1"] * len(idx), self.modalities[sl], (idx % 7).astype(float),
                    (idx % 7 + 1).astype(float), self.x[sl], self.codes[sl], model_id=MODEL, run_id="r1",
                    texts=[f"caption {i}" if self.modalities[i] == "text" else None for i in idx],
                )
        return gen

    def build(self, root, config: IndexBuildConfig, **kwargs) -> mf.Manifest:
        return build_version(self.batches(), str(root), model_id=MODEL, dim=DIM, bits=BITS, config=config, **kwargs)


def recall_at_10(hits: list[list[Hit]], exact_ids: np.ndarray) -> float:
    found = sum(len({h.segment_id for h in row} & set(want.tolist())) for row, want in zip(hits, exact_ids))
    return found / exact_ids.size


def exact_top10(archive: Archive, queries: np.ndarray) -> np.ndarray:
    scores = queries @ archive.x.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    return archive.ids[order]


@pytest.fixture(scope="module")
def flat_version(tmp_path_factory):
    root = tmp_path_factory.mktemp("flat") / "idx"
    archive = Archive({"video": 1500, "audio": 1000, "text": 500})
    checkpoint = root.parent / "model.safetensors"
    checkpoint.write_bytes(os.urandom(4096))
    config = IndexBuildConfig(max_shard_vectors=600, recall_sample=100)
    archive.build(root, config, extra_files={"model.safetensors": str(checkpoint)})
    return archive, root


# ---------------------------------------------------------------- recall after a multi-shard build


def test_flat_multi_shard_search_matches_exact_search(flat_version):
    archive, root = flat_version
    queries = archive.sample(200)
    with IndexVersion.open(str(root)) as index:
        assert sum(s.kind == "float" for s in index.manifest.shards) == 6
        hits = index.search(queries, 10)
    assert recall_at_10(hits, exact_top10(archive, queries)) >= 0.95


def test_ivf_multi_shard_search_reaches_recall_095(tmp_path):
    archive = Archive({"video": 14000, "image": 6000}, seed=3)
    # tuned on 200 held-out rows to 0.97: fresh queries land within a couple of points of it
    config = IndexBuildConfig(float_factory="IVF64,Flat", max_shard_vectors=7000, recall_sample=200,
                              train_sample=5000, recall_target=0.97)
    manifest = archive.build(tmp_path / "idx", config)
    assert {s.factory for s in manifest.shards if s.kind == "float"} == {"IVF64,Flat"}
    assert sum(s.kind == "float" for s in manifest.shards) == 3
    queries = archive.sample(300)
    with IndexVersion.open(str(tmp_path / "idx")) as index:
        hits = index.search(queries, 10)
    assert recall_at_10(hits, exact_top10(archive, queries)) >= 0.95


def test_binary_ivf_search_finds_the_exact_hamming_neighbours(tmp_path):
    archive = Archive({"video": 8000}, seed=6)
    config = IndexBuildConfig(binary_factory="BIVF32", max_shard_vectors=4000, recall_sample=200)
    manifest = archive.build(tmp_path / "idx", config)
    assert all("nprobe" in s.search_params for s in manifest.shards if s.kind == "binary")
    queries = archive.hash(archive.sample(200))
    with IndexVersion.open(str(tmp_path / "idx")) as index:
        hits = index.search_codes(queries, 10)
    bits = np.unpackbits(archive.codes, axis=1)
    good = 0
    for query, row in zip(np.unpackbits(queries, axis=1), hits):
        tenth = np.sort((bits != query).sum(axis=1))[9]  # any row this close is a true top-10 neighbour
        good += sum(round((1.0 - h.score) * BITS) <= tenth for h in row)
    assert good / (10 * len(queries)) >= 0.95


# ---------------------------------------------------------------- what hits hold


def test_hits_carry_the_segment_ids_and_rows_that_were_written(flat_version):
    archive, root = flat_version
    with IndexVersion.open(str(root)) as index:
        hits = index.search(archive.x[:20], 5)
    for query_row, row in enumerate(hits):
        assert row[0].segment_id == archive.ids[query_row]  # a stored vector finds itself first
        for hit in row:
            i = archive.row_of[hit.segment_id]  # KeyError if an id were a row position
            assert (hit.uri, hit.modality) == (archive.uris[i], archive.modalities[i])
            assert (hit.start_s, hit.end_s) == (float(i % 7), float(i % 7 + 1))
            assert hit.text == (f"caption {i}" if archive.modalities[i] == "text" else None)


def test_hits_are_ordered_by_score_best_first(flat_version):
    archive, root = flat_version
    with IndexVersion.open(str(root)) as index:
        hits = index.search(archive.sample(10), 20)
    for row in hits:
        scores = [h.score for h in row]
        assert scores == sorted(scores, reverse=True)
        assert len(row) == 20


def test_modality_restriction_returns_only_those_modalities(flat_version):
    archive, root = flat_version
    with IndexVersion.open(str(root)) as index:
        hits = index.search(archive.sample(30), 10, modalities=["audio", "text"])
    assert {h.modality for row in hits for h in row} == {"audio", "text"}


def test_modality_restriction_applies_to_hamming_search(flat_version):
    archive, root = flat_version
    with IndexVersion.open(str(root)) as index:
        hits = index.search_codes(archive.codes[:30], 10, modalities=["video"])
    assert {h.modality for row in hits for h in row} == {"video"}


def test_an_unknown_modality_is_rejected(flat_version):
    _, root = flat_version
    with IndexVersion.open(str(root)) as index, pytest.raises(ValueError, match="vidoe"):
        index.search(np.zeros((1, DIM), np.float32), 5, modalities=["vidoe"])


def test_queries_of_the_wrong_dimension_are_rejected(flat_version):
    _, root = flat_version
    with IndexVersion.open(str(root)) as index, pytest.raises(ValueError, match=str(DIM)):
        index.search(np.zeros((2, DIM + 1), np.float32), 5)


# ---------------------------------------------------------------- Hamming search


def test_hamming_search_returns_exact_hamming_neighbours(flat_version):
    archive, root = flat_version
    queries = archive.hash(archive.sample(50))
    with IndexVersion.open(str(root)) as index:
        hits = index.search_codes(queries, 10)
    bits = np.unpackbits(archive.codes, axis=1)
    for query, row in zip(np.unpackbits(queries, axis=1), hits):
        distances = np.sort((bits != query).sum(axis=1))[:10]
        got = [round((1.0 - h.score) * BITS) for h in row]
        assert got == distances.tolist()
        for h in row:
            assert (bits[archive.row_of[h.segment_id]] != query).sum() == round((1.0 - h.score) * BITS)


def test_hamming_ties_across_shards_are_ordered_by_segment_id(tmp_path):
    archive = Archive({"text": 200}, seed=5)
    archive.codes[:40] = archive.codes[0]  # 40 rows in 3 shards share one code: distance 0 to the query
    archive.codes[40:] = ~archive.codes[0]  # every other row is as far as possible
    archive.build(tmp_path / "idx", IndexBuildConfig(max_shard_vectors=70, recall_sample=20))
    with IndexVersion.open(str(tmp_path / "idx")) as index:
        hits = index.search_codes(archive.codes[:1], 45)[0]
    assert [h.score for h in hits[:40]] == [1.0] * 40
    assert [h.segment_id for h in hits[:40]] == sorted(archive.ids[:40].tolist())
    assert [h.score for h in hits[40:]] == [0.0] * 5


# ---------------------------------------------------------------- verification


def _tamper(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("which", ["float shard", "binary shard", "id map", "stored vectors", "extra file"])
def test_a_flipped_byte_in_any_file_refuses_the_version(tmp_path, which):
    archive = Archive({"video": 300, "text": 100}, seed=1)
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(os.urandom(2048))
    manifest = archive.build(tmp_path / "idx", IndexBuildConfig(max_shard_vectors=200, recall_sample=20),
                             extra_files={"model.safetensors": str(checkpoint)})
    name = {
        "float shard": next(s.file for s in manifest.shards if s.kind == "float"),
        "binary shard": next(s.file for s in manifest.shards if s.kind == "binary"),
        "id map": manifest.id_maps[-1].file,
        "stored vectors": manifest.vectors[0].file,
        "extra file": "model.safetensors",
    }[which]
    _tamper(tmp_path / "idx" / manifest.version / name)
    with pytest.raises(ChecksumMismatchError, match=name) as err:
        IndexVersion.open(str(tmp_path / "idx"))
    assert manifest.version in str(err.value)


def test_a_missing_file_refuses_the_version(tmp_path):
    archive = Archive({"image": 100}, seed=2)
    manifest = archive.build(tmp_path / "idx", IndexBuildConfig(recall_sample=10))
    os.unlink(tmp_path / "idx" / manifest.version / manifest.id_maps[0].file)
    with pytest.raises(ChecksumMismatchError, match="missing"):
        IndexVersion.open(str(tmp_path / "idx"))


def test_a_corrupted_cache_is_fetched_again(tmp_path):
    archive = Archive({"image": 100}, seed=2)
    manifest = archive.build(tmp_path / "idx", IndexBuildConfig(recall_sample=10))
    cache = tmp_path / "cache"
    with IndexVersion.open(str(tmp_path / "idx"), cache_dir=str(cache)) as index:
        local = index.local_dir
    assert local.startswith(str(cache))
    _tamper(next(p for p in (tmp_path / "cache").rglob("*.float.faiss")))
    with IndexVersion.open(str(tmp_path / "idx"), cache_dir=str(cache)) as index:
        assert index.search(archive.x[:1], 1)[0][0].segment_id == archive.ids[0]
    assert manifest.version in local


def test_a_corrupted_source_is_refused_even_through_the_cache(tmp_path):
    archive = Archive({"image": 100}, seed=2)
    manifest = archive.build(tmp_path / "idx", IndexBuildConfig(recall_sample=10))
    _tamper(tmp_path / "idx" / manifest.version / manifest.shards[0].file)
    with pytest.raises(ChecksumMismatchError, match=manifest.shards[0].file):
        IndexVersion.open(str(tmp_path / "idx"), cache_dir=str(tmp_path / "cache"))


# ---------------------------------------------------------------- versions and extra files


def test_open_reads_latest_or_the_named_version(tmp_path):
    first, second = Archive({"text": 50}, seed=1), Archive({"text": 80}, seed=2)
    first.build(tmp_path / "idx", IndexBuildConfig(recall_sample=10))
    second.build(tmp_path / "idx", IndexBuildConfig(recall_sample=10))
    assert IndexVersion.latest_version(str(tmp_path / "idx")) == "v000002"
    with IndexVersion.open(str(tmp_path / "idx")) as latest:
        assert (latest.version, latest.manifest.ntotal) == ("v000002", 80)
    with IndexVersion.open(str(tmp_path / "idx"), version="v000001") as old:
        assert (old.version, old.manifest.ntotal) == ("v000001", 50)


def test_open_without_a_published_version_is_an_error(tmp_path):
    with pytest.raises(IndexVersionError, match="no published"):
        IndexVersion.open(str(tmp_path / "idx"))


def test_file_path_gives_the_verified_extra_file(flat_version):
    _, root = flat_version
    with IndexVersion.open(str(root)) as index:
        path = index.file_path("model.safetensors")
        assert mf.sha256_file(path) == index.manifest.files[0].sha256
        with pytest.raises(IndexVersionError, match="config.json"):
            index.file_path("config.json")


def test_loader_imports_without_beam_or_torch():
    code = (
        "import sys, xmodal_index.sinks.serving.loader\n"
        "bad = [m for m in ('apache_beam', 'torch', 'click') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# ---------------------------------------------------------------- object storage


def test_build_and_open_through_s3(s3_bucket, tmp_path):
    archive = Archive({"video": 300, "text": 100}, seed=4)
    root = f"{s3_bucket}/indexes/main"
    first = archive.build(root, IndexBuildConfig(max_shard_vectors=200, recall_sample=20))
    second = archive.build(root, IndexBuildConfig(max_shard_vectors=200, recall_sample=20))
    assert (second.version, second.parent_version) == ("v000002", first.version)
    assert mf.list_versions(root) == ["v000001", "v000002"]
    with IndexVersion.open(root, cache_dir=str(tmp_path / "cache")) as index:
        assert index.version == "v000002"
        assert index.local_dir.startswith(str(tmp_path / "cache"))
        hit = index.search(archive.x[5:6], 1)[0][0]
    assert (hit.segment_id, hit.uri) == (archive.ids[5], archive.uris[5])


def test_an_altered_object_on_s3_is_refused(s3_bucket, tmp_path):
    archive = Archive({"image": 100}, seed=4)
    root = f"{s3_bucket}/indexes/main"
    manifest = archive.build(root, IndexBuildConfig(recall_sample=10))
    uri = storage.join(root, manifest.version, manifest.id_maps[0].file)
    data = bytearray(storage.read_bytes(uri))
    data[-10] ^= 0x01
    storage.write_bytes(uri, bytes(data))
    with pytest.raises(ChecksumMismatchError, match=manifest.id_maps[0].file):
        IndexVersion.open(root, cache_dir=str(tmp_path / "cache"))
