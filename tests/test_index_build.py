"""Sharded index builds: shards, ids, dedupe, versions, failure safety, manifest metrics."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xmodal_index.sinks.embeddings_io import (
    batch_reader,
    embedding_matrix,
    hash_matrix,
    iter_batches,
    list_parquet_files,
    rows_batch,
)
from xmodal_index.sinks.errors import IndexVersionError
from xmodal_index.sinks.index import manifest as mf
from xmodal_index.sinks.index.build import (
    EmptyIndexError,
    IndexBuildConfig,
    IndexBuildError,
    build_version,
    choose_factories,
    publish_version,
)
from xmodal_index.sinks.index.choice import IndexChoiceError
from xmodal_index.sinks.schema import embedding_schema, segment_id

DIM, BITS = 32, 32
MODEL = "tiny@0123abcd"
SMALL = IndexBuildConfig(max_shard_vectors=250, recall_sample=50, train_sample=2000)


@dataclasses.dataclass
class Rows:
    ids: np.ndarray
    x: np.ndarray
    codes: np.ndarray
    uris: list[str]
    modalities: list[str]

    def batch(self, rows: slice | np.ndarray):
        idx = np.arange(len(self.ids))[rows]
        return rows_batch(
            self.ids[idx], [self.uris[i] for i in idx], ["etag-1"] * len(idx), [self.modalities[i] for i in idx],
            np.zeros(len(idx)), np.full(len(idx), 2.0), self.x[idx], self.codes[idx], model_id=MODEL, run_id="run-1",
        )


def make_rows(counts: dict[str, int], seed: int = 0) -> Rows:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((40, DIM))
    planes = rng.standard_normal((DIM, BITS))
    ids, xs, uris, modalities = [], [], [], []
    for modality, n in counts.items():
        x = centers[rng.integers(0, len(centers), n)] + 0.35 * rng.standard_normal((n, DIM))
        xs.append(x / np.linalg.norm(x, axis=1, keepdims=True))
        for i in range(n):
            uri = f"s3://archive/{modality}/{i:05d}.bin"
            uris.append(uri)
            modalities.append(modality)
            ids.append(segment_id(uri, "etag-1", modality, 0.0))
    x = np.concatenate(xs).astype(np.float32)
    codes = np.packbits((x @ planes > 0).astype(np.uint8), axis=1)
    return Rows(np.array(ids, np.int64), x, codes, uris, modalities)


def source(rows: Rows, batch_rows: int = 300):
    def batches():
        for start in range(0, len(rows.ids), batch_rows):
            yield rows.batch(slice(start, start + batch_rows))
    return batches


def build(rows: Rows, root, config: IndexBuildConfig = SMALL, **kwargs) -> mf.Manifest:
    return build_version(source(rows), str(root), model_id=MODEL, dim=DIM, bits=BITS, config=config, **kwargs)


COUNTS = {"video": 600, "audio": 400, "text": 200}



# ---------------------------------------------------------------- config and factory choice


@pytest.mark.parametrize("field, value", [
    ("metric", "l2"), ("max_shard_vectors", 0), ("nprobe", -1), ("ef_search", -3),
    ("recall_sample", -1), ("train_sample", 0), ("recall_target", 1.5), ("float_factory", " "),
    ("memory_budget_bytes", 0), ("add_threads", -1),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        IndexBuildConfig(**{field: value})


def test_auto_factories_are_exact_for_small_shards():
    assert choose_factories(10_000, 256, 64, IndexBuildConfig()) == ("Flat", "BFlat")


def test_auto_factories_are_ivf_for_large_shards():
    # 4 sqrt(1M) = 4000 lists, capped at 100k training rows / 32 per list
    assert choose_factories(1_000_000, 256, 64, IndexBuildConfig()) == ("IVF3125,Flat", "BIVF1000")


def test_explicit_factories_win_over_auto():
    config = IndexBuildConfig(float_factory="HNSW32", binary_factory="BIVF16")
    assert choose_factories(10, 8, 8, config) == ("HNSW32", "BIVF16")


# ---------------------------------------------------------------- shards


def test_each_modality_gets_its_own_shards_split_at_max_shard_vectors(tmp_path):
    manifest = build(make_rows(COUNTS), tmp_path / "idx")
    float_shards = [s for s in manifest.shards if s.kind == "float"]
    per_modality = {m: [s.ntotal for s in float_shards if s.modality == m] for m in COUNTS}
    assert {m: len(v) for m, v in per_modality.items()} == {"video": 3, "audio": 2, "text": 1}
    assert {m: sum(v) for m, v in per_modality.items()} == COUNTS
    assert max(s.ntotal for s in manifest.shards) <= SMALL.max_shard_vectors
    assert manifest.ntotal == sum(COUNTS.values())


def test_every_float_shard_has_a_binary_twin_and_an_id_map(tmp_path):
    manifest = build(make_rows(COUNTS), tmp_path / "idx")
    floats = {s.id_map: s.ntotal for s in manifest.shards if s.kind == "float"}
    binaries = {s.id_map: s.ntotal for s in manifest.shards if s.kind == "binary"}
    assert floats == binaries
    assert set(floats) == {f.file for f in manifest.id_maps}


def test_id_maps_hold_the_written_rows_sorted_by_segment_id(tmp_path):
    rows = make_rows(COUNTS)
    manifest = build(rows, tmp_path / "idx")
    ids = []
    for entry in manifest.id_maps:
        table = pq.read_table(tmp_path / "idx" / manifest.version / entry.file)
        column = table.column("segment_id").to_numpy()
        assert np.all(np.diff(column) > 0)
        assert set(table.column_names) >= {"segment_id", "uri", "modality", "start_s", "end_s", "text", "etag"}
        ids.append(column)
    assert sorted(np.concatenate(ids).tolist()) == sorted(rows.ids.tolist())


def test_duplicate_rows_are_stored_once(tmp_path):
    rows = make_rows({"image": 300})
    twice = np.concatenate([np.arange(300), np.arange(0, 300, 3)])

    def batches():
        for start in range(0, len(twice), 128):
            yield rows.batch(twice[start:start + 128])

    manifest = build_version(batches, str(tmp_path / "idx"), model_id=MODEL, dim=DIM, bits=BITS, config=SMALL)
    assert manifest.ntotal == 300
    assert sum(s.ntotal for s in manifest.shards if s.kind == "float") == 300
    assert manifest.metrics["duplicate_rows_dropped"] == 100


def test_flat_shards_measure_recall_one(tmp_path):
    manifest = build(make_rows(COUNTS), tmp_path / "idx", IndexBuildConfig(
        float_factory="Flat", binary_factory="BFlat", max_shard_vectors=250, recall_sample=50))
    assert manifest.metrics["recall_at_10"] == {"float": 1.0, "binary": 1.0}
    assert all(s.recall_at_10 == 1.0 for s in manifest.shards)
    assert manifest.metrics["ntotal"] == COUNTS


def test_ivf_shards_are_tuned_to_the_recall_target(tmp_path):
    config = IndexBuildConfig(float_factory="IVF32,Flat", binary_factory="BIVF16", max_shard_vectors=2000,
                              recall_sample=100)
    manifest = build(make_rows({"video": 4000}), tmp_path / "idx", config)
    assert manifest.metrics["recall_at_10"]["float"] >= 0.95
    assert manifest.metrics["recall_at_10"]["binary"] >= 0.95
    assert all("nprobe" in s.search_params for s in manifest.shards)
    assert {s.factory for s in manifest.shards} == {"IVF32,Flat", "BIVF16"}


def test_hnsw_shards_get_a_tuned_ef_search(tmp_path):
    config = IndexBuildConfig(float_factory="HNSW16", max_shard_vectors=1000, recall_sample=100)
    manifest = build(make_rows({"image": 2000}), tmp_path / "idx", config)
    floats = [s for s in manifest.shards if s.kind == "float"]
    assert len(floats) == 2
    assert all(s.search_params.get("efSearch", 0) >= 16 and s.recall_at_10 >= 0.95 for s in floats)


def test_configured_nprobe_is_used_as_given(tmp_path):
    config = IndexBuildConfig(float_factory="IVF32,Flat", nprobe=3, recall_sample=50)
    manifest = build(make_rows({"video": 2000}), tmp_path / "idx", config)
    assert [s.search_params for s in manifest.shards if s.kind == "float"] == [{"nprobe": 3}]
    assert manifest.search_params == {"nprobe": 3}


def test_a_shard_too_small_to_train_falls_back_to_exact_search(tmp_path):
    config = IndexBuildConfig(float_factory="IVF256,Flat", recall_sample=10)
    manifest = build(make_rows({"video": 50}), tmp_path / "idx", config)
    assert [s.factory for s in manifest.shards if s.kind == "float"] == ["Flat"]


def test_metrics_extra_is_merged_into_the_manifest(tmp_path):
    manifest = build(make_rows({"text": 50}), tmp_path / "idx", metrics_extra={"map_t2i_64": 0.42})
    assert manifest.metrics["map_t2i_64"] == 0.42
    assert "recall_at_10" in manifest.metrics


def test_build_reads_parquet_parts_through_batch_reader(tmp_path):
    rows = make_rows({"audio": 500})
    parts = tmp_path / "embeddings"
    parts.mkdir()
    for i, start in enumerate(range(0, 500, 200)):
        table = pa.Table.from_batches([rows.batch(slice(start, start + 200))])
        pq.write_table(table, parts / f"part-{i:05d}-of-00003.parquet")
    manifest = build_version(batch_reader(str(parts), batch_rows=64), str(tmp_path / "idx"), model_id=MODEL,
                             dim=DIM, bits=BITS, config=SMALL)
    assert manifest.ntotal == 500


def test_parallel_shard_adds_give_the_same_files_as_one_thread(tmp_path):
    rows = make_rows(COUNTS)
    parallel = build(rows, tmp_path / "a", dataclasses.replace(SMALL, add_threads=4))
    serial = build(rows, tmp_path / "b", dataclasses.replace(SMALL, add_threads=1))
    assert [(f.file, f.sha256) for f in parallel.all_files()] == [(f.file, f.sha256) for f in serial.all_files()]


def test_shards_beyond_the_memory_budget_are_filled_in_more_passes(tmp_path):
    rows = make_rows({"video": 600, "audio": 400})
    flat = dict(float_factory="Flat", binary_factory="BFlat", max_shard_vectors=250, recall_sample=20)
    roomy = build(rows, tmp_path / "a", IndexBuildConfig(**flat))
    # five 200-row shards of 200 x (32 x 4 + 8 + 4 + 8) = 29 600 bytes each: two per pass at most
    tight = build(rows, tmp_path / "b", IndexBuildConfig(memory_budget_bytes=80_000, **flat))
    assert roomy.build_stats["passes"] == 2  # scan + one add pass
    assert tight.build_stats["passes"] == 1 + 3  # 5 shards, two per pass
    assert [(f.file, f.sha256) for f in roomy.all_files()] == [(f.file, f.sha256) for f in tight.all_files()]


def test_stored_vectors_are_the_rows_in_float16_located_through_the_id_map(tmp_path):
    rows = make_rows({"video": 600})
    manifest = build(rows, tmp_path / "idx")
    version_dir = tmp_path / "idx" / manifest.version
    for shard in (s for s in manifest.shards if s.kind == "float"):
        vectors = np.load(version_dir / shard.vectors)
        table = pq.read_table(version_dir / shard.id_map)
        assert vectors.dtype == np.float16 and vectors.shape == (shard.ntotal, DIM)
        index_of = {int(i): n for n, i in enumerate(rows.ids)}
        want = rows.x[[index_of[i] for i in table.column("segment_id").to_pylist()]]
        got = vectors[table.column("vector_row").to_numpy()]
        np.testing.assert_allclose(got, want, atol=1e-3)


def test_the_manifest_records_the_choice_and_the_build(tmp_path):
    manifest = build(make_rows(COUNTS), tmp_path / "idx")
    assert set(manifest.index_choice) == set(COUNTS)
    assert manifest.index_choice["video"]["float_factory"] == "Flat"
    assert manifest.index_choice["video"]["memory_budget_bytes"] == SMALL.memory_budget_bytes
    assert "exact search" in manifest.index_choice["video"]["reason"]
    stats = manifest.build_stats
    assert stats["wall_s"] > 0 and stats["passes"] == 2
    assert stats["index_bytes"] == sum(s.bytes for s in manifest.shards)
    assert stats["vectors_bytes"] == sum(v.bytes for v in manifest.vectors) > 0


def test_a_budget_no_index_fits_is_an_error_before_anything_is_written(tmp_path):
    with pytest.raises(IndexChoiceError, match="memory_budget_bytes"):
        build(make_rows({"text": 100}), tmp_path / "idx", IndexBuildConfig(memory_budget_bytes=100, recall_sample=10))
    assert mf.list_versions(str(tmp_path / "idx")) == []


# ---------------------------------------------------------------- versions and publishing


def test_versions_increment_and_chain_their_parents(tmp_path):
    rows = make_rows({"text": 60})
    manifests = [build(rows, tmp_path / "idx") for _ in range(3)]
    assert [m.version for m in manifests] == ["v000001", "v000002", "v000003"]
    assert [m.parent_version for m in manifests] == [None, "v000001", "v000002"]
    assert mf.read_latest(str(tmp_path / "idx")) == "v000003"
    assert mf.list_versions(str(tmp_path / "idx")) == ["v000001", "v000002", "v000003"]


def test_rebuilding_the_same_rows_gives_identical_files(tmp_path):
    rows = make_rows({"video": 1500, "text": 300})
    config = IndexBuildConfig(float_factory="IVF16,Flat", binary_factory="BIVF8", max_shard_vectors=800,
                              recall_sample=50)
    first, second = build(rows, tmp_path / "idx", config), build(rows, tmp_path / "idx", config)
    assert [(f.file, f.sha256) for f in first.all_files()] == [(f.file, f.sha256) for f in second.all_files()]


def test_manifest_on_disk_matches_the_returned_one(tmp_path):
    manifest = build(make_rows({"text": 60}), tmp_path / "idx")
    assert mf.read_manifest(str(tmp_path / "idx"), manifest.version) == manifest


def test_listed_checksums_match_the_uploaded_files(tmp_path):
    manifest = build(make_rows(COUNTS), tmp_path / "idx")
    for entry in manifest.all_files():
        path = tmp_path / "idx" / manifest.version / entry.file
        assert mf.sha256_file(str(path)) == entry.sha256
        assert os.path.getsize(path) == entry.bytes


def test_a_failure_during_upload_leaves_latest_on_the_old_version(tmp_path):
    rows = make_rows(COUNTS)
    build(rows, tmp_path / "idx")

    def fail_after_first_upload(stage, done, total):
        if stage == "upload" and done >= 2:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        build(rows, tmp_path / "idx", progress=fail_after_first_upload)
    assert mf.read_latest(str(tmp_path / "idx")) == "v000001"
    assert mf.list_versions(str(tmp_path / "idx")) == ["v000001"]
    again = build(rows, tmp_path / "idx")
    assert (again.version, again.parent_version) == ("v000003", "v000001")


def test_publish_false_uploads_without_moving_latest(tmp_path):
    rows = make_rows({"text": 60})
    build(rows, tmp_path / "idx")
    staged = build(rows, tmp_path / "idx", publish=False)
    assert mf.read_latest(str(tmp_path / "idx")) == "v000001"
    publish_version(str(tmp_path / "idx"), staged.version)
    assert mf.read_latest(str(tmp_path / "idx")) == "v000002"


def test_publishing_a_version_without_manifest_is_refused(tmp_path):
    (tmp_path / "idx" / "v000001").mkdir(parents=True)
    with pytest.raises(IndexVersionError):
        publish_version(str(tmp_path / "idx"), "v000001")
    assert mf.read_latest(str(tmp_path / "idx")) is None


def test_extra_files_are_copied_and_listed_with_their_checksum(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"weights" * 1000)
    manifest = build(make_rows({"text": 60}), tmp_path / "idx", extra_files={"model.safetensors": str(checkpoint)})
    assert [f.file for f in manifest.files] == ["model.safetensors"]
    assert manifest.files[0].sha256 == mf.sha256_file(str(checkpoint))
    assert (tmp_path / "idx" / manifest.version / "model.safetensors").read_bytes() == checkpoint.read_bytes()


@pytest.mark.parametrize("name", ["sub/model.bin", "manifest.json", "LATEST", ".hidden", "shard-x.faiss"])
def test_extra_file_names_that_would_clash_are_rejected(tmp_path, name):
    checkpoint = tmp_path / "f"
    checkpoint.write_bytes(b"x")
    with pytest.raises(ValueError, match="extra file name"):
        build(make_rows({"text": 5}), tmp_path / "idx", extra_files={name: str(checkpoint)})


# ---------------------------------------------------------------- bad input


def test_empty_input_is_an_error_and_publishes_nothing(tmp_path):
    with pytest.raises(EmptyIndexError, match="no embedding rows"):
        build_version(lambda: iter(()), str(tmp_path / "idx"), model_id=MODEL, dim=DIM, bits=BITS, config=SMALL)
    assert mf.read_latest(str(tmp_path / "idx")) is None
    assert not (tmp_path / "idx").exists()


def test_rows_of_another_dimension_are_rejected(tmp_path):
    with pytest.raises(IndexBuildError, match="dim = 64"):
        build_version(source(make_rows({"text": 10})), str(tmp_path / "idx"), model_id=MODEL, dim=64, bits=BITS,
                      config=SMALL)


def test_rows_of_another_model_are_rejected(tmp_path):
    with pytest.raises(IndexBuildError, match="other@1"):
        build_version(source(make_rows({"text": 10})), str(tmp_path / "idx"), model_id="other@1", dim=DIM,
                      bits=BITS, config=SMALL)


def test_float16_embeddings_are_indexed(tmp_path):
    rows = make_rows({"audio": 120})
    half = embedding_schema(DIM, BITS, float16=True)

    def batches():
        for start in range(0, 120, 50):
            yield pa.Table.from_batches([rows.batch(slice(start, start + 50))]).cast(half).to_batches()[0]

    manifest = build_version(batches, str(tmp_path / "idx"), model_id=MODEL, dim=DIM, bits=BITS, config=SMALL)
    assert manifest.ntotal == 120


# ---------------------------------------------------------------- reading embedding Parquet


def write_parts(rows: Rows, directory, sizes: list[int]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    start = 0
    for i, size in enumerate(sizes):
        table = pa.Table.from_batches([rows.batch(slice(start, start + size))])
        pq.write_table(table, directory / f"part-{i:05d}-of-{len(sizes):05d}.parquet")
        start += size


def read_ids(batches) -> list[int]:
    return sorted(i for b in batches for i in b.column("segment_id").to_pylist())


def test_a_directory_reads_every_part_and_skips_temporary_files(tmp_path):
    rows = make_rows({"text": 100})
    write_parts(rows, tmp_path / "emb", [40, 60])
    (tmp_path / "emb" / ".tmp-part-00002.parquet").write_bytes(b"partial")
    (tmp_path / "emb" / "_SUCCESS").write_bytes(b"")
    assert len(list_parquet_files(str(tmp_path / "emb"))) == 2
    assert read_ids(iter_batches(str(tmp_path / "emb"), batch_rows=16)) == sorted(rows.ids.tolist())


def test_batches_are_bounded_by_batch_rows(tmp_path):
    write_parts(make_rows({"text": 100}), tmp_path / "emb", [100])
    assert max(b.num_rows for b in iter_batches(str(tmp_path / "emb"), batch_rows=16)) <= 16


def test_segment_id_filter_keeps_only_those_rows(tmp_path):
    rows = make_rows({"text": 100})
    write_parts(rows, tmp_path / "emb", [50, 50])
    wanted = set(rows.ids[::7].tolist())
    assert read_ids(iter_batches(str(tmp_path / "emb"), segment_ids=wanted)) == sorted(wanted)


def test_uri_etag_filter_keeps_only_live_objects(tmp_path):
    rows = make_rows({"video": 30})
    write_parts(rows, tmp_path / "emb", [30])
    live = {(rows.uris[3], "etag-1"), (rows.uris[4], "etag-2")}  # uris[4] changed since it was indexed
    batches = list(iter_batches(str(tmp_path / "emb"), uri_etags=live, columns=["segment_id"]))
    assert read_ids(batches) == [int(rows.ids[3])]
    assert batches[0].schema.names == ["segment_id"]


def test_model_id_filter_drops_rows_of_other_models(tmp_path):
    rows = make_rows({"text": 20})
    write_parts(rows, tmp_path / "emb", [20])
    assert read_ids(iter_batches(str(tmp_path / "emb"), model_id="old@1")) == []
    assert len(read_ids(iter_batches(str(tmp_path / "emb"), model_id=MODEL))) == 20


def test_matrices_respect_sliced_columns():
    rows = make_rows({"image": 10})
    batch = rows.batch(slice(0, 10)).slice(3, 4)
    np.testing.assert_array_equal(embedding_matrix(batch.column("embedding")), rows.x[3:7])
    np.testing.assert_array_equal(hash_matrix(batch.column("hash_code")), rows.codes[3:7])
