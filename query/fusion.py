"""One fair ranking from several modalities' rankings.

Scores of different modalities are not comparable: in a shared embedding space
every (query modality, target modality) pair has its own score range (the
modality gap), so a merge by raw score lets one modality swamp the list. Methods:

- ``rrf`` (default): reciprocal-rank fusion. Each target modality is ranked on its
  own; an item's fused score is ``1 / (RRF_K + rank)`` within its modality, so the
  merged list interleaves the modalities by rank. Needs nothing from the build.
- ``zscore``: per-query calibration per target modality: each score is
  standardised by the mean and standard deviation of the query's top ``depth``
  scores in that modality, then all are merged by the standardised score.
- ``score``: merge by raw score (the behaviour before calibration).

With a single target modality every method gives the raw-score order; the hits
then keep their raw scores. bench/query_fusion.py measures the methods' mAP.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence, TypeVar

FUSIONS = ("rrf", "zscore", "score")
DEFAULT_FUSION = "rrf"
RRF_K = 60  # the constant of Cormack et al. (2009)
ZSCORE_DEPTH = 50  # candidates per modality that calibrate zscore

T = TypeVar("T")


def check_fusion(method: str) -> str:
    if method not in FUSIONS:
        raise ValueError(f"fusion = {method!r} must be one of {', '.join(FUSIONS)}")
    return method


def fused_scores(per_modality: Mapping[str, Sequence[float]], method: str) -> dict[str, list[float]]:
    """Fused scores, per modality, of rankings given as score lists sorted best first."""
    check_fusion(method)
    if method == "score" or len(per_modality) <= 1:
        return {m: [float(s) for s in scores] for m, scores in per_modality.items()}
    if method == "rrf":
        return {m: [1.0 / (RRF_K + rank) for rank in range(1, len(scores) + 1)]
                for m, scores in per_modality.items()}
    out = {}
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
         rescore: Callable[[T, float], T]) -> list[T]:
    """Top ``k`` of the modalities' rankings (each best first) merged by ``method``.

    Ties fall to the higher raw score, then the smaller ``tie`` key (segment_id).
    With more than one modality the items carry their fused score (``rescore``).
    """
    fused = fused_scores({m: [score(h) for h in hits] for m, hits in per_modality.items()}, method)
    merged = [(f, h) for m, hits in per_modality.items() for h, f in zip(hits, fused[m])]
    merged.sort(key=lambda fh: (-fh[0], -score(fh[1]), tie(fh[1])))
    keep_raw = method == "score" or len(per_modality) <= 1
    return [h if keep_raw else rescore(h, f) for f, h in merged[:k]]
