"""One fair ranking from several modalities' rankings.

Scores of different modalities are not comparable: in a shared embedding space
every (query modality, target modality) pair has its own score range (the
modality gap), so a merge by raw score lets one modality swamp the list. Methods:

- ``rrf`` (default): reciprocal-rank fusion. Each target modality is ranked on its
  own; an item's fused score is ``1 / (RRF_K + rank)`` within its modality, so the
  merged list interleaves the modalities by rank: every searched modality shows in
  the top of the list. Needs nothing from the build.
- ``calibrated``: per (query modality, target modality) pair, scores are
  standardised by the mean and standard deviation of that pair's scores over a
  seeded sample of the version's own stored vectors (computed when the version is
  first searched across modalities; no build-time change), then merged. This
  removes the modality gap and keeps each score's meaning (the better choice when
  every relevant item matters more than a mixed top of the list). A version
  without stored vectors falls back to ``rrf``.
- ``zscore``: per-query calibration per target modality: each score is
  standardised by the mean and standard deviation of the query's top ``depth``
  scores in that modality, then all are merged by the standardised score.
- ``score``: merge by raw score (the behaviour before calibration).

With a single target modality every method gives the raw-score order; the hits
then keep their raw scores. bench/query_fusion.py measures the methods' mAP.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import numpy as np

FUSIONS = ("rrf", "calibrated", "zscore", "score")
DEFAULT_FUSION = "rrf"
RRF_K = 60  # the constant of Cormack et al. (2009)
ZSCORE_DEPTH = 50  # candidates per modality that calibrate zscore
PAIR_SAMPLE = 512  # stored vectors per modality that calibrate each modality pair
PAIR_SEED = 0

PairStats = Mapping[str, tuple[float, float]]  # target modality -> (mean, std) of the query modality's scores

T = TypeVar("T")


def check_fusion(method: str) -> str:
    if method not in FUSIONS:
        raise ValueError(f"fusion = {method!r} must be one of {', '.join(FUSIONS)}")
    return method


def sample_rows(vectors: np.ndarray, n: int = PAIR_SAMPLE, seed: int = PAIR_SEED) -> np.ndarray:
    """A seeded sample of up to ``n`` rows as float32 (the rows of a memory map are read once)."""
    rows = len(vectors)
    if rows <= n:
        return np.asarray(vectors, dtype=np.float32)
    pick = np.sort(np.random.default_rng(seed).choice(rows, size=n, replace=False))
    return np.asarray(vectors[pick], dtype=np.float32)


def pair_statistics(samples: Mapping[str, np.ndarray]) -> dict[str, dict[str, tuple[float, float]]]:
    """{query modality: {target modality: (mean, std)}} of inner products between the modalities'
    sampled vectors (a row with itself excluded); query modality "" = all samples pooled (for
    raw-embedding queries, whose modality is unknown)."""
    pooled = [v for v in samples.values() if len(v)]
    queries = dict(samples)
    if pooled:
        queries[""] = sample_rows(np.concatenate(pooled), PAIR_SAMPLE, PAIR_SEED + 1)
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for q, qv in queries.items():
        out[q] = {}
        for t, tv in samples.items():
            if not len(qv) or not len(tv):
                continue
            scores = qv @ tv.T
            if q == t and scores.shape[0] == scores.shape[1]:
                scores = scores[~np.eye(len(qv), dtype=bool)]
            if scores.size == 0:
                continue
            out[q][t] = (float(scores.mean()), max(float(scores.std()), 1e-6))
    return out


def fused_scores(per_modality: Mapping[str, Sequence[float]], method: str,
                 pair_stats: PairStats | None = None) -> dict[str, list[float]]:
    """Fused scores, per modality, of rankings given as score lists sorted best first.
    ``calibrated`` needs ``pair_stats`` for each modality (else it falls back to ``rrf``)."""
    check_fusion(method)
    if method == "calibrated":
        if pair_stats is not None and all(m in pair_stats for m in per_modality):
            if len(per_modality) <= 1:
                return {m: [float(s) for s in scores] for m, scores in per_modality.items()}
            return {m: [(float(s) - pair_stats[m][0]) / pair_stats[m][1] for s in scores]
                    for m, scores in per_modality.items()}
        method = "rrf"
    if method == "score" or len(per_modality) <= 1:
        return {m: [float(s) for s in scores] for m, scores in per_modality.items()}
    if method == "rrf":
        return {m: [1.0 / (RRF_K + rank) for rank in range(1, len(scores) + 1)]
                for m, scores in per_modality.items()}
    out: dict[str, list[float]] = {}
    for m, scores in per_modality.items():
        top = [float(s) for s in scores[:ZSCORE_DEPTH]]
        if not top:
            out[m] = []
            continue
        mean = sum(top) / len(top)
        std = math.sqrt(sum((s - mean) ** 2 for s in top) / len(top))
        out[m] = [(float(s) - mean) / std if std > 1e-9 else 0.0 for s in scores]
    return out


def fuse(per_modality: Mapping[str, Sequence[T]], k: int, method: str,
         score: Callable[[T], float], tie: Callable[[T], int],
         rescore: Callable[[T, float], T], pair_stats: PairStats | None = None) -> list[T]:
    """Top ``k`` of the modalities' rankings (each best first) merged by ``method``.

    Ties fall to the higher raw score, then the smaller ``tie`` key (segment_id).
    With more than one modality the items carry their fused score (``rescore``).
    """
    fused = fused_scores({m: [score(h) for h in hits] for m, hits in per_modality.items()}, method, pair_stats)
    merged = [(f, h) for m, hits in per_modality.items() for h, f in zip(hits, fused[m])]
    merged.sort(key=lambda fh: (-fh[0], -score(fh[1]), tie(fh[1])))
    keep_raw = method == "score" or len(per_modality) <= 1
    return [h if keep_raw else rescore(h, f) for f, h in merged[:k]]
