"""Sharded FAISS index versions built from embedding rows (SPEC 4.2, 4.4).

``build_version`` reads the rows in a few streaming passes (pyarrow RecordBatches,
never all vectors at once). Besides 10 bytes per row (segment id, modality) it
holds the training and recall samples and the shards of one group in memory:

1. scan: segment ids and modalities of every row (to dedupe and plan shards), and
   a seeded bottom-k sample per modality: held-out recall queries and training rows;
2. choose the float and binary index per modality under ``memory_budget_bytes``
   and the recall target (``index_choice``), and train one template of each on the
   sample: every shard of the modality clones it (trained once);
3. per group of shards (as many as the budget holds at once; one group when the
   chooser sized the version), one pass adding vectors with their segment ids to
   all shards of the group in parallel threads (faiss releases the GIL; a bounded
   chunk per shard is buffered), writing each shard's float16 vectors to disk and
   computing exact top-10 neighbours of the recall queries chunk by chunk; then
   tune nprobe / efSearch / nflip / rerank, measure recall@10 and write the files;
4. upload every file through ``storage``, then ``manifest.json``, then (when
   publishing) LATEST.

Shards: one float and one binary index per modality, split into contiguous
segment-id ranges when a modality holds more than ``max_shard_vectors`` rows. Each
shard's float16 vectors (``*.vectors.npy``, rows located through the id map's
``vector_row`` column) serve product-quantized re-ranking and two-stage search.
Index ids are segment ids; a segment id seen twice is indexed once (its first row).
The same rows in the same order give the same shard files (the seed fixes the samples).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import re
import resource
import shutil
import sys
import tempfile
import time
import types
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from xmodal_index.sinks.index import manifest as mf
from xmodal_index.sinks import storage
from xmodal_index.sinks.embeddings_io import embedding_matrix, hash_matrix
from xmodal_index.sinks.errors import SinkError
from xmodal_index.sinks.index.choice import (  # noqa: F401 - choose_factories is re-exported
    BINARY_TRAIN_PER_LIST,
    DEFAULT_MEMORY_BUDGET_BYTES,
    IndexChoice,
    IndexChoiceError,
    choose_factories,
    choose_index,
    tune_search_params,
    uses_product_quantizer,
)
from xmodal_index.sinks.index.search import RERANK_PARAM, StoredVectors, rerank_search

logger = logging.getLogger(__name__)

METRICS = ("ip",)
RECALL_K = 10
ADD_CHUNK_ROWS = 16_384  # rows buffered per pass before they go to the shards' add threads
MIN_CHUNK_ROWS = 4_096
_MODALITY_RE = re.compile(r"[a-z0-9_]+")
_RESERVED_NAMES = (mf.MANIFEST_NAME, mf.LATEST_NAME)
_REQUIRED_COLUMNS = ("segment_id", "uri", "etag", "modality", "start_s", "end_s", "embedding", "hash_code")

ProgressFn = Callable[[str, int, int], None]
_NO_FILES: Mapping[str, str] = types.MappingProxyType({})
_NO_METRICS: Mapping[str, Any] = types.MappingProxyType({})


class IndexBuildError(SinkError):
    """An index version could not be built from the given rows."""


class EmptyIndexError(IndexBuildError):
    """The input holds no rows: nothing is published."""


@dataclasses.dataclass(frozen=True)
class IndexBuildConfig:
    """How shards are chosen, built, tuned and measured.

    float_factory / binary_factory: a faiss index_factory string, or "auto" (chosen
    by ``index_choice.choose_index`` from the vector count, dimension, memory budget
    and recall target). metric: "ip" (rows are L2-normalised: inner product = cosine).
    memory_budget_bytes: RAM the loaded version may take on a query node (float and
    binary indexes of all shards); also bounds the shards one build pass holds.
    recall_target: recall@10 against exact search that tuning aims for.
    nprobe / ef_search: search parameters; 0 tunes them on the held-out queries to
    the smallest value reaching ``recall_target``. recall_sample: held-out queries
    per modality for recall@10; train_sample: training rows per modality.
    store_vectors: keep a float16 copy of each shard's vectors (2 bytes x dim per
    vector on disk) for re-ranking product-quantized shards and two-stage search.
    add_threads: shards of one pass filled in parallel (0 = the CPU count).
    """

    float_factory: str = "auto"
    binary_factory: str = "auto"
    metric: str = "ip"
    max_shard_vectors: int = 1_000_000
    nprobe: int = 0
    ef_search: int = 0
    recall_sample: int = 1000
    train_sample: int = 100_000
    seed: int = 0
    recall_target: float = 0.95
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES
    store_vectors: bool = True
    add_threads: int = 0

    def __post_init__(self) -> None:
        if not self.float_factory.strip():
            raise ValueError(f"{self.float_factory = } must be 'auto' or a faiss index_factory string")
        if not self.binary_factory.strip():
            raise ValueError(f"{self.binary_factory = } must be 'auto' or a faiss binary index_factory string")
        if self.metric not in METRICS:
            raise ValueError(f"{self.metric = } must be one of {METRICS}")
        if self.max_shard_vectors <= 0:
            raise ValueError(f"{self.max_shard_vectors = } must be > 0")
        if self.nprobe < 0:
            raise ValueError(f"{self.nprobe = } must be >= 0 (0 = tuned)")
        if self.ef_search < 0:
            raise ValueError(f"{self.ef_search = } must be >= 0 (0 = tuned)")
        if self.recall_sample < 0:
            raise ValueError(f"{self.recall_sample = } must be >= 0")
        if self.train_sample <= 0:
            raise ValueError(f"{self.train_sample = } must be > 0")
        if not 0.0 < self.recall_target <= 1.0:
            raise ValueError(f"{self.recall_target = } must be in (0, 1]")
        if self.memory_budget_bytes <= 0:
            raise ValueError(f"{self.memory_budget_bytes = } must be > 0 (bytes)")
        if self.add_threads < 0:
            raise ValueError(f"{self.add_threads = } must be >= 0 (0 = the CPU count)")


# ---------------------------------------------------------------- progress


class _Progress:
    """Calls the user's callback and logs done/total, rate and ETA every few seconds."""

    def __init__(self, callback: ProgressFn | None, log_every_s: float = 10.0) -> None:
        self._callback = callback
        self._log_every_s = log_every_s
        self._started: dict[str, float] = {}
        self._last_log: dict[str, float] = {}
        self._last_call = time.monotonic()

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if stage not in self._started:  # a stage starts where the previous report left off
            self._started[stage] = self._last_log[stage] = self._last_call
        self._last_call = now
        if now - self._last_log[stage] >= self._log_every_s or (total and done >= total):
            self._last_log[stage] = now
            elapsed = now - self._started[stage]
            speed = ""
            if elapsed >= 1.0 and done:
                rate = done / elapsed
                speed = f", {rate:.0f}/s" + (f", ETA {(total - done) / rate:.0f} s" if total else "")
            logger.info("index build %s: %d/%s%s", stage, done, total or "?", speed)
        if self._callback is not None:
            self._callback(stage, done, total)


