"""Two-stage search: Hamming prefilter on the binary shards, exact re-rank with the stored float16 vectors."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_loader import DIM, Archive, exact_top10, recall_at_10
from xmodal_index.sinks.errors import IndexVersionError
from xmodal_index.sinks.index.build import IndexBuildConfig
from xmodal_index.sinks.index.search import StoredVectors
from xmodal_index.sinks.serving.loader import IndexVersion


@pytest.fixture(scope="module")
def version(tmp_path_factory):
    root = tmp_path_factory.mktemp("two-stage") / "idx"
    archive = Archive({"video": 2000, "audio": 1000}, seed=21)
    archive.build(root, IndexBuildConfig(max_shard_vectors=800, recall_sample=50))
    return archive, root


def test_with_every_row_as_candidate_two_stage_equals_exact_search(version):
    archive, root = version
    queries = archive.sample(40)
    with IndexVersion.open(str(root)) as index:
        hits = index.search(queries, 10, mode="two_stage", codes=archive.hash(queries), candidates=3000)
    got = np.array([[h.segment_id for h in row] for row in hits])
    assert recall_at_10(hits, exact_top10(archive, queries)) >= 0.99  # float16 re-rank: ties may swap
    assert got.shape == (40, 10)


def test_scores_are_inner_products_with_the_stored_vectors(version):
    archive, root = version
    queries = archive.sample(5)
    with IndexVersion.open(str(root)) as index:
        hits = index.search(queries, 5, mode="two_stage", codes=archive.hash(queries), candidates=50)
    for q, row in zip(queries, hits):
        assert [h.score for h in row] == sorted((h.score for h in row), reverse=True)
        for h in row:
            assert h.score == pytest.approx(float(archive.x[archive.row_of[h.segment_id]] @ q), abs=2e-3)


def test_candidates_come_from_the_hamming_prefilter(version):
    archive, root = version
    queries = archive.sample(20)
    codes = archive.hash(queries)
    with IndexVersion.open(str(root)) as index:
        hits = index.search(queries, 10, mode="two_stage", codes=codes, candidates=10)
        shard_ids = [index._id_maps[s.entry.id_map].ids for s in index._select("binary", None)]
    bits = np.unpackbits(archive.codes, axis=1)
    for code, row in zip(codes, hits):
        dist = (bits != np.unpackbits(code)).sum(axis=1)
        pool: set[int] = set()  # each shard's rows within its 10th-nearest Hamming distance
        for ids in shard_ids:
            rows = np.array([archive.row_of[int(s)] for s in ids])
            kth = np.sort(dist[rows])[9]
            pool |= {int(archive.ids[r]) for r in rows[dist[rows] <= kth]}
        assert len(row) == 10
        assert {h.segment_id for h in row} <= pool


def test_more_candidates_give_at_least_the_recall_of_fewer(version):
    archive, root = version
    queries = archive.sample(100)
    exact = exact_top10(archive, queries)
    with IndexVersion.open(str(root)) as index:
        recalls = [recall_at_10(index.search(queries, 10, mode="two_stage", codes=archive.hash(queries),
                                             candidates=c), exact) for c in (10, 100, 1000)]
    assert recalls == sorted(recalls)
    assert recalls[-1] > recalls[0]


def test_modality_restriction_applies_to_two_stage_search(version):
    archive, root = version
    queries = archive.sample(10)
    with IndexVersion.open(str(root)) as index:
        hits = index.search(queries, 10, ["audio"], mode="two_stage", codes=archive.hash(queries))
    assert {h.modality for row in hits for h in row} == {"audio"}


def test_two_stage_needs_the_query_codes(version):
    archive, root = version
    with IndexVersion.open(str(root)) as index:
        with pytest.raises(ValueError, match="codes"):
            index.search(archive.sample(2), 5, mode="two_stage")
        with pytest.raises(ValueError, match="uint8"):
            index.search(archive.sample(2), 5, mode="two_stage", codes=np.zeros((2, 3), np.uint8))
        with pytest.raises(ValueError, match="mode"):
            index.search(archive.sample(2), 5, mode="hamming")


def test_a_version_without_stored_vectors_refuses_two_stage_search(tmp_path):
    archive = Archive({"text": 200}, seed=3)
    archive.build(tmp_path / "idx", IndexBuildConfig(recall_sample=10, store_vectors=False))
    with IndexVersion.open(str(tmp_path / "idx")) as index:
        assert not index.has_vectors
        assert len(index.search(archive.x[:1], 3)[0]) == 3  # float search still works
        with pytest.raises(IndexVersionError, match="stored vectors"):
            index.search(archive.x[:1], 3, mode="two_stage", codes=archive.codes[:1])


def test_stored_vectors_give_minus_infinity_for_missing_candidates():
    vectors = StoredVectors(np.eye(3, DIM, dtype=np.float16), np.array([5, 7, 9]), np.array([2, 0, 1]))
    query = np.zeros((1, DIM), np.float32)
    query[0, 0] = 1.0
    scores = vectors.score(query, np.array([[7, -1, 8, 9]]))
    assert scores[0, 0] == 1.0  # id 7 is row 0: the first unit vector
    assert scores[0, 3] == 0.0
    assert np.isneginf(scores[0, 1]) and np.isneginf(scores[0, 2])


def test_a_binary_ivf_prefilter_probes_enough_lists_for_the_candidates(tmp_path):
    archive = Archive({"image": 3000}, seed=22)
    manifest = archive.build(tmp_path / "idx", IndexBuildConfig(binary_factory="BIVF32", recall_sample=50))
    assert [s.factory for s in manifest.shards if s.kind == "binary"] == ["BIVF32"]
    queries = archive.sample(30)
    with IndexVersion.open(str(tmp_path / "idx")) as index:
        # the tuned nprobe serves the Hamming top-10; 3000 candidates need every list
        hits = index.search(queries, 10, mode="two_stage", codes=archive.hash(queries), candidates=3000)
    assert recall_at_10(hits, exact_top10(archive, queries)) >= 0.99
