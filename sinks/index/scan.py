"""The scan pass of an index build: one read of every row that keeps the segment ids
and modalities (to dedupe and plan shards) and a seeded bottom-k sample per modality
(held-out recall queries and training rows)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..embeddings_io import embedding_matrix, hash_matrix
from .config import EmptyIndexError, IndexBuildConfig, IndexBuildError
from .progress import Progress

_MODALITY_RE = re.compile(r"[a-z0-9_]+")
_REQUIRED_COLUMNS = ("segment_id", "uri", "etag", "modality", "start_s", "end_s", "embedding", "hash_code")


def _priority(ids: np.ndarray, seed: int) -> np.ndarray:
    """A seeded 64-bit hash of each id (splitmix64): the sample order."""
    z = ids.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFF_FFFF_FFFF_FFFF)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class Sample:
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
class Scan:
    unique_ids: np.ndarray  # sorted int64
    modality_code: np.ndarray  # int per unique id, index into modalities
    modalities: list[str]
    rows: int
    samples: dict[str, Sample]


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


def scan_rows(batches: Callable[[], Iterator[pa.RecordBatch]], dim: int, bits: int, model_id: str,
          config: IndexBuildConfig, progress: Progress) -> Scan:
    capacity = config.recall_sample + config.train_sample
    modalities: list[str] = []
    samples: dict[str, Sample] = {}
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
                samples[value] = Sample(capacity, dim, bits // 8)
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
    release_arrow_memory()
    if rows == 0:
        raise EmptyIndexError("no embedding rows to index: refusing to publish an empty version")
    all_ids = np.concatenate(id_parts)
    unique_ids, first = np.unique(all_ids, return_index=True)
    modality_code = np.concatenate(code_parts)[first]
    return Scan(unique_ids, modality_code, modalities, rows, samples)


def release_arrow_memory() -> None:
    """Hand the memory Arrow's allocator keeps after a pass back to the system."""
    pa.default_memory_pool().release_unused()