# ---------------------------------------------------------------- scan pass


def _priority(ids: np.ndarray, seed: int) -> np.ndarray:
    """A seeded 64-bit hash of each id (splitmix64): the sample order."""
    z = ids.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFF_FFFF_FFFF_FFFF)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class _Sample:
    """Bottom-k rows of one modality by priority: order-independent and seeded.

    Rows live in preallocated slots (the pages are touched only as rows arrive); a row
    that drops out of the bottom k is overwritten in place, so the sample never holds
    a second copy of itself.
    """

    def __init__(self, capacity: int, dim: int, nbytes: int) -> None:
        self.capacity = capacity
        self.filled = 0
        self.max_prio = np.uint64(0)
        self.ids = np.empty(capacity, np.int64)
        self.prio = np.empty(capacity, np.uint64)
        self.x = np.empty((capacity, dim), np.float32)
        self.codes = np.empty((capacity, nbytes), np.uint8)

    def offer(self, batch: pa.RecordBatch, rows: np.ndarray, ids: np.ndarray, prio: np.ndarray) -> None:
        if self.filled >= self.capacity:
            rows = rows[prio[rows] < self.max_prio]
        if not len(rows):
            return
        old = self.filled
        ids_all = np.concatenate([self.ids[:old], ids[rows]])
        prio_all = np.concatenate([self.prio[:old], prio[rows]])
        _, first = np.unique(ids_all, return_index=True)  # a segment id already sampled keeps its row
        keep = first[np.lexsort((ids_all[first], prio_all[first]))][: self.capacity]
        kept_old = np.zeros(old, bool)
        kept_old[keep[keep < old]] = True
        new = keep[keep >= old] - old
        # Rows are evicted only when more than `capacity` compete, and then exactly as many
        # new rows arrive as slots free up: the filled slots stay 0 .. filled - 1.
        slots = np.concatenate([np.nonzero(~kept_old)[0], np.arange(old, self.capacity)])[: len(new)]
        taken = pa.array(rows[new])
        self.x[slots] = embedding_matrix(batch.column("embedding").take(taken))
        self.codes[slots] = hash_matrix(batch.column("hash_code").take(taken))
        self.ids[slots] = ids[rows[new]]
        self.prio[slots] = prio[rows[new]]
        self.filled = int(kept_old.sum()) + len(new)
        self.max_prio = self.prio[: self.filled].max()

    def arrange(self, queries: int) -> None:
        """Move the ``queries`` lowest-priority rows (the held-out recall queries, by
        priority then id) to the front, in that order; the training rows follow."""
        n = self.filled
        fields = (self.x, self.codes, self.ids, self.prio)
        order = np.lexsort((self.ids[:n], self.prio[:n]))[:queries]
        in_front = np.zeros(n, bool)
        in_front[order] = True
        incoming, outgoing = order[order >= queries], np.nonzero(~in_front[:queries])[0]
        for a in fields:
            moved = a[incoming].copy()
            a[incoming] = a[outgoing]
            a[outgoing] = moved
        local = np.lexsort((self.ids[:queries], self.prio[:queries]))
        for a in fields:
            a[:queries] = a[:queries][local]


@dataclasses.dataclass
class _Scan:
    unique_ids: np.ndarray  # sorted int64
    modality_code: np.ndarray  # int per unique id, index into modalities
    modalities: list[str]
    rows: int
    samples: dict[str, _Sample]


def _check_batch(batch: pa.RecordBatch, dim: int, bits: int, model_id: str) -> None:
    names = batch.schema.names
    missing = [c for c in _REQUIRED_COLUMNS if c not in names]
    if missing:
        raise IndexBuildError(f"embedding rows lack columns {missing}")
    emb_type = batch.schema.field("embedding").type
    if not pa.types.is_fixed_size_list(emb_type) or emb_type.list_size != dim:
        raise IndexBuildError(f"embedding column is {emb_type}, expected a fixed-size list of {dim} floats ({dim = })")
    code_type = batch.schema.field("hash_code").type
    if not pa.types.is_fixed_size_binary(code_type) or code_type.byte_width * 8 != bits:
        raise IndexBuildError(f"hash_code column is {code_type}, expected fixed_size_binary({bits // 8}) ({bits = })")
    if batch.column("segment_id").null_count:
        raise IndexBuildError("embedding rows with a null segment_id")
    if "model_id" in names:
        other = pc.unique(pc.filter(batch.column("model_id"), pc.not_equal(batch.column("model_id"), model_id)))
        if len(other):
            raise IndexBuildError(
                f"rows of model {other[0].as_py()!r} in a build for {model_id!r}: filter the input by model_id"
            )


