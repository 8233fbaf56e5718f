"""mAP, rankings and splits, checked on cases small enough to work out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from xmodal_index.encoders.evaluation import (
    ModalitySet,
    average_precision,
    evaluate_encoder,
    hamming_distances,
    image_split,
    map_float,
    map_hamming,
    mean_average_precision,
    rank_by_hamming,
    rank_by_similarity,
    shuffled,
    speaker_folds,
)


def test_average_precision_of_a_hand_ranked_list():
    # relevant at ranks 1, 3, 6: (1/1 + 2/3 + 3/6) / 3
    assert average_precision(np.array([1, 0, 1, 0, 0, 1], bool)) == pytest.approx((1 + 2 / 3 + 0.5) / 3)


def test_average_precision_is_one_when_relevant_items_come_first():
    assert average_precision(np.array([1, 1, 0, 0], bool)) == 1.0


def test_average_precision_without_relevant_items_is_nan():
    assert np.isnan(average_precision(np.zeros(4, bool)))


def test_similarity_ties_are_broken_by_database_index():
    scores = np.array([[0.5, 0.9, 0.5, 0.9, 0.1]])
    assert rank_by_similarity(scores).tolist() == [[1, 3, 0, 2, 4]]


def test_tie_order_decides_map_deterministically():
    # all scores tie: the ranking is database order, so AP depends only on where relevant items sit
    q = np.ones((1, 2), np.float32)
    db = np.ones((4, 2), np.float32)
    assert map_float(q, db, np.array([7]), np.array([3, 7, 3, 7])) == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert map_float(q, db, np.array([7]), np.array([7, 7, 3, 3])) == 1.0


def test_hamming_distance_counts_differing_bits():
    q = np.packbits(np.array([[1, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0]], np.uint8), axis=1)
    d = np.packbits(np.array([[1, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0],
                              [0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 1]], np.uint8), axis=1)
    assert hamming_distances(q, d).tolist() == [[0, 3]]


def test_hamming_ranking_breaks_ties_by_index():
    q = np.array([[0b11110000]], np.uint8)
    d = np.array([[0b11110001], [0b11110000], [0b01110000], [0b00000000]], np.uint8)
    assert rank_by_hamming(q, d).tolist() == [[1, 0, 2, 3]]


def test_map_hamming_on_a_hand_case():
    q = np.array([[0b00000000], [0b11111111]], np.uint8)
    d = np.array([[0b00000001], [0b11111110], [0b00000011]], np.uint8)
    # query 0 (label 0): order 0, 2, 1 -> relevant [1, 1, 0] -> AP 1
    # query 1 (label 0): distances 7, 1, 6 -> order 1, 2, 0 -> relevant [0, 1, 1] -> AP (1/2 + 2/3) / 2
    assert map_hamming(q, d, np.array([0, 0]), np.array([0, 1, 0])) == pytest.approx((1 + 7 / 12) / 2)


def test_queries_without_relevant_items_are_left_out():
    order = np.array([[0, 1], [0, 1]])
    assert mean_average_precision(order, np.array([5, 9]), np.array([5, 1])) == 1.0


def test_image_split_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(10), 20)
    train, test = image_split(labels, test_fraction=0.25, seed=3)
    assert not set(train) & set(test) and len(train) + len(test) == 200
    assert np.bincount(labels[test]).tolist() == [5] * 10
    again = image_split(labels, test_fraction=0.25, seed=3)
    assert np.array_equal(again[1], test)
    assert not np.array_equal(image_split(labels, test_fraction=0.25, seed=4)[1], test)


def test_speaker_folds_hold_out_each_speaker_once():
    assert speaker_folds(["theo", "george", "theo", "jackson"]) == ["george", "jackson", "theo"]


def test_shuffled_keeps_payloads_with_their_labels():
    items = ModalitySet([f"p{i}" for i in range(20)], np.arange(20))
    s = shuffled(items, seed=1)
    assert [int(p[1:]) for p in s.payloads] == s.labels.tolist()
    assert sorted(s.labels.tolist()) == list(range(20))


class _OracleEncoder:
    """Embeds a payload (its label) as a one-hot vector; codes are the first bits."""

    def embed(self, modality, payloads):
        out = np.zeros((len(payloads), 16), np.float32)
        out[np.arange(len(payloads)), [int(p) for p in payloads]] = 1.0
        return out

    def codes(self, embeddings, bits):
        return np.packbits((embeddings[:, :bits] > 0).astype(np.uint8), axis=1)


def test_perfect_encoder_scores_one_in_every_direction():
    sets = {m: ModalitySet([str(i % 4) for i in range(12)], np.arange(12) % 4) for m in ("audio", "image", "text")}
    result = evaluate_encoder(_OracleEncoder(), sets, bits=(16,))
    assert set(result) == {"audio->image", "image->audio", "text->audio", "audio->text", "text->image", "image->text"}
    for row in result.values():
        assert row["float"] == 1.0 and row["16"] == 1.0
