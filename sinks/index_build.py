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
from typing import Any, BinaryIO, Callable, Iterator, Mapping

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from xmodal_index.sinks import manifest as mf
from xmodal_index.sinks import storage
from xmodal_index.sinks.embeddings_io import embedding_matrix, hash_matrix
from xmodal_index.sinks.errors import SinkError
from xmodal_index.sinks.index_choice import (  # noqa: F401 - choose_factories is re-exported
    DEFAULT_MEMORY_BUDGET_BYTES,
    IndexChoice,
    IndexChoiceError,
    choose_factories,
    choose_index,
)
from xmodal_index.sinks.loader import (
    RERANK_PARAM,
    StoredVectors,
    apply_search_params,
    rerank_search,
    tunable_param,
)

logger = logging.getLogger(__name__)

METRICS = ("ip",)
RECALL_K = 10
ADD_CHUNK_ROWS = 65_536  # rows buffered per pass before they go to the shards' add threads
MIN_CHUNK_ROWS = 4_096
NPROBE_DEFAULT_DIVISOR = 16  # nprobe = nlist / 16 when nothing can be measured
EF_SEARCH_CANDIDATES = (16, 32, 64, 128, 256, 512, 1024)
EF_SEARCH_DEFAULT = 64
NFLIP_MAX = 6
NFLIP_DEFAULT = 2
RERANK_CANDIDATES = (4, 16, 64)  # rerank * k candidates re-scored per shard of a product-quantized index
_MODALITY_RE = re.compile(r"[a-z0-9_]+")
_PQ_RE = re.compile(r"(^|,)PQ\d+")
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
    """Bottom-k rows of one modality by priority: order-independent and seeded."""

    def __init__(self, capacity: int, dim: int, nbytes: int) -> None:
        self.capacity = capacity
        self.ids = np.empty(0, np.int64)
        self.prio = np.empty(0, np.uint64)
        self.x = np.empty((0, dim), np.float32)
        self.codes = np.empty((0, nbytes), np.uint8)

    def offer(self, batch: pa.RecordBatch, rows: np.ndarray, ids: np.ndarray, prio: np.ndarray) -> None:
        if len(self.ids) >= self.capacity:
            rows = rows[prio[rows] < self.prio[-1]]
        if not len(rows):
            return
        taken = pa.array(rows)
        ids_all = np.concatenate([self.ids, ids[rows]])
        prio_all = np.concatenate([self.prio, prio[rows]])
        x_all = np.concatenate([self.x, embedding_matrix(batch.column("embedding").take(taken))])
        codes_all = np.concatenate([self.codes, hash_matrix(batch.column("hash_code").take(taken))])
        _, first = np.unique(ids_all, return_index=True)
        keep = first[np.lexsort((ids_all[first], prio_all[first]))][: self.capacity]
        self.ids, self.prio, self.x, self.codes = ids_all[keep], prio_all[keep], x_all[keep], codes_all[keep]


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


def _group_shards(plans: list[_ShardPlan], max_shard_vectors: int) -> list[list[int]]:
    """Consecutive shards whose vectors together fit one shard's budget: one pass each."""
    budget = max(max_shard_vectors, max(p.count for p in plans))
    groups: list[list[int]] = [[]]
    size = 0
    for i, plan in enumerate(plans):
        if groups[-1] and size + plan.count > budget:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += plan.count
    return groups


@dataclasses.dataclass
class _Templates:
    float_index: Any
    binary_index: Any
    float_factory: str
    binary_factory: str


def _make_float(factory: str, dim: int) -> Any:
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise IndexBuildError(f"float index factory {factory!r} is invalid for {dim = }: {err}") from err
    if faiss.try_extract_index_ivf(index) is None and not isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        index = faiss.IndexIDMap2(index)
    return index


def _make_binary(factory: str, bits: int) -> Any:
    try:
        index = faiss.index_binary_factory(bits, factory)
    except RuntimeError as err:
        raise IndexBuildError(f"binary index factory {factory!r} is invalid for {bits = }: {err}") from err
    if not isinstance(index, (faiss.IndexBinaryIVF, faiss.IndexBinaryIDMap, faiss.IndexBinaryIDMap2)):
        index = faiss.IndexBinaryIDMap2(index)
    return index


