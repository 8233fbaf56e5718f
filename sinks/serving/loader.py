"""Query-node loader: open a published index version and search it.

Needs only faiss, numpy, pyarrow (and boto3 through storage for s3://): no Beam, no
torch. ``IndexVersion.open`` fetches every file the manifest lists into a local
cache (local index roots are read in place unless a cache_dir is given), verifies
each sha256 before serving, memory-maps the index files, and searches the shards
of the selected modalities in parallel threads (faiss releases the GIL).

Search modes:

- ``float``: each float shard's ANN index; shards whose search_params carry
  ``rerank`` (product-quantized ones) fetch ``rerank * k`` candidates and re-score
  them exactly with the shard's stored float16 vectors.
- ``two_stage``: each binary shard returns its Hamming top-``candidates`` for the
  query's hash code, and those are re-scored exactly with the stored float16
  vectors (inner product); the caller passes the query embeddings and codes.

Results of all shards are merged by score, ties by segment_id.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging
import math
import os
import shutil
import tempfile
from typing import Any, Callable, Mapping, Sequence

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xmodal_index.sinks.index import manifest as mf
from xmodal_index.sinks import storage
from xmodal_index.sinks.errors import ChecksumMismatchError, IndexVersionError, ObjectNotFoundError
from xmodal_index.sinks.schema import MODALITIES
from xmodal_index.sinks.index.search import (
    RERANK_PARAM, StoredVectors, apply_search_params, rerank_search, two_stage_search,
)

logger = logging.getLogger(__name__)

CACHE_ENV = "XMODAL_INDEX_CACHE"
_MMAP_FLAGS = getattr(faiss, "IO_FLAG_MMAP_IFC", 0) | faiss.IO_FLAG_READ_ONLY


@dataclasses.dataclass(frozen=True)
class Hit:
    """One search result: a segment of one source object."""

    segment_id: int
    uri: str
    modality: str
    start_s: float
    end_s: float
    score: float  # inner product (cosine) for search, 1 - hamming / bits for search_codes
    text: str | None


# ---------------------------------------------------------------- fetching and verification


def _default_cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "xmodal-index")


def _cache_key(index_root: str) -> str:
    name = index_root.rstrip("/").rsplit("/", 1)[-1] or "index"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return f"{safe}-{hashlib.sha256(index_root.encode()).hexdigest()[:12]}"


def _fetch(uri: str, dest: str) -> None:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".fetch-")
    try:
        with os.fdopen(fd, "wb") as out, storage.open_read(uri) as src:
            shutil.copyfileobj(src, out, length=1 << 22)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _mismatch(entry: mf.FileEntry, path: str) -> str | None:
    """Why the local file does not match its manifest entry, or None when it does."""
    if not os.path.isfile(path):
        return "is missing"
    size = os.path.getsize(path)
    if size != entry.bytes:
        return f"has {size} bytes, the manifest says {entry.bytes}"
    digest = mf.sha256_file(path)
    if digest != entry.sha256:
        return f"has sha256 {digest}, the manifest says {entry.sha256}"
    return None


def _materialise(index_root: str, manifest: mf.Manifest, cache_dir: str | None) -> str:
    """A local directory holding every listed file, each verified against the manifest."""
    version = manifest.version
    in_place = cache_dir is None and not storage.is_s3(index_root)
    if in_place:
        root = index_root[len("file://"):] if index_root.startswith("file://") else index_root
        local_dir = os.path.join(root, version)
    else:
        local_dir = os.path.join(cache_dir or _default_cache_dir(), _cache_key(index_root), version)
    for entry in manifest.all_files():
        path = os.path.join(local_dir, entry.file)
        uri = storage.join(index_root, version, entry.file)
        problem = _mismatch(entry, path)
        if problem is not None and not in_place:  # not cached yet, or a damaged cached copy
            try:
                _fetch(uri, path)
            except ObjectNotFoundError as err:
                raise ChecksumMismatchError(f"version {version}: {entry.file!r} listed in the manifest is missing "
                                            f"({uri})") from err
            problem = _mismatch(entry, path)
        if problem is not None:
            raise ChecksumMismatchError(f"version {version}: {entry.file!r} {problem} ({uri}); refusing to serve it")
    return local_dir


# ---------------------------------------------------------------- stored vectors and re-ranking


# ---------------------------------------------------------------- the loaded version


@dataclasses.dataclass
class _IdMap:
    ids: np.ndarray  # sorted int64
    table: pa.Table
    vectors: StoredVectors | None = None

    def rows(self, ids: np.ndarray, name: str) -> list[dict[str, Any]]:
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        if len(ids) and (len(self.ids) == 0 or np.any(self.ids[pos] != ids)):
            raise IndexVersionError(f"id map {name!r} lacks segment ids the index returned")
        return self.table.take(pa.array(pos)).to_pylist()


@dataclasses.dataclass
class _Shard:
    entry: mf.ShardEntry
    index: Any


SEARCH_MODES = ("float", "two_stage")
SMALL_BATCH_QUERIES = 20  # below this many queries a shard is searched on one thread
DEFAULT_CANDIDATES = 100  # two-stage: Hamming candidates per shard when not given


class IndexVersion:
    """One verified, loaded index version. Use ``IndexVersion.open``."""

    def __init__(self, index_root: str, manifest: mf.Manifest, local_dir: str,
                 shards: list[_Shard], id_maps: dict[str, _IdMap]) -> None:
        self.index_root = index_root
        self.manifest = manifest
        self.local_dir = local_dir
        self._shards = shards
        self._id_maps = id_maps
        workers = max(1, min(len(shards), os.cpu_count() or 1))
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shard-search")

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.manifest.modalities

    @property
    def has_vectors(self) -> bool:
        """True when every shard keeps float16 vectors (needed by two-stage search)."""
        return bool(self._id_maps) and all(m.vectors is not None for m in self._id_maps.values())

    @staticmethod
    def latest_version(index_root: str) -> str | None:
        return mf.read_latest(index_root)

    @classmethod
    def open(cls, index_root: str, version: str | None = None, cache_dir: str | None = None) -> "IndexVersion":
        """Load ``version`` (default: the one LATEST names) after verifying every file.

        Raises IndexVersionError when nothing is published or the manifest is absent,
        ChecksumMismatchError when any listed file is missing or altered.
        """
        if version is None:
            version = mf.read_latest(index_root)
            if version is None:
                raise IndexVersionError(f"no published index version under {index_root!r} (no LATEST)")
        manifest = mf.read_manifest(index_root, version)
        local_dir = _materialise(index_root, manifest, cache_dir)
        vectors_of = {s.id_map: s.vectors for s in manifest.shards if s.vectors}
        id_maps = {}
        for entry in manifest.id_maps:
            table = pq.read_table(os.path.join(local_dir, entry.file), memory_map=True)
            ids = table.column("segment_id").to_numpy()
            if len(ids) > 1 and np.any(ids[1:] <= ids[:-1]):
                order = np.argsort(ids, kind="stable")
                table, ids = table.take(pa.array(order)), ids[order]
            # One chunk per column: taking hit rows from many row-group chunks costs ms per query.
            id_map = _IdMap(ids, table.combine_chunks())
            if entry.file in vectors_of:
                if mf.VECTOR_ROW_COLUMN not in table.column_names:
                    raise IndexVersionError(f"version {version}: id map {entry.file!r} lacks the "
                                            f"{mf.VECTOR_ROW_COLUMN!r} column its stored vectors need")
                rows = table.column(mf.VECTOR_ROW_COLUMN).to_numpy()
                id_map.vectors = StoredVectors.open(os.path.join(local_dir, vectors_of[entry.file]), ids, rows)
            id_maps[entry.file] = id_map
        shards = [_Shard(entry, cls._read_shard(local_dir, manifest, entry)) for entry in manifest.shards]
        logger.info("opened index %s %s: %d vectors, %d shards, modalities %s", index_root, version,
                    manifest.ntotal, len(shards), ",".join(manifest.modalities))
        return cls(index_root, manifest, local_dir, shards, id_maps)

    @staticmethod
    def _read_shard(local_dir: str, manifest: mf.Manifest, entry: mf.ShardEntry) -> Any:
        path = os.path.join(local_dir, entry.file)
        binary = entry.kind == "binary"
        read = faiss.read_index_binary if binary else faiss.read_index
        try:
            try:
                index = read(path, _MMAP_FLAGS)
            except RuntimeError:
                index = read(path)
        except RuntimeError as err:
            raise IndexVersionError(f"version {manifest.version}: cannot read shard {entry.file!r}: {err}") from err
        want_d = manifest.bits if binary else manifest.dim
        if index.d != want_d or index.ntotal != entry.ntotal:
            raise IndexVersionError(f"version {manifest.version}: shard {entry.file!r} holds {index.ntotal} vectors "
                                    f"of dimension {index.d}, the manifest says {entry.ntotal} of {want_d}")
        apply_search_params(index, entry.search_params or manifest.search_params, binary)
        return index

    def file_path(self, name: str) -> str:
        """Local path of a verified extra file of this version (e.g. "model.safetensors")."""
        if name not in {f.file for f in self.manifest.files}:
            listed = [f.file for f in self.manifest.files]
            raise IndexVersionError(f"version {self.version} has no extra file {name!r}; it has {listed}")
        return os.path.join(self.local_dir, name)

    # ------------------------------------------------------------ search

    def _select(self, kind: str, modalities: Sequence[str] | None) -> list[_Shard]:
        if isinstance(modalities, str):
            modalities = [modalities]
        if modalities is not None:
            unknown = [m for m in modalities if m not in MODALITIES]
            if unknown:
                raise ValueError(f"unknown modalities {unknown}: choose from {MODALITIES}")
        return [s for s in self._shards
                if s.entry.kind == kind and (modalities is None or s.entry.modality in modalities)]

    def _run(self, shards: list[_Shard], fn: Callable[[_Shard], tuple[np.ndarray, np.ndarray]], nq: int
             ) -> list[tuple[np.ndarray, np.ndarray]]:
        # Shards run on the pool's threads, each with its own OpenMP team size: one thread
        # for small batches (an OpenMP barrier on a busy core costs more than the search),
        # else the cores shared among the shards.
        threads = 1 if nq < SMALL_BATCH_QUERIES else max(1, (os.cpu_count() or 1) // len(shards))

        def task(shard: _Shard) -> tuple[np.ndarray, np.ndarray]:
            faiss.omp_set_num_threads(threads)
            return fn(shard)

        return list(self._pool.map(task, shards))

    def _check_codes(self, codes: np.ndarray) -> np.ndarray:
        codes = np.ascontiguousarray(codes)
        nbytes = self.manifest.bits // 8
        if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != nbytes:
            raise ValueError(f"codes are {codes.dtype} {codes.shape}, expected uint8 (Q, {nbytes})")
        return codes

    def search(self, queries: np.ndarray, k: int, modalities: Sequence[str] | None = None, *,
               mode: str = "float", codes: np.ndarray | None = None,
               candidates: int | None = None) -> list[list[Hit]]:
        """Top-k rows per query by inner product (best first; ties by segment_id).

        mode "float": the float ANN shards. mode "two_stage": Hamming top-``candidates``
        per shard from the binary shards for ``codes`` (the queries' packed hash codes,
        uint8 (Q, bits // 8)), re-ranked exactly with the stored vectors; candidates
        defaults to max(DEFAULT_CANDIDATES, k).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.manifest.dim:
            raise ValueError(f"queries have shape {queries.shape}, expected (Q, {self.manifest.dim})")
        if mode not in SEARCH_MODES:
            raise ValueError(f"{mode = } must be one of {SEARCH_MODES}")
        if k <= 0:
            raise ValueError(f"{k = } must be > 0")
        if mode == "float":
            return self._search("float", queries, k, modalities, self._float_fn(queries, k))
        if codes is None:
            raise ValueError("mode 'two_stage' needs the queries' hash codes (codes=...)")
        codes = self._check_codes(codes)
        if len(codes) != len(queries):
            raise ValueError(f"{len(queries)} queries but {len(codes)} codes")
        candidates = max(k, DEFAULT_CANDIDATES) if candidates is None else candidates
        if candidates < k:
            raise ValueError(f"{candidates = } must be >= k ({k})")
        shards = self._select("binary", modalities)
        missing = [s.entry.id_map for s in shards if self._id_maps[s.entry.id_map].vectors is None]
        if missing:
            raise IndexVersionError(f"version {self.version} keeps no float vectors for {missing[0]!r}: "
                                    "two-stage search needs a version built with stored vectors")

        def fn(shard: _Shard) -> tuple[np.ndarray, np.ndarray]:
            vectors = self._id_maps[shard.entry.id_map].vectors
            return two_stage_search(shard.index, queries, codes, k, candidates, vectors)

        return self._search("float", queries, k, modalities, fn, shards=shards)

    def _float_fn(self, queries: np.ndarray, k: int) -> Callable[[_Shard], tuple[np.ndarray, np.ndarray]]:
        def fn(shard: _Shard) -> tuple[np.ndarray, np.ndarray]:
            rerank = int(shard.entry.search_params.get(RERANK_PARAM, 0))
            vectors = self._id_maps[shard.entry.id_map].vectors
            if rerank > 1 and vectors is not None:
                return rerank_search(shard.index, queries, k, rerank, vectors)
            return shard.index.search(queries, k)
        return fn

    def search_codes(self, codes: np.ndarray, k: int, modalities: Sequence[str] | None = None) -> list[list[Hit]]:
        """Top-k rows per packed hash code by Hamming distance; score = 1 - d / bits."""
        codes = self._check_codes(codes)
        if k <= 0:
            raise ValueError(f"{k = } must be > 0")
        return self._search("binary", codes, k, modalities, lambda s: s.index.search(codes, k))

    def _search(self, kind: str, queries: np.ndarray, k: int, modalities: Sequence[str] | None,
                fn: Callable[[_Shard], tuple[np.ndarray, np.ndarray]],
                shards: list[_Shard] | None = None) -> list[list[Hit]]:
        # Each shard returns its own top k; the merge orders by score, then segment_id.
        # Where one shard holds more than k rows tied at the cut-off, which of them it
        # returns is up to the index (deterministic for a given version).
        if shards is None:
            shards = self._select(kind, modalities)
        nq = len(queries)
        if not shards or nq == 0:
            return [[] for _ in range(nq)]
        results = self._run(shards, fn, nq)
        dist = np.concatenate([d.astype(np.float64) for d, _ in results], axis=1)
        ids = np.concatenate([i for _, i in results], axis=1)
        owner = np.concatenate([np.full(i.shape, n, np.int32) for n, (_, i) in enumerate(results)], axis=1)
        # Best first: largest inner product, or smallest Hamming distance; then smallest id.
        key = -dist if kind == "float" else dist
        picked: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        wanted: dict[str, list[np.ndarray]] = {}
        for q in range(nq):
            valid = np.nonzero((ids[q] >= 0) & np.isfinite(dist[q]))[0]
            order = valid[np.lexsort((ids[q, valid], key[q, valid]))][:k]
            picked.append((ids[q, order], dist[q, order], owner[q, order]))
            for n in np.unique(owner[q, order]):
                sel = owner[q, order] == n
                wanted.setdefault(shards[n].entry.id_map, []).append(ids[q, order][sel])
        rows = self._lookup(wanted)
        bits = self.manifest.bits
        out: list[list[Hit]] = []
        for hit_ids, hit_dist, _ in picked:
            hits = []
            for sid, d in zip(hit_ids.tolist(), hit_dist.tolist()):
                row = rows[sid]
                score = d if kind == "float" else 1.0 - d / bits
                hits.append(Hit(segment_id=sid, uri=row["uri"], modality=row["modality"], start_s=row["start_s"],
                                end_s=row["end_s"], score=float(score), text=row["text"]))
            out.append(hits)
        return out

    def _lookup(self, wanted: dict[str, list[np.ndarray]]) -> dict[int, dict[str, Any]]:
        rows: dict[int, dict[str, Any]] = {}
        for name, parts in wanted.items():
            ids = np.unique(np.concatenate(parts))
            for sid, row in zip(ids.tolist(), self._id_maps[name].rows(ids, name)):
                rows[sid] = row
        return rows

    # ------------------------------------------------------------ lifetime

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._shards = []

    def __enter__(self) -> "IndexVersion":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
