"""One shard while rows stream in: float and binary index, id map, stored float16
vectors and the exact neighbours of the recall queries; tuned, measured and written
once all its rows are in."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
from typing import Any, BinaryIO

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import manifest as mf
from .choice import tune_search_params, uses_product_quantizer
from .config import IndexBuildConfig, IndexBuildError
from .plan import ShardPlan
from .recall import RECALL_K, float_recall_of, hamming_recall_of, wanted_count
from .search import StoredVectors
from .train import Templates

logger = logging.getLogger(__name__)


def id_map_table(batch: pa.RecordBatch) -> pa.Table:
    table = pa.Table.from_batches([batch])
    if "text" not in table.column_names:
        table = table.append_column("text", pa.nulls(len(table), pa.string()))
    return table.select(list(mf.ID_MAP_COLUMNS))


@dataclasses.dataclass
class ShardResult:
    plan: ShardPlan
    ntotal: int
    files: dict[str, str]  # kind ("float" | "binary" | "ids" | "vectors") -> local path
    factories: dict[str, str]
    search_params: dict[str, dict[str, int]]
    recall: dict[str, float | None]
    weight: dict[str, int]  # exact neighbours the recall counted (weights in a modality's mean)


def _npy_header(f: BinaryIO, rows: int, dim: int) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f2")), "fortran_order": False, "shape": (rows, dim)}
    np.lib.format.write_array_header_1_0(f, header)


class ShardBuilder:
    """One shard while rows stream in: float + binary index, id map, stored vectors,
    exact neighbours of the recall queries. Chunks are added on a worker thread, one
    at a time per shard, while the next chunk is read."""

    def __init__(self, plan: ShardPlan, templates: Templates, queries: tuple[np.ndarray, np.ndarray],
                 out_dir: str, chunk_rows: int, omp_threads: int, store_vectors: bool,
                 pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self.plan = plan
        self.templates = templates
        # faiss SWIG objects; set to None once written
        self.float_index: Any = faiss.clone_index(templates.float_index)
        # clone_binary_index cannot copy every binary index type: round-trip through bytes instead.
        self.binary_index: Any = faiss.deserialize_index_binary(faiss.serialize_index_binary(templates.binary_index))
        self.query_x, self.query_codes = queries
        nq = len(self.query_x)
        # exact top-10 of the recall queries (faiss ResultHeaps; None without queries)
        self.exact: Any = faiss.ResultHeap(nq, RECALL_K, keep_max=True) if nq else None
        self.exact_hamming: Any = faiss.ResultHeap(nq, RECALL_K, keep_max=False) if nq else None
        self.exact_final = False
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
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
        self.ivf: Any = inner if isinstance(inner, faiss.IndexIVF) and inner.invlists is not None and isinstance(
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

    def add(self, ids: np.ndarray, x: np.ndarray, codes: np.ndarray | None, id_map: pa.Table | None) -> None:
        """Buffer rows (codes and id map are None in the assignment pass)."""
        if not self.assigning and id_map is not None:
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

    def _add_chunk(self, ids: np.ndarray, x: np.ndarray, codes: np.ndarray | None) -> None:
        faiss.omp_set_num_threads(self.omp_threads)  # per worker thread: shards share the cores
        if self.assigning:
            self.assign_parts.append(self.ivf.quantizer.assign(x, 1).ravel())
            return
        if codes is None:
            raise IndexBuildError(f"shard {self.plan.stem}: rows arrived without hash codes")
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
            hamming, hpos = faiss.knn_hamming(self.query_codes, codes, k)
            self.exact_hamming.add_result(hamming.astype(np.float32), ids[hpos])

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

    def finish(self, config: IndexBuildConfig, wanted: list[np.ndarray] | None = None) -> ShardResult:
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
            weight = {"float": wanted_count(exact_ids), "binary": wanted_count(self.exact_hamming.I)}
            float_measure = functools.partial(float_recall_of, self.float_index, self.query_x, exact_ids, vectors)
            hamming_measure = functools.partial(hamming_recall_of, self.binary_index, self.query_codes,
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
        return ShardResult(
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