def _trained(kind: str, factory: str, n: int, modality: str, held_out: np.ndarray, sample: np.ndarray,
             make: Callable[[str], Any]) -> tuple[str, Any]:
    """A trained empty index: on the training rows, on the whole sample when they are
    too few for the index's lists, or an exact index when even that is too small."""
    index = make(factory)
    if index.is_trained:
        return factory, index
    ivf = faiss.try_extract_index_ivf(index) if kind == "float" else index
    nlist = int(getattr(ivf, "nlist", 1))
    data = held_out if len(held_out) >= nlist else sample
    if len(data) < nlist:
        exact = "Flat" if kind == "float" else "BFlat"
        logger.warning("%s %s shards of %d rows are too small to train %r: using %s", modality, kind, n, factory, exact)
        return exact, make(exact)
    try:
        index.train(np.ascontiguousarray(data))
    except RuntimeError as err:
        raise IndexBuildError(f"training {kind} index {factory!r} for modality {modality!r} "
                              f"on {len(data)} rows failed: {err}") from err
    return factory, index


def _train_templates(modality: str, n: int, sample: _Sample, nqueries: int, dim: int, bits: int,
                     config: IndexBuildConfig) -> _Templates:
    float_factory, binary_factory = choose_factories(n, dim, bits, config)
    float_factory, float_index = _trained("float", float_factory, n, modality, sample.x[nqueries:], sample.x,
                                          lambda f: _make_float(f, dim))
    binary_factory, binary_index = _trained("binary", binary_factory, n, modality, sample.codes[nqueries:],
                                            sample.codes, lambda f: _make_binary(f, bits))
    return _Templates(float_index, binary_index, float_factory, binary_factory)


def _id_map_table(batch: pa.RecordBatch) -> pa.Table:
    table = pa.Table.from_batches([batch])
    if "text" not in table.column_names:
        table = table.append_column("text", pa.nulls(len(table), pa.string()))
    return table.select(list(mf.ID_MAP_COLUMNS))


@dataclasses.dataclass
class _ShardResult:
    plan: _ShardPlan
    ntotal: int
    files: dict[str, str]  # kind ("float" | "binary" | "ids") -> local path
    factories: dict[str, str]
    search_params: dict[str, dict[str, int]]
    recall: dict[str, float | None]


