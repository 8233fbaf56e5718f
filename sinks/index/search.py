"""Search primitives shared by the index build (recall measurement, tuning) and
query nodes: search parameters of FAISS indexes, exact re-ranking with a shard's
stored float16 vectors, and the two-stage (Hamming prefilter, exact re-rank) search.

Needs only faiss and numpy; no Beam, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import faiss
import numpy as np

from ..errors import IndexVersionError


def _inner_index(index: Any, binary: bool) -> Any:
    """The index under IDMap / PreTransform wrappers, downcast to its concrete type."""
    if binary:
        while isinstance(index, (faiss.IndexBinaryIDMap, faiss.IndexBinaryIDMap2)):
            index = faiss.downcast_IndexBinary(index.index)
        return index
    index = faiss.downcast_index(index)
    while isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
        index = faiss.downcast_index(index.index)
    return index


def tunable_param(index: Any, binary: bool) -> tuple[str, int] | None:
    """("nprobe", nlist) for IVF indexes, ("efSearch", 0) for HNSW, ("nflip", hash
    bits) for binary hash indexes, None for exact ones."""
    inner = _inner_index(index, binary)
    if binary:
        if isinstance(inner, faiss.IndexBinaryIVF):
            return "nprobe", int(inner.nlist)
        if isinstance(inner, faiss.IndexBinaryHNSW):
            return "efSearch", 0
        if isinstance(inner, (faiss.IndexBinaryHash, faiss.IndexBinaryMultiHash)):
            return "nflip", int(inner.b)  # type: ignore[attr-defined]  # faiss's stub omits IndexBinaryHash.b
        return None
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return "nprobe", int(ivf.nlist)
    if isinstance(inner, faiss.IndexHNSW):
        return "efSearch", 0
    return None


def apply_search_params(index: Any, params: Mapping[str, int], binary: bool) -> None:
    """Set nprobe / efSearch on the index (keys the index does not use are ignored)."""
    param = tunable_param(index, binary)
    if param is None or param[0] not in params:
        return
    name, value = param[0], int(params[param[0]])
    if name == "nflip":
        _inner_index(index, True).nflip = max(0, value)
        return
    if value <= 0:
        return
    if name == "nprobe":
        ivf = _inner_index(index, True) if binary else faiss.try_extract_index_ivf(index)
        if ivf is None:
            return
        ivf.nprobe = min(value, int(ivf.nlist))
    else:
        _inner_index(index, binary).hnsw.efSearch = value


RERANK_PARAM = "rerank"  # search_params key: candidates per shard = rerank * k, re-scored exactly
_RERANK_CHUNK_VALUES = 1 << 22  # candidate rows x dim re-scored at once (16 MiB of float32)


class StoredVectors:
    """A shard's float16 copy of its vectors, memory-mapped, addressed by segment id.

    ``ids`` (sorted) and ``rows`` come from the shard's id map: the vector of
    ``ids[i]`` is ``vectors[rows[i]]``.
    """

    def __init__(self, vectors: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> None:
        if len(ids) != len(rows):
            raise ValueError(f"{len(ids)} ids but {len(rows)} vector rows")
        self.vectors = vectors
        self.ids = ids
        self.rows = rows

    @classmethod
    def open(cls, path: str, ids: np.ndarray, rows: np.ndarray) -> StoredVectors:
        try:
            vectors = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise IndexVersionError(f"cannot read stored vectors {path!r}: {err}") from err
        if vectors.ndim != 2 or (len(rows) and int(rows.max()) >= len(vectors)):
            raise IndexVersionError(f"stored vectors {path!r} have shape {vectors.shape}, too few for its id map")
        return cls(vectors, ids, rows)

    def score(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact inner products (Q, C) of each query with its candidate ids (Q, C);
        -inf where the id is -1 (no candidate) or unknown to this shard."""
        nq, nc = ids.shape
        out = np.full((nq, nc), -np.inf, np.float32)
        if nc == 0 or len(self.ids) == 0:
            return out
        dim = self.vectors.shape[1]
        step = max(1, _RERANK_CHUNK_VALUES // max(1, nc * dim))
        for start in range(0, nq, step):
            block = ids[start:start + step]
            flat = block.ravel()
            pos = np.minimum(np.searchsorted(self.ids, flat), len(self.ids) - 1)
            ok = (flat >= 0) & (self.ids[pos] == flat)
            rows = self.rows[pos[ok]]
            order = np.argsort(rows, kind="stable")  # sequential reads of the memory map
            x = np.empty((len(rows), dim), np.float32)
            x[order] = self.vectors[rows[order]]
            q = np.repeat(queries[start:start + step], nc, axis=0)[ok]
            scores = np.full(len(flat), -np.inf, np.float32)
            scores[ok] = np.einsum("ij,ij->i", x, q)
            out[start:start + len(block)] = scores.reshape(len(block), nc)
        return out


def top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k (highest score, then smallest id) of each row; -1 / -inf where fewer exist."""
    nq = len(scores)
    out_d = np.full((nq, k), -np.inf, np.float32)
    out_i = np.full((nq, k), -1, np.int64)
    for q in range(nq):
        valid = np.nonzero((ids[q] >= 0) & np.isfinite(scores[q]))[0]
        order = valid[np.lexsort((ids[q, valid], -scores[q, valid]))][:k]
        out_d[q, :len(order)] = scores[q, order]
        out_i[q, :len(order)] = ids[q, order]
    return out_d, out_i


def rerank_search(index: Any, queries: np.ndarray, k: int, rerank: int,
                  vectors: StoredVectors) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by exact inner product among the index's top ``rerank * k`` candidates."""
    _, ids = index.search(queries, k * rerank)
    return top_k(vectors.score(queries, ids), ids, k)


CANDIDATE_SCAN_FACTOR = 4  # two-stage on a binary IVF: probe lists holding ~4x the candidates


def _candidate_params(binary_index: Any, candidates: int) -> Any:
    """Per-call IVF parameters that let a binary IVF return ``candidates`` rows: its
    tuned nprobe serves top-10, a prefilter of C candidates needs lists holding ~4C."""
    inner = _inner_index(binary_index, True)
    if not isinstance(inner, faiss.IndexBinaryIVF) or inner.ntotal == 0:
        return None
    per_list = inner.ntotal / inner.nlist
    nprobe = min(int(inner.nlist), max(int(inner.nprobe), math.ceil(CANDIDATE_SCAN_FACTOR * candidates / per_list)))
    params = faiss.SearchParametersIVF()
    params.nprobe = nprobe
    return params


def two_stage_search(binary_index: Any, queries: np.ndarray, codes: np.ndarray, k: int, candidates: int,
                     vectors: StoredVectors) -> tuple[np.ndarray, np.ndarray]:
    """Hamming top-``candidates`` from the binary index, re-scored exactly: top-k by inner product."""
    candidates = max(k, candidates)
    params = _candidate_params(binary_index, candidates)
    if params is None:
        _, ids = binary_index.search(codes, candidates)
    else:
        _, ids = binary_index.search(codes, candidates, params=params)
    return top_k(vectors.score(queries, ids), ids, k)
