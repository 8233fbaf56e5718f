"""Streaming reads of embedding Parquet files (SPEC 4.3).

Rows come out as pyarrow RecordBatches of ``batch_rows`` rows, read through a small
buffer (not a whole row group at a time), so a reader holds about one batch of vectors. Filters (segment ids, live
``(uri, etag)`` pairs, a model id) are applied per batch with Arrow compute.
"""

from __future__ import annotations

import functools
import logging
import posixpath
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage
from .errors import ObjectNotFoundError, SinkError
from .ledger import LedgerEntry
from .parts import list_parts
from .schema import embedding_schema
from .workdir import Workdir

logger = logging.getLogger(__name__)

DEFAULT_BATCH_ROWS = 8_192
# Column chunks are read through a buffer of this size instead of whole row groups at
# once: with small batches a reader then holds a few MiB, not 2-4x a row group.
READ_BUFFER_BYTES = 1 << 20
_KEY_SEP = "\x00"


class EmbeddingsReadError(SinkError):
    """An embedding Parquet file is unreadable or lacks a required column."""


def list_parquet_files(source: str | Sequence[str]) -> list[str]:
    """The part files of ``source``: a directory URI (searched recursively), one
    Parquet file, or an explicit list of files (returned as given).

    Hidden and temporary names (``.tmp-*``, ``_SUCCESS``) are skipped, so parts still
    being written are never read.
    """
    if not isinstance(source, str):
        return list(source)
    try:
        objects = list(storage.list_objects(source, include=("*.parquet",)))
    except ObjectNotFoundError:
        objects = []
    files = sorted(obj.uri for obj in objects if not posixpath.basename(obj.uri).startswith((".", "_")))
    if not files and source.endswith(".parquet") and storage.exists(source):
        return [source]
    if not files:
        logger.warning("no Parquet files under %s", source)
    return files


def _key_column(batch: pa.RecordBatch) -> pa.Array:
    return pc.binary_join_element_wise(batch.column("uri"), batch.column("etag"), _KEY_SEP)


def _row_mask(
    batch: pa.RecordBatch,
    segment_ids: pa.Array | None,
    uri_etag_keys: pa.Array | None,
    model_id: str | None,
) -> pa.Array | None:
    mask = None
    if segment_ids is not None:
        mask = pc.is_in(batch.column("segment_id"), value_set=segment_ids)
    if uri_etag_keys is not None:
        keep = pc.is_in(_key_column(batch), value_set=uri_etag_keys)
        mask = keep if mask is None else pc.and_(mask, keep)
    if model_id is not None:
        keep = pc.fill_null(pc.equal(batch.column("model_id"), model_id), False)
        mask = keep if mask is None else pc.and_(mask, keep)
    return mask


