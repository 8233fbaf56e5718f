"""Recall@10 of built shards against exact search on held-out queries, and the
version metrics that summarise it (SPEC 4.4)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .scan import Scan
from .search import RERANK_PARAM, StoredVectors, rerank_search

if TYPE_CHECKING:
    from .shard import ShardBuilder, ShardResult

RECALL_K = 10


def _recall_of(found: np.ndarray, exact_ids: np.ndarray | list[np.ndarray]) -> float:
    """|found ∩ wanted| / |wanted| summed over the queries; wanted: each query's exact
    top-k, or the part of the modality's exact top-k that this shard holds."""
    hits = total = 0
    for got, want in zip(found, exact_ids):
        want = want[want >= 0]
        total += len(want)
        hits += len(np.intersect1d(got[got >= 0], want))
    return hits / total if total else 1.0


def wanted_count(exact_ids: np.ndarray | list[np.ndarray]) -> int:
    return int(sum(int((w >= 0).sum()) for w in exact_ids))


def modality_exact(builders: list[ShardBuilder]) -> np.ndarray:
    """Exact top-10 ids over all shards of one modality, merged from the shards' own."""
    dist = np.concatenate([b.exact_top()[0] for b in builders], axis=1)
    ids = np.concatenate([b.exact_top()[1] for b in builders], axis=1)
    dist = np.where(ids >= 0, dist, -np.inf)
    order = np.argsort(-dist, axis=1, kind="stable")[:, :RECALL_K]
    return np.take_along_axis(ids, order, axis=1)


def shares(modality_exact: np.ndarray, shard_exact: np.ndarray) -> list[np.ndarray]:
    """Per query, the modality's exact top-10 ids that this shard holds (they are
    necessarily among the shard's own exact top-10)."""
    return [g[np.isin(g, s[s >= 0]) & (g >= 0)] for g, s in zip(modality_exact, shard_exact)]


def float_recall_of(index: Any, queries: np.ndarray, exact_ids: np.ndarray | list[np.ndarray],
                    vectors: StoredVectors | None,
                  params: Mapping[str, int]) -> float:
    rerank = int(params.get(RERANK_PARAM, 0))
    if rerank > 1 and vectors is not None:
        _, found = rerank_search(index, queries, RECALL_K, rerank, vectors)
    else:
        _, found = index.search(queries, RECALL_K)
    return _recall_of(found, exact_ids)


def hamming_recall_of(index: Any, codes: np.ndarray, exact_dist: np.ndarray, exact_ids: np.ndarray,
                    params: Mapping[str, int]) -> float:
    """Like float_recall_of, but any result at most as far as the exact k-th neighbour
    counts: Hamming distances tie often, and any of the tied rows is a true neighbour."""
    dist, found = index.search(codes, RECALL_K)
    hits = total = 0
    for d, got, want_d, want in zip(dist, found, exact_dist, exact_ids):
        valid = want >= 0
        m = int(valid.sum())
        if not m:
            continue
        kth = want_d[valid].max()
        hits += min(int(((got >= 0) & (d <= kth)).sum()), m)
        total += m
    return hits / total if total else 1.0


def version_metrics(results: list[ShardResult], scan: Scan, queries: dict[str, tuple[np.ndarray, np.ndarray]],
             metrics_extra: Mapping[str, Any]) -> dict[str, Any]:
    by_modality: dict[str, dict[str, list[tuple[float, int]]]] = {"float": {}, "binary": {}}
    for r in results:
        for kind in ("float", "binary"):
            recall = r.recall[kind]
            if recall is not None:
                by_modality[kind].setdefault(r.plan.modality, []).append((recall, r.weight[kind]))

    def mean(pairs: list[tuple[float, int]]) -> float:
        total = sum(w for _, w in pairs)
        return sum(v * w for v, w in pairs) / total if total else float(np.mean([v for v, _ in pairs]))

    per_modality = {kind: {m: mean(pairs) for m, pairs in mods.items()} for kind, mods in by_modality.items()}
    ntotal = {m: sum(r.ntotal for r in results if r.plan.modality == m) for m in scan.modalities}
    metrics: dict[str, Any] = {
        "recall_at_10": {kind: (min(mods.values()) if mods else None) for kind, mods in per_modality.items()},
        "recall_at_10_by_modality": per_modality,
        "recall_at_10_min_shard": {kind: (min(v for pairs in mods.values() for v, _ in pairs) if mods else None)
                                   for kind, mods in by_modality.items()},
        "recall_queries": {m: len(q[0]) for m, q in queries.items()},
        "recall_protocol": (
            "up to recall_sample rows per modality, held out of training, are the queries; each shard is "
            "searched at its search_params (with its re-rank, if any) for k=10. Float: a shard's hits are the "
            "modality's exact top-10 (flat inner product over all its shards) that it holds and returns, when "
            "all shards of the modality fill in one pass, else its own exact top-10; a modality's recall is "
            "hits / exact neighbours summed over its shards, i.e. the recall@10 of the merged search. Binary: "
            "per shard, any returned row at most as far as the 10th exact Hamming neighbour counts; shards "
            "averaged. recall_at_10 is the minimum over modalities"
        ),
        "ntotal": ntotal,
        "rows_read": scan.rows,
        "duplicate_rows_dropped": scan.rows - len(scan.unique_ids),
    }
    metrics.update(metrics_extra)
    return metrics
