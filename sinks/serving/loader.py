"""Query-node loader: open a published index version and search it.

Needs only faiss, numpy, pyarrow (and boto3 through storage for s3://): no Beam, no
torch. ``IndexVersion.open`` trusts nothing in the index store: it checks the
manifest's sha256 against LATEST (or the version's SEAL), its HMAC when
``XMODAL_INDEX_SIGNING_KEY`` is set, and its strict schema (plain file names among
others) before fetching anything (:func:`sealed_manifest`); then it fetches every
listed file into a local cache, verified before it gets its name, and prunes the
cache (sinks.serving.cache; local index roots are read in place unless a cache_dir
is given); then it memory-maps the index files, checks them against the manifest,
and searches the shards of the selected modalities in parallel threads (faiss
releases the GIL). docs/SECURITY.md has the threat model.

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
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..errors import ChecksumMismatchError, IndexVersionError
from ..index import manifest as mf
from ..index import seal, tombstones
from ..index.search import (
    RERANK_PARAM,
    StoredVectors,
    apply_search_params,
    rerank_search,
    two_stage_search,
)
from ..schema import MODALITIES
from . import cache

logger = logging.getLogger(__name__)

CACHE_ENV = cache.CACHE_ENV
_MMAP_FLAGS = getattr(faiss, "IO_FLAG_MMAP_IFC", 0) | faiss.IO_FLAG_READ_ONLY
_FAISS_METRICS = {"ip": faiss.METRIC_INNER_PRODUCT}


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


# ---------------------------------------------------------------- the sealed manifest


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sealed_manifest(index_root: str, version: str | None = None,
                    latest: seal.LatestRecord | None = None) -> tuple[mf.Manifest, str]:
    """The manifest of ``version`` (default: the one LATEST names) and its digest,
    after checking its sha256 against LATEST (or the version's SEAL when a version is
    named), its HMAC when ``XMODAL_INDEX_SIGNING_KEY`` is set, and the schema; in that
    order, before any other file of the version is fetched.

    ``latest``: a LATEST record the caller already read (the hot-swap poller).
    """
    if version is None:
        record = latest if latest is not None else seal.read_latest_record(index_root)
        if record is None:
            raise IndexVersionError(f"no published index version under {index_root!r} (no LATEST)")
        version, digest, signature, where = record.version, record.digest, record.signature, "LATEST"
        if digest is None:
            raise IndexVersionError(f"LATEST of {index_root!r} names {version} without a manifest digest (written by "
                                    f"an older release); republish it: `xmodal-index promote {version} --index ...`")
    else:
        mf.version_number(version)
        digest, signature = seal.read_seal(index_root, version)
        where = f"{version}/SEAL"
    data = mf.read_manifest_data(index_root, version)
    return check_sealed_manifest(data, index_root, version, digest, signature, where), digest


def check_sealed_manifest(data: bytes, index_root: str, version: str, digest: str, signature: str | None,
                          where: str) -> mf.Manifest:
    """The manifest in ``data`` (the bytes of ``version``'s manifest.json) when its sha256
    is ``digest``, its HMAC ``signature`` is valid under the node's key (when one is set)
    and it passes the schema; ``where`` names the record the digest came from."""
    actual = seal.manifest_digest(data)
    if actual != digest:
        raise ChecksumMismatchError(f"version {version}: manifest.json has sha256 {actual}, {where} says {digest}; "
                                    "refusing to serve it")
    key = seal.signing_key_from_env()
    if key is not None and not seal.verify_signature(version, digest, signature, key):
        state = "no" if signature is None else "a wrong"
        raise IndexVersionError(f"version {version}: {where} carries {state} hmac-sha256 signature and "
                                f"{seal.SIGNING_KEY_ENV} is set on this node; refusing to serve it")
    return mf.parse_manifest(data, index_root, version)


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

    _tombstones: tombstones.Tombstones | None = None  # incremental versions: ids searches skip
    _paths: dict[str, str] | None = None  # file name -> verified local path (origin files: their version's)

    def __init__(self, index_root: str, manifest: mf.Manifest, local_dir: str,
                 shards: list[_Shard], id_maps: dict[str, _IdMap], digest: str | None = None,
                 held: bool = False) -> None:
        self.index_root = index_root
        self.manifest = manifest
        self.local_dir = local_dir
        self.digest = digest  # sha256 of the manifest.json this version was opened from
        if not held:  # the version's cache directory is never pruned while this is open
            cache.hold(local_dir)
        self._held = True
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
    def open(cls, index_root: str, version: str | None = None, cache_dir: str | None = None, *,
             latest: seal.LatestRecord | None = None, keep_versions: int | None = None) -> IndexVersion:
        """Load ``version`` (default: the one LATEST names) after verifying every file.

        The manifest is checked first (see :func:`sealed_manifest`); then every listed
        file is fetched and verified (sinks.serving.cache), then loaded and checked
        against the manifest. Versions fetched into a cache are pruned to the
        ``keep_versions`` most recently opened (default ``$XMODAL_INDEX_CACHE_KEEP`` or 2).

        Raises IndexVersionError when nothing is published, the manifest is absent or
        refused, ChecksumMismatchError when it or any listed file is altered.
        """
        keep = cache.keep_versions_from_env() if keep_versions is None else keep_versions
        if keep < 1:
            raise ValueError(f"{keep_versions = } must be >= 1")
        manifest, digest = sealed_manifest(index_root, version, latest)
        version = manifest.version
        local_dir = cache.version_dir(index_root, version, cache_dir)
        cache.hold(local_dir)  # from the first fetch on, no prune (of any thread) removes it
        try:
            cache.materialise(index_root, manifest, cache_dir)
            paths = cache.entry_paths(index_root, manifest, cache_dir)
            shards, id_maps = cls._load(local_dir, manifest, paths)
            opened = cls(index_root, manifest, local_dir, shards, id_maps, digest=digest, held=True)
            opened._tombstones = tombstones.load(manifest, paths, id_maps)
            opened._paths = paths
        except BaseException:
            cache.release(local_dir)
            raise
        logger.info("opened index %s %s: %d vectors, %d shards, modalities %s", index_root, version,
                    manifest.ntotal, len(shards), ",".join(manifest.modalities))
        if cache_dir is not None or storage.is_s3(index_root):  # fetched into a cache, not read in place
            cache.prune(os.path.dirname(local_dir), keep)
        return opened

    @classmethod
    def _load(cls, local_dir: str, manifest: mf.Manifest, paths: dict[str, str] | None = None
              ) -> tuple[list[_Shard], dict[str, _IdMap]]:
        """Read the verified files and check them against the manifest."""
        version = manifest.version
        try:
            id_maps = cls._read_id_maps(local_dir, manifest, paths)
        except IndexVersionError:
            raise
        except Exception as err:  # noqa: BLE001 - a verified but unreadable file refuses the version
            raise IndexVersionError(f"version {version}: cannot read its id maps: "
                                    f"{_one_line(f'{type(err).__name__}: {err}')}") from err
        shards = [_Shard(entry, cls._read_shard(local_dir, manifest, entry, paths)) for entry in manifest.shards]
        for shard in shards:
            rows = len(id_maps[shard.entry.id_map].ids)
            if rows != shard.entry.ntotal:
                raise IndexVersionError(f"version {version}: id map {shard.entry.id_map!r} has {rows} rows, shard "
                                        f"{shard.entry.file!r} holds {shard.entry.ntotal}")
        return shards, id_maps

    @staticmethod
    def _read_id_maps(local_dir: str, manifest: mf.Manifest, paths: dict[str, str] | None = None
                      ) -> dict[str, _IdMap]:
        version = manifest.version
        vectors_of = {s.id_map: s.vectors for s in manifest.shards if s.vectors}
        id_maps = {}
        where = paths or {}
        for entry in manifest.id_maps:
            table = pq.read_table(where.get(entry.file) or cache.file_path(local_dir, entry.file), memory_map=True)
            ids = table.column("segment_id").to_numpy()
            if len(ids) > 1 and np.any(ids[1:] <= ids[:-1]):
                order = np.argsort(ids, kind="stable")
                table, ids = table.take(pa.array(order)), ids[order]
                if np.any(ids[1:] == ids[:-1]):
                    raise IndexVersionError(f"version {version}: id map {entry.file!r} repeats a segment id")
            # One chunk per column: taking hit rows from many row-group chunks costs ms per query.
            id_map = _IdMap(ids, table.combine_chunks())
            if entry.file in vectors_of:
                if mf.VECTOR_ROW_COLUMN not in table.column_names:
                    raise IndexVersionError(f"version {version}: id map {entry.file!r} lacks the "
                                            f"{mf.VECTOR_ROW_COLUMN!r} column its stored vectors need")
                rows = table.column(mf.VECTOR_ROW_COLUMN).to_numpy()
                vectors_path = where.get(vectors_of[entry.file]) or cache.file_path(local_dir, vectors_of[entry.file])
                id_map.vectors = StoredVectors.open(vectors_path, ids, rows)
            id_maps[entry.file] = id_map
        return id_maps

    @staticmethod
    def _read_shard(local_dir: str, manifest: mf.Manifest, entry: mf.ShardEntry,
                    paths: dict[str, str] | None = None) -> Any:
        path = (paths or {}).get(entry.file) or cache.file_path(local_dir, entry.file)
        binary = entry.kind == "binary"
        read = faiss.read_index_binary if binary else faiss.read_index
        try:
            try:
                index = read(path, _MMAP_FLAGS)
            except RuntimeError:
                index = read(path)
        except RuntimeError as err:
            raise IndexVersionError(f"version {manifest.version}: cannot read shard {entry.file!r}: "
                                    f"{_one_line(str(err))}") from err
        want_d = manifest.bits if binary else manifest.dim
        if index.d != want_d or index.ntotal != entry.ntotal:
            raise IndexVersionError(f"version {manifest.version}: shard {entry.file!r} holds {index.ntotal} vectors "
                                    f"of dimension {index.d}, the manifest says {entry.ntotal} of {want_d}")
        metric_type = None if binary else getattr(index, "metric_type", None)  # binary indexes are Hamming
        if not binary and metric_type != _FAISS_METRICS[manifest.metric]:
            raise IndexVersionError(f"version {manifest.version}: shard {entry.file!r} has faiss metric "
                                    f"{metric_type}, the manifest says {manifest.metric!r}")
        apply_search_params(index, entry.search_params or manifest.search_params, binary)
        return index

    def listed_path(self, name: str) -> str:
        """Local path of any verified file the manifest lists (files of an older version
        that an entry names by ``origin`` included)."""
        return (self._paths or {}).get(name) or cache.file_path(self.local_dir, name)

    def tombstoned(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``ids`` this (incremental) version deleted; its id maps still hold them."""
        ids = np.asarray(ids, dtype=np.int64)
        return np.zeros(ids.shape, bool) if self._tombstones is None else self._tombstones.dead(ids)

    def file_path(self, name: str) -> str:
        """Local path of a verified extra file of this version (e.g. "model.safetensors")."""
        if name not in {f.file for f in self.manifest.files}:
            listed = [f.file for f in self.manifest.files]
            raise IndexVersionError(f"version {self.version} has no extra file {name!r}; it has {listed}")
        return (self._paths or {}).get(name) or cache.file_path(self.local_dir, name)

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
            if vectors is None:  # checked above for every selected shard
                raise IndexVersionError(f"version {self.version} keeps no float vectors for {shard.entry.id_map!r}")
            extra = self._extra(shard)
            return two_stage_search(shard.index, queries, codes, k + extra, candidates + extra, vectors)

        return self._search("float", queries, k, modalities, fn, shards=shards)

    def _float_fn(self, queries: np.ndarray, k: int) -> Callable[[_Shard], tuple[np.ndarray, np.ndarray]]:
        def fn(shard: _Shard) -> tuple[np.ndarray, np.ndarray]:
            rerank = int(shard.entry.search_params.get(RERANK_PARAM, 0))
            vectors = self._id_maps[shard.entry.id_map].vectors
            if rerank > 1 and vectors is not None:
                return rerank_search(shard.index, queries, k + self._extra(shard), rerank, vectors)
            params = None if self._tombstones is None else self._tombstones.search_params(shard.index,
                                                                                          shard.entry.id_map)
            if params is not None:
                return shard.index.search(queries, k, params=params)
            return shard.index.search(queries, k + self._extra(shard))
        return fn

    def _extra(self, shard: _Shard) -> int:
        """Rows of the shard that are tombstoned: it returns that many more than k."""
        return 0 if self._tombstones is None else self._tombstones.extra(shard.entry.id_map)

    def search_codes(self, codes: np.ndarray, k: int, modalities: Sequence[str] | None = None) -> list[list[Hit]]:
        """Top-k rows per packed hash code by Hamming distance; score = 1 - d / bits."""
        codes = self._check_codes(codes)
        if k <= 0:
            raise ValueError(f"{k = } must be > 0")
        return self._search("binary", codes, k, modalities, lambda s: s.index.search(codes, k + self._extra(s)))

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
            live = (ids[q] >= 0) & np.isfinite(dist[q])
            if self._tombstones is not None:
                live &= ~self._tombstones.dead(ids[q])
            valid = np.nonzero(live)[0]
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
        if self._held:
            self._held = False
            cache.release(self.local_dir)

    def __enter__(self) -> IndexVersion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
