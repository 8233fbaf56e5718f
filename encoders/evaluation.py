"""Cross-modal retrieval evaluation the way the seed papers report it.

mAP over the full ranking of the database for every query, per query->database
modality pair, with float embeddings (cosine) and hash codes (Hamming distance) at
each code length. Ties are broken deterministically by database position; the
database is put in a fixed, seeded random order first, so that tie-breaking does not
favour any label. Queries with no relevant database item are left out of the mean.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .training import TrainingSet
    from .tri_modal import AudioClips, DigitImages

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)

DIRECTIONS = (
    ("audio", "image"),
    ("image", "audio"),
    ("text", "audio"),
    ("audio", "text"),
    ("text", "image"),
    ("image", "text"),
)


def average_precision(relevant_in_rank_order: np.ndarray) -> float:
    """AP of one ranking given as booleans in rank order; nan when nothing is relevant."""
    rel = np.asarray(relevant_in_rank_order, dtype=bool)
    hits = np.cumsum(rel)
    n_rel = int(hits[-1]) if rel.size else 0
    if n_rel == 0:
        return float("nan")
    ranks = np.flatnonzero(rel) + 1
    return float(np.mean(hits[rel] / ranks))


def rank_by_similarity(scores: np.ndarray) -> np.ndarray:
    """Database order per query (Q, N): highest score first, ties by lower database index."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), axis=1, kind="stable")


def hamming_distances(query_codes: np.ndarray, db_codes: np.ndarray) -> np.ndarray:
    """(Q, N) Hamming distances between packed codes (uint8, bits // 8 columns)."""
    q = np.asarray(query_codes, dtype=np.uint8)
    d = np.asarray(db_codes, dtype=np.uint8)
    if q.shape[1] != d.shape[1]:
        raise ValueError(f"code widths differ: {q.shape[1]} and {d.shape[1]} bytes")
    xor = q[:, None, :] ^ d[None, :, :]
    return _POPCOUNT[xor].sum(axis=2)


def rank_by_hamming(query_codes: np.ndarray, db_codes: np.ndarray) -> np.ndarray:
    """Database order per query: smallest Hamming distance first, ties by lower database index."""
    return np.argsort(hamming_distances(query_codes, db_codes), axis=1, kind="stable")


def mean_average_precision(order: np.ndarray, query_labels: np.ndarray, db_labels: np.ndarray) -> float:
    """mAP of rankings ``order`` (Q, N) where relevant means same label."""
    ql = np.asarray(query_labels)
    dl = np.asarray(db_labels)
    aps = [average_precision(dl[order[i]] == ql[i]) for i in range(len(ql))]
    aps = [a for a in aps if not np.isnan(a)]
    return float(np.mean(aps)) if aps else float("nan")


def map_float(q_emb: np.ndarray, db_emb: np.ndarray, q_labels: np.ndarray, db_labels: np.ndarray) -> float:
    return mean_average_precision(rank_by_similarity(q_emb @ db_emb.T), q_labels, db_labels)


def map_hamming(q_codes: np.ndarray, db_codes: np.ndarray, q_labels: np.ndarray, db_labels: np.ndarray) -> float:
    return mean_average_precision(rank_by_hamming(q_codes, db_codes), q_labels, db_labels)


def image_split(labels: np.ndarray, test_fraction: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of image indices into (train, test), each sorted."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"{test_fraction = } must be in (0, 1)")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for y in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == y))
        k = int(round(len(idx) * test_fraction))
        test.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(test, dtype=np.int64))


def speaker_folds(speakers: Iterable[str]) -> list[str]:
    """Leave-one-speaker-out folds: the held-out speaker of each fold, sorted."""
    return sorted(set(str(s) for s in speakers))


@dataclasses.dataclass(frozen=True)
class ModalitySet:
    """Items of one modality for evaluation: payloads and their labels."""

    payloads: Sequence[Any]
    labels: np.ndarray


def shuffled(items: ModalitySet, seed: int) -> ModalitySet:
    """The same items in a fixed, seeded random order (ties then fall in that order)."""
    perm = np.random.default_rng(seed).permutation(len(items.labels))
    return ModalitySet([items.payloads[i] for i in perm], np.asarray(items.labels)[perm])