def _scan(batches: Callable[[], Iterator[pa.RecordBatch]], dim: int, bits: int, model_id: str,
          config: IndexBuildConfig, progress: _Progress) -> _Scan:
    capacity = config.recall_sample + config.train_sample
    modalities: list[str] = []
    samples: dict[str, _Sample] = {}
    id_parts: list[np.ndarray] = []
    code_parts: list[np.ndarray] = []
    rows = 0
    for batch in batches():
        if not batch.num_rows:
            continue
        _check_batch(batch, dim, bits, model_id)
        ids = batch.column("segment_id").to_numpy()
        modality_col = batch.column("modality")
        for value in pc.unique(modality_col).to_pylist():
            if value is None or not _MODALITY_RE.fullmatch(value):
                raise IndexBuildError(f"modality {value!r} is not a lowercase name")
            if value not in samples:
                modalities.append(value)
                samples[value] = _Sample(capacity, dim, bits // 8)
        codes = pc.index_in(modality_col, value_set=pa.array(modalities)).to_numpy()
        prio = _priority(ids, config.seed)
        for code, name in enumerate(modalities):
            sel = np.nonzero(codes == code)[0]
            if len(sel):
                samples[name].offer(batch, sel, ids, prio)
        id_parts.append(ids.astype(np.int64, copy=False))
        code_parts.append(codes.astype(np.int16))
        rows += batch.num_rows
        progress("scan", rows, 0)
    _release_arrow_memory()
    if rows == 0:
        raise EmptyIndexError("no embedding rows to index: refusing to publish an empty version")
    all_ids = np.concatenate(id_parts)
    unique_ids, first = np.unique(all_ids, return_index=True)
    modality_code = np.concatenate(code_parts)[first]
    return _Scan(unique_ids, modality_code, modalities, rows, samples)


# ---------------------------------------------------------------- shards


@dataclasses.dataclass
class _ShardPlan:
    modality: str
    index: int
    of: int
    count: int

    @property
    def stem(self) -> str:
        return f"shard-{self.modality}-{self.index:05d}-of-{self.of:05d}"


def _plan_shards(scan: _Scan, max_shard_vectors: int) -> tuple[list[_ShardPlan], np.ndarray]:
    """Split each modality into contiguous id ranges; returns plans and shard-of-unique-id."""
    plans: list[_ShardPlan] = []
    shard_of = np.empty(len(scan.unique_ids), np.int32)
    for code, modality in enumerate(scan.modalities):
        where = np.nonzero(scan.modality_code == code)[0]
        n = len(where)
        nshards = -(-n // max_shard_vectors)
        local = (np.arange(n, dtype=np.int64) * nshards) // n
        shard_of[where] = len(plans) + local
        counts = np.bincount(local, minlength=nshards)
        plans.extend(_ShardPlan(modality, i, nshards, int(counts[i])) for i in range(nshards))
    return plans, shard_of


def _group_shards(plans: list[_ShardPlan], choices: Mapping[str, IndexChoice], config: IndexBuildConfig
                  ) -> list[list[int]]:
    """Consecutive shards filled in one pass: as many as memory_budget_bytes holds by the
    chooser's estimate, else (sizes unknown) as many as max_shard_vectors vectors."""
    def size(plan: _ShardPlan) -> float | None:
        c = choices[plan.modality]
        if c.bytes_per_vector is None or c.bytes_per_shard is None:
            return None
        return c.bytes_per_vector * plan.count + c.bytes_per_shard

    sizes = [size(p) for p in plans]
    if any(s is None for s in sizes):
        sizes = [float(p.count) for p in plans]
        budget = float(max(config.max_shard_vectors, max(p.count for p in plans)))
    else:
        budget = float(config.memory_budget_bytes)
    groups: list[list[int]] = [[]]
    total = 0.0
    for i, s in enumerate(sizes):
        if groups[-1] and total + s > budget:
            groups.append([])
            total = 0.0
        groups[-1].append(i)
        total += s
    return groups


@dataclasses.dataclass
class _Templates:
    float_index: Any
    binary_index: Any
    float_factory: str
    binary_factory: str
    choice: IndexChoice


def _make_float(factory: str, dim: int) -> Any:
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise IndexBuildError(f"float index factory {factory!r} is invalid for {dim = }: {err}") from err
    if faiss.try_extract_index_ivf(index) is None and not isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        index = faiss.IndexIDMap(index)
    return index


def _make_binary(factory: str, bits: int) -> Any:
    try:
        index = faiss.index_binary_factory(bits, factory)
    except RuntimeError as err:
        raise IndexBuildError(f"binary index factory {factory!r} is invalid for {bits = }: {err}") from err
    keeps_ids = (faiss.IndexBinaryIVF, faiss.IndexBinaryHash, faiss.IndexBinaryMultiHash, faiss.IndexBinaryIDMap,
                 faiss.IndexBinaryIDMap2)
    if not isinstance(index, keeps_ids):
        index = faiss.IndexBinaryIDMap(index)
    return index


def _needed_training_rows(index: Any, kind: str) -> int:
    """Rows below which training the index fails: IVF lists, or 256 PQ / SQ codebook entries."""
    if kind == "binary":
        return int(getattr(index, "nlist", 1))
    ivf = faiss.try_extract_index_ivf(index)
    need = int(ivf.nlist) if ivf is not None else 1
    if ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ):
        need = max(need, 1 << int(faiss.downcast_index(ivf).pq.nbits))
    return need


def _trained(kind: str, factory: str, n: int, modality: str, held_out: np.ndarray, sample: np.ndarray,
             make: Callable[[str], Any]) -> tuple[str, Any]:
    """A trained empty index: on the training rows, on the whole sample when they are
    too few for the index's lists, or an exact index when even that is too small."""
    index = make(factory)
    if index.is_trained:
        return factory, index
    need = _needed_training_rows(index, kind)
    data = held_out if len(held_out) >= need else sample
    if kind == "binary":  # the caller shuffled the rows: a prefix is a random subset
        data = data[:max(need, BINARY_TRAIN_PER_LIST * need)]
    if len(data) < need:
        exact = "Flat" if kind == "float" else "BFlat"
        logger.warning("%s %s shards of %d rows are too small to train %r: using %s", modality, kind, n, factory, exact)
        return exact, make(exact)
    started = time.monotonic()
    try:
        index.train(np.ascontiguousarray(data))
    except RuntimeError as err:
        raise IndexBuildError(f"training {kind} index {factory!r} for modality {modality!r} "
                              f"on {len(data)} rows failed: {err}") from err
    logger.info("trained %s %s index %s on %d rows in %.1f s", modality, kind, factory, len(data),
                time.monotonic() - started)
    return factory, index


def _train_templates(modality: str, n: int, sample: _Sample, nqueries: int, dim: int, bits: int,
                     config: IndexBuildConfig, total_vectors: int, shards: int) -> _Templates:
    choice = choose_index(n, dim, bits, memory_budget_bytes=config.memory_budget_bytes,
                          recall_target=config.recall_target, train_rows=min(config.train_sample, sample.filled),
                          total_vectors=total_vectors, shards=shards, float_factory=config.float_factory,
                          binary_factory=config.binary_factory)
    over = choice.estimated_bytes is not None and choice.estimated_bytes > config.memory_budget_bytes
    (logger.warning if over else logger.info)("%s: %s", modality, choice.reason)
    filled = sample.filled
    float_factory, float_index = _trained("float", choice.float_factory, n, modality, sample.x[nqueries:filled],
                                          sample.x[:filled], lambda f: _make_float(f, dim))
    # the training rows are in slot order: shuffle (seeded) before binary training takes a prefix
    shuffled = nqueries + np.random.default_rng(config.seed).permutation(filled - nqueries)
    binary_factory, binary_index = _trained("binary", choice.binary_factory, n, modality, sample.codes[shuffled],
                                            sample.codes[:filled], lambda f: _make_binary(f, bits))
    if (float_factory, binary_factory) != (choice.float_factory, choice.binary_factory):
        choice = dataclasses.replace(choice, float_factory=float_factory, binary_factory=binary_factory,
                                     reason=choice.reason + "; too few rows to train: exact search instead")
    return _Templates(float_index, binary_index, float_factory, binary_factory, choice)


def _id_map_table(batch: pa.RecordBatch) -> pa.Table:
    table = pa.Table.from_batches([batch])
    if "text" not in table.column_names:
        table = table.append_column("text", pa.nulls(len(table), pa.string()))
    return table.select(list(mf.ID_MAP_COLUMNS))


@dataclasses.dataclass
class _ShardResult:
    plan: _ShardPlan
    ntotal: int
    files: dict[str, str]  # kind ("float" | "binary" | "ids" | "vectors") -> local path
    factories: dict[str, str]
    search_params: dict[str, dict[str, int]]
    recall: dict[str, float | None]
    weight: dict[str, int]  # exact neighbours the recall counted (weights in a modality's mean)


# ---------------------------------------------------------------- recall


def _recall_of(found: np.ndarray, exact_ids: np.ndarray | list[np.ndarray]) -> float:
    """|found ∩ wanted| / |wanted| summed over the queries; wanted: each query's exact
    top-k, or the part of the modality's exact top-k that this shard holds."""
    hits = total = 0
    for got, want in zip(found, exact_ids):
        want = want[want >= 0]
        total += len(want)
        hits += len(np.intersect1d(got[got >= 0], want))
    return hits / total if total else 1.0


def _wanted_count(exact_ids: np.ndarray | list[np.ndarray]) -> int:
    return int(sum(int((w >= 0).sum()) for w in exact_ids))


def _modality_exact(builders: list["_ShardBuilder"]) -> np.ndarray:
    """Exact top-10 ids over all shards of one modality, merged from the shards' own."""
    dist = np.concatenate([b.exact_top()[0] for b in builders], axis=1)
    ids = np.concatenate([b.exact_top()[1] for b in builders], axis=1)
    dist = np.where(ids >= 0, dist, -np.inf)
    order = np.argsort(-dist, axis=1, kind="stable")[:, :RECALL_K]
    return np.take_along_axis(ids, order, axis=1)


def _shares(modality_exact: np.ndarray, shard_exact: np.ndarray) -> list[np.ndarray]:
    """Per query, the modality's exact top-10 ids that this shard holds (they are
    necessarily among the shard's own exact top-10)."""
    return [g[np.isin(g, s[s >= 0]) & (g >= 0)] for g, s in zip(modality_exact, shard_exact)]


def _float_recall(index: Any, queries: np.ndarray, exact_ids: np.ndarray, vectors: StoredVectors | None,
                  params: Mapping[str, int]) -> float:
    rerank = int(params.get(RERANK_PARAM, 0))
    if rerank > 1 and vectors is not None:
        _, found = rerank_search(index, queries, RECALL_K, rerank, vectors)
    else:
        _, found = index.search(queries, RECALL_K)
    return _recall_of(found, exact_ids)


def _hamming_recall(index: Any, codes: np.ndarray, exact_dist: np.ndarray, exact_ids: np.ndarray,
                    params: Mapping[str, int]) -> float:
    """Like _float_recall, but any result at most as far as the exact k-th neighbour
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


# ---------------------------------------------------------------- one shard


def _npy_header(f: BinaryIO, rows: int, dim: int) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f2")), "fortran_order": False, "shape": (rows, dim)}
    np.lib.format.write_array_header_1_0(f, header)


class _ShardBuilder:
    """One shard while rows stream in: float + binary index, id map, stored vectors,
    exact neighbours of the recall queries. Chunks are added on a worker thread, one
    at a time per shard, while the next chunk is read."""

    def __init__(self, plan: _ShardPlan, templates: _Templates, queries: tuple[np.ndarray, np.ndarray],
                 out_dir: str, chunk_rows: int, omp_threads: int, store_vectors: bool,
                 pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self.plan = plan
        self.templates = templates
        self.float_index = faiss.clone_index(templates.float_index)
        # clone_binary_index cannot copy every binary index type: round-trip through bytes instead.
        self.binary_index = faiss.deserialize_index_binary(faiss.serialize_index_binary(templates.binary_index))
        self.query_x, self.query_codes = queries
        nq = len(self.query_x)
        self.exact = faiss.ResultHeap(nq, RECALL_K, keep_max=True) if nq else None
        self.exact_hamming = faiss.ResultHeap(nq, RECALL_K, keep_max=False) if nq else None
        self.exact_final = False
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.pending_rows = 0
        self.rows_seen = 0
        self.id_maps: list[pa.Table] = []
        self.chunk_rows = chunk_rows
        self.omp_threads = omp_threads
        self.pool = pool
        self.future: concurrent.futures.Future | None = None
        # Plain IVF indexes get an assignment pass first: their inverted lists are then
        # allocated at their final sizes (appending grows them up to 2x) and the add
        # pass reuses the assignments instead of searching the quantizer again.
        inner = faiss.downcast_index(self.float_index)
        self.ivf = inner if isinstance(inner, faiss.IndexIVF) and isinstance(
            faiss.downcast_InvertedLists(inner.invlists), faiss.ArrayInvertedLists) else None
        self.assigning = False
        self.assign_parts: list[np.ndarray] = []
        self.assign: np.ndarray | None = None
        self.assign_at = 0
        self.files = {
            "float": os.path.join(out_dir, f"{plan.stem}.float.faiss"),
            "binary": os.path.join(out_dir, f"{plan.stem}.binary.faiss"),
            "ids": os.path.join(out_dir, f"{plan.stem}.ids.parquet"),
        }
        self.vectors_file: BinaryIO | None = None
        if store_vectors:
            self.files["vectors"] = os.path.join(out_dir, f"{plan.stem}.vectors.npy")
            self.vectors_file = open(self.files["vectors"], "wb")
            _npy_header(self.vectors_file, plan.count, int(templates.float_index.d))

    def start_assigning(self) -> None:
        self.assigning = True

    def reserve(self) -> None:
        """End the assignment pass: size every inverted list for the rows it will get."""
        self.assigning = False
        if not self.assign_parts:
            return
        self.assign = np.concatenate(self.assign_parts).astype(np.int64)
        self.assign_parts = []
        counts = np.bincount(self.assign, minlength=int(self.ivf.nlist))
        invlists = faiss.downcast_InvertedLists(self.ivf.invlists)
        for list_no in np.nonzero(counts)[0].tolist():
            invlists.resize(list_no, int(counts[list_no]))  # allocates the final size ...
            invlists.resize(list_no, 0)  # ... and keeps it as capacity

    def add(self, ids: np.ndarray, x: np.ndarray, codes: np.ndarray, id_map: pa.Table | None) -> None:
        if not self.assigning:
            rows = pa.array(np.arange(self.rows_seen, self.rows_seen + len(ids), dtype=np.int64))
            self.id_maps.append(id_map.append_column(mf.VECTOR_ROW_COLUMN, rows))
            self.rows_seen += len(ids)
        self.pending.append((ids, x, codes))
        self.pending_rows += len(ids)
        if self.pending_rows >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        """Hand the buffered rows to the worker (after the previous chunk is in)."""
        if not self.pending:
            return
        ids = np.ascontiguousarray(np.concatenate([p[0] for p in self.pending]), dtype=np.int64)
        x = np.ascontiguousarray(np.concatenate([p[1] for p in self.pending]))
        codes = None if self.assigning else np.ascontiguousarray(np.concatenate([p[2] for p in self.pending]))
        self.pending, self.pending_rows = [], 0
        self.wait()
        self.future = self.pool.submit(self._add_chunk, ids, x, codes)

    def wait(self) -> None:
        if self.future is not None:
            future, self.future = self.future, None
            future.result()

    def _add_chunk(self, ids: np.ndarray, x: np.ndarray, codes: np.ndarray) -> None:
        faiss.omp_set_num_threads(self.omp_threads)  # per worker thread: shards share the cores
        if self.assigning:
            self.assign_parts.append(self.ivf.quantizer.assign(x, 1).ravel())
            return
        if self.assign is not None:
            lists = np.ascontiguousarray(self.assign[self.assign_at:self.assign_at + len(ids)])
            self.assign_at += len(ids)
            self.ivf.add_core(len(ids), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
        else:
            self.float_index.add_with_ids(x, ids)
        self.binary_index.add_with_ids(codes, ids)
        if self.vectors_file is not None:
            self.vectors_file.write(x.astype("<f2").tobytes())
        if self.exact is not None:
            k = min(RECALL_K, len(ids))
            dist, pos = faiss.knn(self.query_x, x, k, metric=faiss.METRIC_INNER_PRODUCT)
            self.exact.add_result(dist, ids[pos])
            dist, pos = faiss.knn_hamming(self.query_codes, codes, k)
            self.exact_hamming.add_result(dist.astype(np.float32), ids[pos])

    def abort(self) -> None:
        try:
            self.wait()
        except Exception:  # noqa: BLE001 - the build is failing already; the first error is raised
            pass
        if self.vectors_file is not None:
            self.vectors_file.close()

    def exact_top(self) -> tuple[np.ndarray, np.ndarray]:
        """The shard's exact top-10 (scores, ids) of the recall queries, once all rows are in."""
        if not self.exact_final:
            self.exact.finalize()
            self.exact_hamming.finalize()
            self.exact_final = True
        return self.exact.D, self.exact.I

    def finish(self, config: IndexBuildConfig, wanted: list[np.ndarray] | None = None) -> _ShardResult:
        """Tune, measure and write the shard (runs on a worker thread after flush + wait).

        wanted: per recall query, the ids of the modality's exact top-10 this shard
        holds (all shards of the modality filled in this pass); None: the shard's own
        exact top-10 (each shard must then find its own ten)."""
        faiss.omp_set_num_threads(self.omp_threads)
        plan, files = self.plan, self.files
        if self.vectors_file is not None:
            self.vectors_file.close()
        if self.float_index.ntotal != plan.count or self.binary_index.ntotal != plan.count:
            raise IndexBuildError(f"shard {plan.stem}: the scan counted {plan.count} rows but "
                                  f"{self.float_index.ntotal} arrived: the input changed between passes")
        id_map = pa.concat_tables(self.id_maps).sort_by("segment_id")
        self.id_maps = []
        vectors = None
        if "vectors" in files:
            vectors = StoredVectors.open(files["vectors"], id_map.column("segment_id").to_numpy(),
                                         id_map.column(mf.VECTOR_ROW_COLUMN).to_numpy())
        float_measure = hamming_measure = None
        weight = {"float": 0, "binary": 0}
        if self.exact is not None:
            exact_ids = self.exact_top()[1] if wanted is None else wanted
            weight = {"float": _wanted_count(exact_ids), "binary": _wanted_count(self.exact_hamming.I)}
            float_measure = functools.partial(_float_recall, self.float_index, self.query_x, exact_ids, vectors)
            hamming_measure = functools.partial(_hamming_recall, self.binary_index, self.query_codes,
                                                self.exact_hamming.D, self.exact_hamming.I)
        fixed = {"nprobe": config.nprobe, "efSearch": config.ef_search}
        float_params, float_recall = tune_search_params(
            self.float_index, binary=False, recall_target=config.recall_target, fixed=fixed, measure=float_measure,
            rerank=vectors is not None and uses_product_quantizer(self.templates.float_factory))
        binary_params, binary_recall = tune_search_params(
            self.binary_index, binary=True, recall_target=config.recall_target, fixed=fixed, measure=hamming_measure)
        del vectors
        faiss.write_index(self.float_index, files["float"])
        faiss.write_index_binary(self.binary_index, files["binary"])
        pq.write_table(id_map, files["ids"], compression="zstd")
        self.float_index = self.binary_index = None
        logger.info("shard %s: %d vectors, float %s %s recall@10 %s, binary %s %s recall@10 %s", plan.stem,
                    plan.count, self.templates.float_factory, float_params, _fmt(float_recall),
                    self.templates.binary_factory, binary_params, _fmt(binary_recall))
        return _ShardResult(
            plan=plan,
            ntotal=plan.count,
            files=files,
            factories={"float": self.templates.float_factory, "binary": self.templates.binary_factory},
            search_params={"float": float_params, "binary": binary_params},
            recall={"float": float_recall, "binary": binary_recall},
            weight=weight,
        )


def _fmt(recall: float | None) -> str:
    return "n/a" if recall is None else f"{recall:.4f}"


# ---------------------------------------------------------------- build


def _add_and_write(batches: Callable[[], Iterator[pa.RecordBatch]], scan: _Scan, plans: list[_ShardPlan],
                   shard_of: np.ndarray, templates: dict[str, _Templates],
                   queries: dict[str, tuple[np.ndarray, np.ndarray]], out_dir: str, config: IndexBuildConfig,
                   progress: _Progress) -> tuple[list[_ShardResult], int]:
    """Fill and write every shard, one group per pass; returns the results and the pass count."""
    taken = np.zeros(len(scan.unique_ids), bool)  # dedupe: the first row of each segment_id wins
    results: list[_ShardResult] = []
    added = 0
    cores = os.cpu_count() or 1
    groups = _group_shards(plans, {m: t.choice for m, t in templates.items()}, config)
    extra_passes = 0
    for group in groups:
        in_group = np.zeros(len(plans), bool)
        in_group[group] = True
        workers = max(1, min(len(group), config.add_threads or cores))
        chunk_rows = max(MIN_CHUNK_ROWS, ADD_CHUNK_ROWS // len(group))
        omp_threads = max(1, cores // workers)
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="shard-add") as pool:
            builders = {i: _ShardBuilder(plans[i], templates[plans[i].modality], queries[plans[i].modality],
                                         out_dir, chunk_rows, omp_threads, config.store_vectors, pool) for i in group}
            try:
                if any(b.ivf is not None for b in builders.values()):
                    assigning = [b for b in builders.values() if b.ivf is not None]
                    for builder in assigning:
                        builder.start_assigning()
                    _fill(batches, scan, shard_of, in_group, taken.copy(), builders, 0, progress, "assign",
                          only={id(b) for b in assigning})
                    _drain(builders.values())
                    for builder in assigning:
                        builder.reserve()
                    extra_passes += 1
                added = _fill(batches, scan, shard_of, in_group, taken, builders, added, progress)
                _drain(builders.values())
                wanted = _wanted_by_shard(plans, group, builders)
                futures = [pool.submit(builders[i].finish, config, wanted.get(i)) for i in group]
                for future in futures:
                    results.append(future.result())
                    progress("write", len(results), len(plans))
            except BaseException:
                for builder in builders.values():
                    builder.abort()
                raise
    return results, len(groups) + extra_passes


def _wanted_by_shard(plans: list[_ShardPlan], group: list[int], builders: dict[int, _ShardBuilder]
                     ) -> dict[int, list[np.ndarray]]:
    """For modalities whose shards all fill in this group: what each shard must find of
    the modality's exact top-10 (the merged search needs no more than that)."""
    out: dict[int, list[np.ndarray]] = {}
    for modality in {plans[i].modality for i in group}:
        members = [i for i in group if plans[i].modality == modality]
        if len(members) < 2 or len(members) != plans[members[0]].of or builders[members[0]].exact is None:
            continue
        merged = _modality_exact([builders[i] for i in members])
        for i in members:
            out[i] = _shares(merged, builders[i].exact_top()[1])
    return out


def _drain(builders: Iterable[_ShardBuilder]) -> None:
    builders = list(builders)
    for builder in builders:
        builder.flush()
    for builder in builders:
        builder.wait()


def _fill(batches: Callable[[], Iterator[pa.RecordBatch]], scan: _Scan, shard_of: np.ndarray, in_group: np.ndarray,
          taken: np.ndarray, builders: dict[int, _ShardBuilder], added: int, progress: _Progress,
          stage: str = "add", only: set[int] | None = None) -> int:
    """One pass over the rows: each row of a shard in this group goes to its builder
    (in the assignment pass only to the builders in ``only``, vectors alone)."""
    for batch in batches():
        if not batch.num_rows:
            continue
        ids = batch.column("segment_id").to_numpy()
        pos = np.minimum(np.searchsorted(scan.unique_ids, ids), len(scan.unique_ids) - 1)
        unseen = scan.unique_ids[pos] != ids
        if unseen.any():
            raise IndexBuildError(f"segment_id {int(ids[unseen][0])} was not in the scan pass: "
                                  "the input changed between passes")
        shard = shard_of[pos]
        rows = np.nonzero(in_group[shard] & ~taken[pos])[0]
        if not len(rows):
            continue
        _, first = np.unique(pos[rows], return_index=True)
        rows = rows[np.sort(first)]
        taken[pos[rows]] = True
        sub = batch if len(rows) == batch.num_rows else batch.take(pa.array(rows))
        x = embedding_matrix(sub.column("embedding"))
        sub_ids, sub_shard = ids[rows], shard[rows]
        assigning = stage == "assign"
        codes = None if assigning else hash_matrix(sub.column("hash_code"))
        id_map = None if assigning else _id_map_table(sub)
        shards_here = np.unique(sub_shard)
        for s in shards_here:
            builder = builders[int(s)]
            if assigning and id(builder) not in only:
                continue
            if len(shards_here) == 1:  # the usual case: the whole batch, no copies
                builder.add(sub_ids, x, codes, id_map)
                continue
            sel = np.nonzero(sub_shard == s)[0]
            builder.add(sub_ids[sel], x[sel], None if assigning else codes[sel],
                        None if assigning else id_map.take(pa.array(sel)))
        added += len(rows)
        progress(stage, added, len(scan.unique_ids))
    _release_arrow_memory()
    return added


def _release_arrow_memory() -> None:
    """Hand the memory Arrow's allocator keeps after a pass back to the system."""
    pa.default_memory_pool().release_unused()


def _check_extra_files(extra_files: Mapping[str, str]) -> None:
    for name, path in extra_files.items():
        if "/" in name or "\\" in name or name.startswith((".", "shard-")) or name in _RESERVED_NAMES or not name:
            raise ValueError(f"extra file name {name!r} must be a plain file name, not starting with "
                             f"'.' or 'shard-', and not one of {_RESERVED_NAMES}")
        if not os.path.isfile(path):
            raise IndexBuildError(f"extra file {name!r}: {path!r} is not a file")


def _metrics(results: list[_ShardResult], scan: _Scan, queries: dict[str, tuple[np.ndarray, np.ndarray]],
             metrics_extra: Mapping[str, Any]) -> dict[str, Any]:
    by_modality: dict[str, dict[str, list[tuple[float, int]]]] = {"float": {}, "binary": {}}
    for r in results:
        for kind in ("float", "binary"):
            if r.recall[kind] is not None:
                by_modality[kind].setdefault(r.plan.modality, []).append((r.recall[kind], r.weight[kind]))

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


def _peak_rss_bytes() -> int:
    """The process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def build_version(
    batches: Callable[[], Iterator[pa.RecordBatch]],
    index_root: str,
    *,
    model_id: str,
    dim: int,
    bits: int,
    config: IndexBuildConfig,
    extra_files: Mapping[str, str] = _NO_FILES,
    metrics_extra: Mapping[str, Any] = _NO_METRICS,
    publish: bool = True,
    progress: ProgressFn | None = None,
) -> mf.Manifest:
    """Build, upload and (when ``publish``) point LATEST at a new index version.

    batches: called once per pass; each call yields RecordBatches of embedding rows
    (sinks.schema.embedding_schema). index_root: e.g. WORKDIR/indexes/NAME, any
    storage URI. extra_files: name in the version -> local path (e.g. the encoder
    checkpoint). progress(stage, done, total): stages scan, train, add, write, upload.
    publish=False uploads the version without moving LATEST (then see
    publish_gate.publish_gated or publish_version).
    Raises EmptyIndexError on zero rows, IndexBuildError on inconsistent rows,
    IndexChoiceError when no index fits memory_budget_bytes; on any failure LATEST
    keeps naming the previous version.
    """
    if dim <= 0:
        raise ValueError(f"{dim = } must be > 0")
    if bits <= 0 or bits % 8:
        raise ValueError(f"{bits = } must be a positive multiple of 8")
    _check_extra_files(extra_files)
    report = _Progress(progress)
    started = time.monotonic()
    scan = _scan(batches, dim, bits, model_id, config, report)
    scanned = time.monotonic()
    plans, shard_of = _plan_shards(scan, config.max_shard_vectors)
    templates: dict[str, _Templates] = {}
    queries: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    train_rows: dict[str, int] = {}
    for i, modality in enumerate(scan.modalities):
        sample = scan.samples.pop(modality)
        nq = min(config.recall_sample, sample.filled)
        sample.arrange(nq)
        largest = max(p.count for p in plans if p.modality == modality)
        templates[modality] = _train_templates(modality, largest, sample, nq, dim, bits, config,
                                               len(scan.unique_ids), len(plans))
        queries[modality] = (sample.x[:nq].copy(), sample.codes[:nq].copy())  # copies: the sample is freed next
        train_rows[modality] = sample.filled - nq
        del sample  # the training rows are not needed while shards fill
        report("train", i + 1, len(scan.modalities))
    trained = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="xmodal-index-build-") as tmp:
        results, passes = _add_and_write(batches, scan, plans, shard_of, templates, queries, tmp, config, report)
        added = time.monotonic()
        local: dict[str, str] = {}
        shards: list[mf.ShardEntry] = []
        id_maps: list[mf.FileEntry] = []
        vectors: list[mf.FileEntry] = []
        for r in results:
            id_entry = mf.FileEntry.of_local(r.files["ids"], os.path.basename(r.files["ids"]))
            id_maps.append(id_entry)
            local[id_entry.file] = r.files["ids"]
            vectors_name = ""
            if "vectors" in r.files:
                vec_entry = mf.FileEntry.of_local(r.files["vectors"], os.path.basename(r.files["vectors"]))
                vectors.append(vec_entry)
                local[vec_entry.file] = r.files["vectors"]
                vectors_name = vec_entry.file
            for kind in ("float", "binary"):
                entry = mf.FileEntry.of_local(r.files[kind], os.path.basename(r.files[kind]))
                local[entry.file] = r.files[kind]
                shards.append(mf.ShardEntry(
                    file=entry.file, sha256=entry.sha256, bytes=entry.bytes, ntotal=r.ntotal,
                    modality=r.plan.modality, kind=kind, id_map=id_entry.file, factory=r.factories[kind],
                    search_params=r.search_params[kind], recall_at_10=r.recall[kind], vectors=vectors_name,
                ))
        files: list[mf.FileEntry] = []
        for name, path in sorted(extra_files.items()):
            copy = os.path.join(tmp, name)
            shutil.copyfile(path, copy)
            files.append(mf.FileEntry.of_local(copy, name))
            local[name] = copy
        largest = max(scan.modalities, key=lambda m: sum(r.ntotal for r in results if r.plan.modality == m))
        search_params: dict[str, int] = {}
        for shard in shards:
            for name, value in shard.search_params.items():
                search_params[name] = max(search_params.get(name, 0), int(value))
        parent = mf.read_latest(index_root)
        version = mf.next_version(index_root)
        index_bytes = sum(s.bytes for s in shards)
        manifest = mf.Manifest(
            version=version,
            created_at=mf.utc_now_iso(),
            parent_version=parent,
            model_id=model_id,
            dim=dim,
            bits=bits,
            metric=config.metric,
            index_factory={"float": templates[largest].float_factory, "binary": templates[largest].binary_factory},
            shards=tuple(shards),
            id_maps=tuple(id_maps),
            files=tuple(files),
            ntotal=len(scan.unique_ids),
            metrics=_metrics(results, scan, queries, metrics_extra),
            search_params=search_params,
            build_config=dataclasses.asdict(config),
            vectors=tuple(vectors),
            index_choice={m: t.choice.to_dict() for m, t in templates.items()},
            build_stats={
                "scan_s": round(scanned - started, 3),
                "train_s": round(trained - scanned, 3),
                "add_s": round(added - trained, 3),
                "passes": 1 + passes,
                "train_rows": train_rows,
                "index_bytes": index_bytes,
                "vectors_bytes": sum(v.bytes for v in vectors),
                "process_peak_rss_bytes": _peak_rss_bytes(),
            },
        )
        names = sorted(local)
        for i, name in enumerate(names):
            storage.put_file(local[name], storage.join(index_root, version, name))
            report("upload", i + 1, len(names))
        manifest = dataclasses.replace(manifest, build_stats={**manifest.build_stats,
                                                              "wall_s": round(time.monotonic() - started, 3)})
        mf.write_manifest(index_root, manifest)
    if publish:
        mf.write_latest(index_root, version)
    logger.info("index version %s of %s: %d vectors in %d shards, %.1f s%s", version, index_root,
                manifest.ntotal, len(shards), time.monotonic() - started, "" if publish else " (not published)")
    return manifest


def publish_version(index_root: str, version: str) -> mf.Manifest:
    """Point LATEST at an uploaded version (one built with publish=False), without a gate."""
    manifest = mf.read_manifest(index_root, version)
    mf.write_latest(index_root, version)
    return manifest