def _float_recall(index: Any, queries: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean |ANN top-k ∩ exact top-k| / |exact top-k| over the queries."""
    _, found = index.search(queries, RECALL_K)
    hits = total = 0
    for got, want in zip(found, exact_ids):
        want = want[want >= 0]
        total += len(want)
        hits += len(np.intersect1d(got[got >= 0], want))
    return hits / total if total else 1.0


def _hamming_recall(index: Any, codes: np.ndarray, exact_dist: np.ndarray, exact_ids: np.ndarray) -> float:
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


def _tune(index: Any, binary: bool, config: IndexBuildConfig,
          measure: Callable[[], float] | None) -> tuple[dict[str, int], float | None]:
    """Set nprobe / efSearch: the configured value, else the smallest candidate whose
    measured recall@10 reaches config.recall_target. Returns (params, recall)."""
    param = tunable_param(index, binary)
    if param is None:
        return {}, measure() if measure else None
    name, limit = param
    fixed = config.nprobe if name == "nprobe" else config.ef_search
    if fixed or measure is None:
        if fixed:
            value = min(fixed, limit) if name == "nprobe" else fixed
        else:
            value = max(1, limit // NPROBE_DEFAULT_DIVISOR) if name == "nprobe" else EF_SEARCH_DEFAULT
        apply_search_params(index, {name: value}, binary)
        return {name: value}, measure() if measure else None
    if name == "nprobe":
        candidates = [1 << i for i in range(max(1, limit).bit_length()) if (1 << i) < limit] + [limit]
    else:
        candidates = list(EF_SEARCH_CANDIDATES)
    recall = 0.0
    for value in candidates:
        apply_search_params(index, {name: value}, binary)
        recall = measure()
        if recall >= config.recall_target:
            break
    return {name: value}, recall


class _ShardBuilder:
    """One shard while rows stream in: float + binary index, id map, exact neighbours."""

    def __init__(self, plan: _ShardPlan, templates: _Templates, queries: tuple[np.ndarray, np.ndarray]) -> None:
        self.plan = plan
        self.templates = templates
        self.float_index = faiss.clone_index(templates.float_index)
        # clone_binary_index cannot copy IndexBinaryIDMap2: round-trip through bytes instead.
        self.binary_index = faiss.deserialize_index_binary(faiss.serialize_index_binary(templates.binary_index))
        self.query_x, self.query_codes = queries
        nq = len(self.query_x)
        self.exact = faiss.ResultHeap(nq, RECALL_K, keep_max=True) if nq else None
        self.exact_hamming = faiss.ResultHeap(nq, RECALL_K, keep_max=False) if nq else None
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.pending_rows = 0
        self.id_maps: list[pa.Table] = []

    def add(self, ids: np.ndarray, x: np.ndarray, codes: np.ndarray, id_map: pa.Table) -> None:
        self.pending.append((ids, x, codes))
        self.pending_rows += len(ids)
        self.id_maps.append(id_map)
        if self.pending_rows >= ADD_CHUNK_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        ids = np.ascontiguousarray(np.concatenate([p[0] for p in self.pending]), dtype=np.int64)
        x = np.ascontiguousarray(np.concatenate([p[1] for p in self.pending]))
        codes = np.ascontiguousarray(np.concatenate([p[2] for p in self.pending]))
        self.pending, self.pending_rows = [], 0
        self.float_index.add_with_ids(x, ids)
        self.binary_index.add_with_ids(codes, ids)
        if self.exact is not None:
            k = min(RECALL_K, len(ids))
            dist, pos = faiss.knn(self.query_x, x, k, metric=faiss.METRIC_INNER_PRODUCT)
            self.exact.add_result(dist, ids[pos])
            dist, pos = faiss.knn_hamming(self.query_codes, codes, k)
            self.exact_hamming.add_result(dist.astype(np.float32), ids[pos])

    def finish(self, out_dir: str, config: IndexBuildConfig) -> _ShardResult:
        self._flush()
        plan = self.plan
        if self.float_index.ntotal != plan.count or self.binary_index.ntotal != plan.count:
            raise IndexBuildError(f"shard {plan.stem}: the scan counted {plan.count} rows but "
                                  f"{self.float_index.ntotal} arrived: the input changed between passes")
        float_measure = hamming_measure = None
        if self.exact is not None:
            self.exact.finalize()
            self.exact_hamming.finalize()
            float_measure = functools.partial(_float_recall, self.float_index, self.query_x, self.exact.I)
            hamming_measure = functools.partial(_hamming_recall, self.binary_index, self.query_codes,
                                                self.exact_hamming.D, self.exact_hamming.I)
        float_params, float_recall = _tune(self.float_index, False, config, float_measure)
        binary_params, binary_recall = _tune(self.binary_index, True, config, hamming_measure)
        files = {
            "float": os.path.join(out_dir, f"{plan.stem}.float.faiss"),
            "binary": os.path.join(out_dir, f"{plan.stem}.binary.faiss"),
            "ids": os.path.join(out_dir, f"{plan.stem}.ids.parquet"),
        }
        faiss.write_index(self.float_index, files["float"])
        faiss.write_index_binary(self.binary_index, files["binary"])
        id_map = pa.concat_tables(self.id_maps).sort_by("segment_id")
        pq.write_table(id_map, files["ids"], compression="zstd")
        self.float_index = self.binary_index = None
        self.id_maps = []
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
        )


def _fmt(recall: float | None) -> str:
    return "n/a" if recall is None else f"{recall:.4f}"


# ---------------------------------------------------------------- build


def _add_and_write(batches: Callable[[], Iterator[pa.RecordBatch]], scan: _Scan, plans: list[_ShardPlan],
                   shard_of: np.ndarray, templates: dict[str, _Templates],
                   queries: dict[str, tuple[np.ndarray, np.ndarray]], out_dir: str, config: IndexBuildConfig,
                   progress: _Progress) -> list[_ShardResult]:
    taken = np.zeros(len(scan.unique_ids), bool)  # dedupe: the first row of each segment_id wins
    results: list[_ShardResult] = []
    added = 0
    for group in _group_shards(plans, config.max_shard_vectors):
        in_group = np.zeros(len(plans), bool)
        in_group[group] = True
        builders = {i: _ShardBuilder(plans[i], templates[plans[i].modality], queries[plans[i].modality]) for i in group}
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
            sub = batch.take(pa.array(rows))
            x = embedding_matrix(sub.column("embedding"))
            codes = hash_matrix(sub.column("hash_code"))
            id_map = _id_map_table(sub)
            sub_ids, sub_shard = ids[rows], shard[rows]
            for s in np.unique(sub_shard):
                sel = np.nonzero(sub_shard == s)[0]
                builders[int(s)].add(sub_ids[sel], x[sel], codes[sel], id_map.take(pa.array(sel)))
            added += len(rows)
            progress("add", added, len(scan.unique_ids))
        for i in group:
            results.append(builders.pop(i).finish(out_dir, config))
            progress("write", len(results), len(plans))
    return results


def _check_extra_files(extra_files: Mapping[str, str]) -> None:
    for name, path in extra_files.items():
        if "/" in name or "\\" in name or name.startswith((".", "shard-")) or name in _RESERVED_NAMES or not name:
            raise ValueError(f"extra file name {name!r} must be a plain file name, not starting with "
                             f"'.' or 'shard-', and not one of {_RESERVED_NAMES}")
        if not os.path.isfile(path):
            raise IndexBuildError(f"extra file {name!r}: {path!r} is not a file")


def _metrics(results: list[_ShardResult], scan: _Scan, queries: dict[str, tuple[np.ndarray, np.ndarray]],
             metrics_extra: Mapping[str, Any]) -> dict[str, Any]:
    by_modality: dict[str, dict[str, list[float]]] = {"float": {}, "binary": {}}
    for r in results:
        for kind in ("float", "binary"):
            if r.recall[kind] is not None:
                by_modality[kind].setdefault(r.plan.modality, []).append(r.recall[kind])
    ntotal = {m: sum(r.ntotal for r in results if r.plan.modality == m) for m in scan.modalities}
    metrics: dict[str, Any] = {
        "recall_at_10": {kind: (min(v for vs in mods.values() for v in vs) if mods else None)
                         for kind, mods in by_modality.items()},
        "recall_at_10_by_modality": {kind: {m: float(np.mean(vs)) for m, vs in mods.items()}
                                     for kind, mods in by_modality.items()},
        "recall_queries": {m: len(q[0]) for m, q in queries.items()},
        "recall_protocol": (
            "per shard: top-10 of the index at its search_params vs exact top-10 (flat inner product; "
            "exact Hamming, where any row tied with the 10th exact distance counts) for up to recall_sample "
            "rows per modality used as queries and held out of training; recall_at_10 is the minimum over shards"
        ),
        "ntotal": ntotal,
        "rows_read": scan.rows,
        "duplicate_rows_dropped": scan.rows - len(scan.unique_ids),
    }
    metrics.update(metrics_extra)
    return metrics


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
    Raises EmptyIndexError on zero rows, IndexBuildError on inconsistent rows; on any
    failure LATEST keeps naming the previous version.
    """
    if dim <= 0:
        raise ValueError(f"{dim = } must be > 0")
    if bits <= 0 or bits % 8:
        raise ValueError(f"{bits = } must be a positive multiple of 8")
    _check_extra_files(extra_files)
    report = _Progress(progress)
    started = time.monotonic()
    scan = _scan(batches, dim, bits, model_id, config, report)
    plans, shard_of = _plan_shards(scan, config.max_shard_vectors)
    templates: dict[str, _Templates] = {}
    queries: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i, modality in enumerate(scan.modalities):
        sample = scan.samples.pop(modality)
        nq = min(config.recall_sample, len(sample.ids))
        largest = max(p.count for p in plans if p.modality == modality)
        templates[modality] = _train_templates(modality, largest, sample, nq, dim, bits, config)
        queries[modality] = (np.ascontiguousarray(sample.x[:nq]), np.ascontiguousarray(sample.codes[:nq]))
        report("train", i + 1, len(scan.modalities))
    with tempfile.TemporaryDirectory(prefix="xmodal-index-build-") as tmp:
        results = _add_and_write(batches, scan, plans, shard_of, templates, queries, tmp, config, report)
        local: dict[str, str] = {}
        shards: list[mf.ShardEntry] = []
        id_maps: list[mf.FileEntry] = []
        for r in results:
            id_entry = mf.FileEntry.of_local(r.files["ids"], os.path.basename(r.files["ids"]))
            id_maps.append(id_entry)
            local[id_entry.file] = r.files["ids"]
            for kind in ("float", "binary"):
                entry = mf.FileEntry.of_local(r.files[kind], os.path.basename(r.files[kind]))
                local[entry.file] = r.files[kind]
                shards.append(mf.ShardEntry(
                    file=entry.file, sha256=entry.sha256, bytes=entry.bytes, ntotal=r.ntotal,
                    modality=r.plan.modality, kind=kind, id_map=id_entry.file, factory=r.factories[kind],
                    search_params=r.search_params[kind], recall_at_10=r.recall[kind],
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
        )
        names = sorted(local)
        for i, name in enumerate(names):
            storage.put_file(local[name], storage.join(index_root, version, name))
            report("upload", i + 1, len(names))
        mf.write_manifest(index_root, manifest)
    if publish:
        mf.write_latest(index_root, version)
    logger.info("index version %s of %s: %d vectors in %d shards, %.1f s%s", version, index_root,
                manifest.ntotal, len(shards), time.monotonic() - started, "" if publish else " (not published)")
    return manifest


def publish_version(index_root: str, version: str) -> mf.Manifest:
    """Point LATEST at an uploaded version (one built with publish=False)."""
    manifest = mf.read_manifest(index_root, version)
    mf.write_latest(index_root, version)
    return manifest