def evaluate_encoder(
    encoder: Any,
    sets: dict[str, ModalitySet],
    bits: Sequence[int] = (16, 32, 64),
    directions: Sequence[tuple[str, str]] = DIRECTIONS,
) -> dict[str, dict[str, float]]:
    """mAP per "query->database" direction and per column ("float", "16", "32", ...).

    ``encoder`` needs ``embed(modality, payloads)`` and ``codes(embeddings, bits)``
    (BuiltinEncoder has both). Each modality set is encoded once, out of sample.
    """
    needed = sorted({m for d in directions for m in d if m in sets})
    emb = {m: encoder.embed(m, list(sets[m].payloads)) for m in needed}
    codes = {(m, b): encoder.codes(emb[m], b) for m in needed for b in bits}
    out: dict[str, dict[str, float]] = {}
    for q, d in directions:
        if q not in sets or d not in sets:
            continue
        ql, dl = sets[q].labels, sets[d].labels
        row = {"float": map_float(emb[q], emb[d], ql, dl)}
        for b in bits:
            row[str(b)] = map_hamming(codes[(q, b)], codes[(d, b)], ql, dl)
        out[f"{q}->{d}"] = row
    return out


def benchmark_protocol(image_test_fraction: float, split_seed: int) -> str:
    """The protocol stated beside every number of the tri-modal digits benchmark."""
    from .tri_modal import EVAL_TEMPLATES

    return (
        "mAP over the full ranking of the database (relevant = same digit), per query->database direction; "
        "float = cosine similarity of L2-normalised embeddings, N bits = Hamming distance of N-bit codes; "
        "ties broken by database position after a fixed seeded shuffle of the database; "
        "database encoded out-of-sample. Audio: leave-one-speaker-out over the FSDD speakers (train on the "
        "other speakers, queries and database from the held-out speaker only), mean over folds. "
        f"Images: stratified seeded split (seed {split_seed}, {image_test_fraction:.0%} test) of the 1797 UCI "
        "digits; the file has no writer ids, so writer-disjointness cannot be guaranteed. "
        f"Text: the ten digit words written as {', '.join(repr(t) for t in EVAL_TEMPLATES)} "
        "('{w}' word, '{W}' capitalised, '{d}' numeral); text is not held out (there are only ten words; "
        "training texts use these spellings, other templates and filler sentences)."
    )


def fold_sets(
    audio: AudioClips, images: DigitImages, holdout: str, image_test_fraction: float = 0.5, split_seed: int = 0
) -> tuple[TrainingSet, dict[str, ModalitySet]]:
    """Training data (other speakers, train images) and test sets (held-out speaker, test images, words)."""
    from .training import TrainingSet
    from .tri_modal import digit_texts

    if holdout not in set(audio.speakers.tolist()):
        raise ValueError(f"held-out speaker {holdout!r} is not one of {speaker_folds(audio.speakers)}")
    train_idx, test_idx = image_split(images.labels, image_test_fraction, split_seed)
    train = TrainingSet(audio=audio.subset(audio.speakers != holdout), images=images.subset(train_idx))
    test_audio = audio.subset(audio.speakers == holdout)
    texts = digit_texts()
    sets = {
        "audio": shuffled(ModalitySet(test_audio.waves, test_audio.labels), split_seed + 1),
        "image": shuffled(ModalitySet(list(images.images[test_idx]), images.labels[test_idx]), split_seed + 2),
        "text": shuffled(ModalitySet(texts.texts, texts.labels), split_seed + 3),
    }
    return train, sets


def mean_over_folds(per_fold: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Average each (direction, column) cell over folds."""
    out: dict[str, dict[str, float]] = {}
    for direction in per_fold[0]:
        out[direction] = {
            col: float(np.mean([f[direction][col] for f in per_fold])) for col in per_fold[0][direction]
        }
    return out


def format_table(results: dict[str, dict[str, dict[str, float]]], columns: Sequence[str], protocol: str) -> str:
    """Text table in the seed papers' layout: one block per direction, rows = methods, columns = float/bits."""
    methods = list(results)
    directions = list(next(iter(results.values())))
    width = max(len(m) for m in methods) + 2
    head = "".join(f"{(c if c == 'float' else c + ' bits'):>10}" for c in columns)
    lines = []
    for d in directions:
        lines.append(f"{d:<{width}}{head}")
        for m in methods:
            lines.append(f"  {m:<{width - 2}}" + "".join(f"{results[m][d][c]:>10.3f}" for c in columns))
        lines.append("")
    lines.append("Protocol: " + protocol)
    return "\n".join(lines)