def iter_batches(
    files: str | Sequence[str],
    *,
    columns: Sequence[str] | None = None,
    segment_ids: Collection[int] | None = None,
    uri_etags: Iterable[tuple[str, str]] | None = None,
    model_id: str | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> Iterator[pa.RecordBatch]:
    """Yield RecordBatches of the embedding rows in ``files``.

    files: a directory URI, one file, or a list of part files (see list_parquet_files).
    columns: columns to return (all when None); filter columns are read as needed.
    segment_ids: keep only rows whose segment_id is in this set.
    uri_etags: keep only rows whose (uri, etag) pair is in this set (the live objects).
    model_id: keep only rows encoded by this model.
    Filters combine with AND. Empty batches are not yielded.
    """
    if batch_rows <= 0:
        raise ValueError(f"{batch_rows = } must be > 0")
    paths = list_parquet_files(files)
    id_set = None if segment_ids is None else pa.array(np.fromiter(segment_ids, dtype=np.int64), pa.int64())
    key_set = None
    if uri_etags is not None:
        key_set = pa.array([f"{uri}{_KEY_SEP}{etag}" for uri, etag in uri_etags], pa.string())
    needed: list[str] | None = None
    if columns is not None:
        needed = list(columns)
        for name, active in (("segment_id", id_set), ("uri", key_set), ("etag", key_set), ("model_id", model_id)):
            if active is not None and name not in needed:
                needed.append(name)
    for path in paths:
        yield from _iter_file(path, needed, columns, id_set, key_set, model_id, batch_rows)


def _iter_file(
    uri: str,
    needed: list[str] | None,
    columns: Sequence[str] | None,
    id_set: pa.Array | None,
    key_set: pa.Array | None,
    model_id: str | None,
    batch_rows: int,
) -> Iterator[pa.RecordBatch]:
    try:
        with storage.local_path(uri) as path:
            parquet = pq.ParquetFile(path, buffer_size=READ_BUFFER_BYTES, pre_buffer=False)
            missing = [c for c in (needed or []) if c not in parquet.schema_arrow.names]
            if missing:
                raise EmbeddingsReadError(f"{uri!r} lacks columns {missing}")
            for batch in parquet.iter_batches(batch_size=batch_rows, columns=needed):
                mask = _row_mask(batch, id_set, key_set, model_id)
                if mask is not None:
                    batch = batch.filter(mask)
                if columns is not None and list(batch.schema.names) != list(columns):
                    batch = batch.select(list(columns))
                if batch.num_rows:
                    yield batch
    except (OSError, pa.ArrowException) as err:
        raise EmbeddingsReadError(f"cannot read embeddings from {uri!r}: {err}") from err


def batch_reader(
    files: str | Sequence[str],
    *,
    columns: Sequence[str] | None = None,
    segment_ids: Collection[int] | None = None,
    uri_etags: Iterable[tuple[str, str]] | None = None,
    model_id: str | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> Callable[[], Iterator[pa.RecordBatch]]:
    """A re-callable batch source (what build_version takes): each call reads the
    same part files anew, with the filters of iter_batches."""
    paths = list_parquet_files(files)
    return functools.partial(
        iter_batches, paths, columns=columns, segment_ids=None if segment_ids is None else frozenset(segment_ids),
        uri_etags=None if uri_etags is None else frozenset(uri_etags), model_id=model_id, batch_rows=batch_rows,
    )


def embedding_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """float32 (N, dim) from a fixed-size list column of float32 or float16."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not pa.types.is_fixed_size_list(column.type):
        raise EmbeddingsReadError(f"embedding column has type {column.type}, expected a fixed-size list")
    if column.null_count:
        raise EmbeddingsReadError(f"{column.null_count} rows have a null embedding")
    dim = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(values.reshape(len(column), dim), dtype=np.float32)


def hash_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """uint8 (N, bits // 8) from a fixed-size binary hash-code column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not pa.types.is_fixed_size_binary(column.type):
        raise EmbeddingsReadError(f"hash_code column has type {column.type}, expected fixed-size binary")
    if column.null_count:
        raise EmbeddingsReadError(f"{column.null_count} rows have a null hash_code")
    width = column.type.byte_width
    buffer = column.buffers()[1]
    data = np.frombuffer(buffer, dtype=np.uint8, count=len(column) * width, offset=column.offset * width)
    return data.reshape(len(column), width).copy()


def rows_batch(
    segment_ids: Sequence[int] | np.ndarray,
    uris: Sequence[str],
    etags: Sequence[str],
    modalities: Sequence[str],
    start_s: Sequence[float] | np.ndarray,
    end_s: Sequence[float] | np.ndarray,
    embeddings: np.ndarray,
    codes: np.ndarray,
    *,
    model_id: str,
    run_id: str,
    texts: Sequence[str | None] | None = None,
) -> pa.RecordBatch:
    """A RecordBatch with the embedding-row schema from column arrays (the inverse of
    embedding_matrix / hash_matrix)."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    n, dim = embeddings.shape
    schema = embedding_schema(dim, codes.shape[1] * 8)
    columns = [
        pa.array(np.asarray(segment_ids, dtype=np.int64)),
        pa.array(list(uris), pa.string()),
        pa.array(list(etags), pa.string()),
        pa.array(list(modalities), pa.string()),
        pa.array(np.asarray(start_s, dtype=np.float64)),
        pa.array(np.asarray(end_s, dtype=np.float64)),
        pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), dim),
        pa.FixedSizeBinaryArray.from_buffers(pa.binary(codes.shape[1]), n, [None, pa.py_buffer(codes.tobytes())]),
        pa.array([model_id] * n, pa.string()),
        pa.array([run_id] * n, pa.string()),
        pa.array(list(texts) if texts is not None else [None] * n, pa.string()),
        pa.array([None] * n, pa.string()),  # sampling
    ]
    return pa.record_batch(columns, schema=schema)


def live_batches(workdir: str, ledger: Mapping[str, LedgerEntry], model_id: str
                 ) -> Callable[[], Iterator[pa.RecordBatch]]:
    """The live rows of a workdir (sinks/ledger.py): for each indexed ledger entry, the
    rows of its (uri, etag) in the parts of the run the entry names, encoded by
    ``model_id``; each call reads them again, streaming, run by run."""
    by_run: dict[str, list[tuple[str, str]]] = {}
    for e in ledger.values():
        if e.state == "indexed":
            by_run.setdefault(e.run_id, []).append((e.uri, e.etag))
    wd = Workdir(workdir)
    readers = [
        batch_reader(list_parts(wd.embeddings(run), ".parquet"), uri_etags=pairs, model_id=model_id)
        for run, pairs in sorted(by_run.items())
    ]

    def batches() -> Iterator[pa.RecordBatch]:
        for read in readers:
            yield from read()

    return batches
