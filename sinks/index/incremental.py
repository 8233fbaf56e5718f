"""Incremental index versions: the parent's files by reference, the run's rows as
delta shards, deletions as tombstones.

``build_increment`` writes a new version of ``index_root`` from its parent version:

- every shard, id map, stored-vectors and extra file of the parent is listed again
  with ``origin`` naming the version directory that holds it (never copied; a file
  the parent itself referenced keeps its origin);
- the run's new rows (segment ids not in the parent) become one delta shard per
  modality: a float and a binary index cloned empty from the parent's trained
  indexes of that modality (same quantizers, same search parameters), with their
  own id map and float16 vectors, named ``delta-vNNNNNN-<modality>.*``;
- deleted segment ids (and the old rows of changed files) go to a tombstone file:
  the sorted int64 segment ids of the version that searches skip
  (``tombstones-vNNNNNN.npy``, an .npy file, cumulative since the last full build).

Segment ids stay unique across a version's shards: a new row whose id the parent
holds is not added again (a tombstoned one is revived instead), and a deleted id is
tombstoned wherever it lives. ``ntotal`` counts live rows (shard totals less
tombstones). The manifest's ``base_version`` names the full build whose quantizers
the deltas use and ``delta_count`` how many increments were stacked on it;
``sinks/index/compaction.py`` decides when a full build folds them in again.

Every parent file read here is checked against the parent manifest's sha256 first.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..embeddings_io import embedding_matrix, hash_matrix
from ..errors import ChecksumMismatchError
from . import manifest as mf
from .config import IndexBuildError
from .publish import publish_unfenced, reserve_version
from .recall import RECALL_K
from .search import apply_search_params
from .shard import id_map_table
from .tombstones import read_tombstones

logger = logging.getLogger(__name__)

TOMBSTONES_KEY = "tombstones"
BASE_VERSION_KEY = "base_version"
DELTA_COUNT_KEY = "delta_count"
_MMAP_FLAGS = getattr(faiss, "IO_FLAG_MMAP", 0) | faiss.IO_FLAG_READ_ONLY
DRIFT_QUERIES = 200  # delta rows whose neighbours measure the delta's recall@10 (drift)
DRIFT_MIN_ROWS = 100  # smaller deltas are not measured


class IncrementalError(IndexBuildError):
    """An incremental version cannot be built on this parent (a full build can)."""


def base_version(manifest: mf.Manifest) -> str:
    """The full build whose trained indexes ``manifest``'s shards use."""
    return str(manifest.extra.get(BASE_VERSION_KEY) or manifest.version)


def delta_count(manifest: mf.Manifest) -> int:
    return int(manifest.extra.get(DELTA_COUNT_KEY, 0))


def tombstone_count(manifest: mf.Manifest) -> int:
    entry = manifest.extra.get(TOMBSTONES_KEY)
    return int(entry["count"]) if entry else 0


def _referenced(entry: Any, parent: mf.Manifest) -> Any:
    return dataclasses.replace(entry, origin=entry.origin or parent.version)


class _Parent:
    """Verified local copies of the parent's files, fetched on first use."""

    def __init__(self, index_root: str, manifest: mf.Manifest, tmp: str) -> None:
        self.root, self.manifest, self.tmp = index_root, manifest, tmp
        self.bytes_read = 0

    def path(self, entry: mf.FileEntry) -> str:
        local = os.path.join(self.tmp, f"{entry.origin or self.manifest.version}-{entry.file}")
        if not os.path.exists(local):
            uri = mf.entry_uri(self.root, self.manifest, entry)
            with storage.local_path(uri) as src:
                digest = mf.sha256_file(src)
                if digest != entry.sha256:
                    raise ChecksumMismatchError(f"parent {self.manifest.version}: {entry.file} ({uri}) has sha256 "
                                                f"{digest}, its manifest says {entry.sha256}")
                if storage.is_s3(uri):
                    os.replace(src, local)
                else:
                    os.symlink(os.path.abspath(src), local)
            self.bytes_read += entry.bytes
        return local

    def ids(self) -> np.ndarray:
        """Every segment id in the parent's shards (tombstoned ones included), sorted."""
        parts = [pq.read_table(self.path(e), columns=["segment_id"]).column("segment_id").to_numpy()
                 for e in self.manifest.id_maps]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def tombstones(self) -> np.ndarray:
        entry = self.manifest.tombstones
        if entry is None:
            return np.zeros(0, np.int64)
        return read_tombstones(self.path(entry), tombstone_count(self.manifest), entry.file)

    def empty_indexes(self, modality: str) -> tuple[mf.ShardEntry, Any, mf.ShardEntry, Any]:
        """The parent's float and binary shard entries of ``modality`` and empty trained copies."""
        by_kind = {}
        for kind in mf.SHARD_KINDS:
            entry = next(s for s in self.manifest.shards if s.modality == modality and s.kind == kind)
            path = self.path(mf.FileEntry(entry.file, entry.sha256, entry.bytes, entry.origin))
            by_kind[kind] = (entry, _empty_copy(path, kind == "binary"))
        return (*by_kind["float"], *by_kind["binary"])


def _empty_copy(path: str, binary: bool) -> Any:
    """A trained index without vectors, like the one at ``path`` (its lists never copied)."""
    index: Any
    empty: Any
    if binary:
        index = faiss.read_index_binary(path)
        empty = faiss.deserialize_index_binary(faiss.serialize_index_binary(index))
        empty.reset()
        return empty
    try:
        index = faiss.read_index(path, _MMAP_FLAGS)
    except RuntimeError:
        index = faiss.read_index(path)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:  # swap in empty lists before cloning: the parent's lists are never copied
        lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
        ivf.replace_invlists(lists, False)
        empty = faiss.clone_index(index)
        del lists
    else:
        empty = faiss.clone_index(index)
    empty.reset()
    return empty


@dataclasses.dataclass
class _Rows:
    ids: list[np.ndarray] = dataclasses.field(default_factory=list)
    x: list[np.ndarray] = dataclasses.field(default_factory=list)
    codes: list[np.ndarray] = dataclasses.field(default_factory=list)
    id_maps: list[pa.Table] = dataclasses.field(default_factory=list)


def _new_rows(batches: Iterable[pa.RecordBatch], known: np.ndarray, deleted: np.ndarray, dim: int, bits: int,
              model_id: str) -> tuple[dict[str, _Rows], np.ndarray]:
    """Rows to add by modality (first row of each new id; not deleted), and the known ids the run saw again."""
    seen = np.zeros(0, np.int64)
    again: list[np.ndarray] = []
    out: dict[str, _Rows] = {}
    for batch in batches:
        if not batch.num_rows:
            continue
        models = set(batch.column("model_id").unique().to_pylist())
        if models != {model_id}:
            raise IncrementalError(f"rows of model {sorted(models)[:2]} in a run on an index of {model_id!r}: "
                                   "a model change needs a full build")
        ids = batch.column("segment_id").to_numpy()
        _, first = np.unique(ids, return_index=True)
        keep = np.zeros(len(ids), bool)
        keep[first] = True
        keep &= ~np.isin(ids, seen)
        in_parent = np.isin(ids, known)
        again.append(ids[keep & in_parent])
        keep &= ~in_parent & ~np.isin(ids, deleted)
        seen = np.union1d(seen, ids)
        rows = np.nonzero(keep)[0]
        if not len(rows):
            continue
        sub = batch.take(pa.array(rows))
        x = embedding_matrix(sub.column("embedding"))
        codes = hash_matrix(sub.column("hash_code"))
        if x.shape[1] != dim or codes.shape[1] * 8 != bits:
            raise IncrementalError(f"rows of dimension {x.shape[1]} / {codes.shape[1] * 8} bits on an index of "
                                   f"{dim = } / {bits = }: a full build is needed")
        table = id_map_table(sub)
        modalities = sub.column("modality").to_numpy(zero_copy_only=False)
        for modality in np.unique(modalities).tolist():
            sel = np.nonzero(modalities == modality)[0]
            rows_of = out.setdefault(modality, _Rows())
            rows_of.ids.append(ids[rows][sel])
            rows_of.x.append(x[sel])
            rows_of.codes.append(codes[sel])
            rows_of.id_maps.append(table.take(pa.array(sel)))
    return out, np.unique(np.concatenate(again)) if again else np.zeros(0, np.int64)


def delta_recall(index: Any, x: np.ndarray, ids: np.ndarray, seed: int = 0) -> float | None:
    """recall@10 of ``index`` (holding ``x`` as ``ids``) for up to DRIFT_QUERIES of its own
    rows against exact search among them, each query's own row left out; None below
    DRIFT_MIN_ROWS rows. Where the parent's quantizers fit the new rows poorly (drift),
    it drops below what the base build measured."""
    if len(ids) < DRIFT_MIN_ROWS:
        return None
    pick = np.random.default_rng(seed).choice(len(ids), min(DRIFT_QUERIES, len(ids)), replace=False)
    queries = np.ascontiguousarray(x[pick])
    _, exact = faiss.knn(queries, x, RECALL_K + 1, metric=faiss.METRIC_INNER_PRODUCT)
    _, found = index.search(queries, RECALL_K + 1)
    hits = total = 0
    for q, row in enumerate(pick):
        me = int(ids[row])
        want = [int(i) for i in ids[exact[q]] if i != me][:RECALL_K]
        got = [int(i) for i in found[q] if i >= 0 and i != me][:RECALL_K]
        hits += len(set(want) & set(got))
        total += len(want)
    return round(hits / total, 4)


def _write_delta(stem: str, rows: _Rows, float_index: Any, binary_index: Any, tmp: str,
                 search_params: dict[str, int]) -> tuple[dict[str, str], int, float | None]:
    ids = np.concatenate(rows.ids).astype(np.int64)
    x = np.ascontiguousarray(np.concatenate(rows.x), dtype=np.float32)
    codes = np.ascontiguousarray(np.concatenate(rows.codes))
    float_index.add_with_ids(x, ids)
    binary_index.add_with_ids(codes, ids)
    apply_search_params(float_index, search_params, False)
    recall = delta_recall(float_index, x, ids)
    files = {kind: os.path.join(tmp, f"{stem}.{kind}.faiss") for kind in mf.SHARD_KINDS}
    files["ids"] = os.path.join(tmp, f"{stem}.ids.parquet")
    files["vectors"] = os.path.join(tmp, f"{stem}.vectors.npy")
    faiss.write_index(float_index, files["float"])
    faiss.write_index_binary(binary_index, files["binary"])
    np.save(files["vectors"], x.astype("<f2"), allow_pickle=False)
    table = pa.concat_tables(rows.id_maps)
    table = table.append_column(mf.VECTOR_ROW_COLUMN, pa.array(np.arange(len(ids), dtype=np.int64)))
    pq.write_table(table.sort_by("segment_id"), files["ids"], compression="zstd")
    return files, len(ids), recall


def build_increment(
    index_root: str,
    parent_version: str,
    batches: Iterable[pa.RecordBatch],
    deleted_ids: np.ndarray | Iterable[int] = (),
    *,
    version: str | None = None,
    publish: bool = False,
    metrics_extra: dict[str, Any] | None = None,
) -> mf.Manifest:
    """Write an incremental version on ``parent_version`` of ``index_root``: the
    parent's files by reference, ``batches`` (embedding rows of the parent's model)
    as delta shards, ``deleted_ids`` as tombstones. Returns its manifest; LATEST
    moves only with ``publish`` (else see sinks/index/publish.py).

    Raises IncrementalError when the rows cannot join the parent (another model,
    dimension, or a modality the parent has no trained index for).
    """
    started = time.monotonic()
    parent = mf.read_manifest(index_root, parent_version)
    deleted = np.unique(np.fromiter(deleted_ids, np.int64) if not isinstance(deleted_ids, np.ndarray)
                        else deleted_ids.astype(np.int64))
    with tempfile.TemporaryDirectory(prefix="xmodal-index-increment-") as tmp:
        source = _Parent(index_root, parent, tmp)
        known = source.ids()
        dead_before = source.tombstones()
        rows, again = _new_rows(batches, known, deleted, parent.dim, parent.bits, parent.model_id)
        missing = sorted(set(rows) - set(parent.modalities))
        if missing:
            raise IncrementalError(f"rows of modality {missing[0]!r}, which {parent.version} has no trained "
                                   "index for: a full build is needed")
        version = version or reserve_version(index_root)
        revived = np.intersect1d(again, dead_before)
        dead = np.union1d(np.setdiff1d(dead_before, revived), np.intersect1d(deleted, known))
        local: dict[str, str] = {}
        shards = [_referenced(s, parent) for s in parent.shards]
        id_maps = [_referenced(f, parent) for f in parent.id_maps]
        vectors = [_referenced(f, parent) for f in parent.vectors]
        added = 0
        for modality in sorted(rows):
            float_entry, float_index, binary_entry, binary_index = source.empty_indexes(modality)
            stem = f"delta-{version}-{modality}"
            files, n, recall = _write_delta(stem, rows[modality], float_index, binary_index, tmp,
                                            dict(float_entry.search_params))
            added += n
            ids_entry = mf.FileEntry.of_local(files["ids"], os.path.basename(files["ids"]))
            vec_entry = mf.FileEntry.of_local(files["vectors"], os.path.basename(files["vectors"]))
            id_maps.append(ids_entry)
            vectors.append(vec_entry)
            local[ids_entry.file], local[vec_entry.file] = files["ids"], files["vectors"]
            for kind, like in (("float", float_entry), ("binary", binary_entry)):
                entry = mf.FileEntry.of_local(files[kind], os.path.basename(files[kind]))
                local[entry.file] = files[kind]
                shards.append(mf.ShardEntry(
                    file=entry.file, sha256=entry.sha256, bytes=entry.bytes, ntotal=n, modality=modality, kind=kind,
                    id_map=ids_entry.file, factory=like.factory, search_params=dict(like.search_params),
                    recall_at_10=recall if kind == "float" else None, vectors=vec_entry.file))
        extra: dict[str, Any] = {BASE_VERSION_KEY: base_version(parent),
                                 DELTA_COUNT_KEY: delta_count(parent) + (1 if added else 0)}
        if len(dead):
            previous = parent.tombstones
            if previous is not None and np.array_equal(dead, dead_before):
                extra[TOMBSTONES_KEY] = {**_referenced(previous, parent).to_dict(), "count": int(len(dead))}
            else:
                path = os.path.join(tmp, f"tombstones-{version}.npy")
                np.save(path, dead.astype("<i8"), allow_pickle=False)
                entry = mf.FileEntry.of_local(path, os.path.basename(path))
                local[entry.file] = path
                extra[TOMBSTONES_KEY] = {**entry.to_dict(), "count": int(len(dead))}
        ntotal = len(known) + added - len(dead)
        stats: dict[str, Any] = {
            "incremental": {"parent": parent.version, "added": added,
                            "deleted": int(len(np.setdiff1d(dead, dead_before))),
                            "revived": int(len(revived)), "tombstones": int(len(dead)),
                            "parent_bytes_read": source.bytes_read,
                            "new_bytes": sum(os.path.getsize(p) for p in local.values())},
        }
        metrics = dict(parent.metrics)
        metrics["recall_measured_on"] = parent.metrics.get("recall_measured_on", base_version(parent))
        metrics["delta_recall_at_10"] = {s.modality: s.recall_at_10 for s in shards  # the drift check, per delta
                                         if s.kind == "float" and s.file.startswith(f"delta-{version}-")}
        metrics.update(metrics_extra or {})
        manifest = mf.Manifest(
            version=version, created_at=mf.utc_now_iso(), parent_version=parent.version, model_id=parent.model_id,
            dim=parent.dim, bits=parent.bits, metric=parent.metric, index_factory=dict(parent.index_factory),
            shards=tuple(shards), id_maps=tuple(id_maps), files=tuple(_referenced(f, parent) for f in parent.files),
            ntotal=ntotal, metrics=metrics, search_params=dict(parent.search_params),
            build_config=dict(parent.build_config), vectors=tuple(vectors), index_choice=dict(parent.index_choice),
            build_stats=stats, extra=extra,
        )
        for name in sorted(local):
            storage.put_file(local[name], storage.join(index_root, version, name))
        stats["wall_s"] = round(time.monotonic() - started, 3)
        manifest = dataclasses.replace(manifest, build_stats=stats)
        mf.write_manifest(index_root, manifest)
    if publish:
        publish_unfenced(index_root, version)
    logger.info("incremental version %s of %s on %s: %d added, %d tombstones, %d live, %.1f s", version, index_root,
                parent.version, added, len(dead), ntotal, time.monotonic() - started)
    return manifest


__all__ = ["IncrementalError", "base_version", "build_increment", "delta_count", "read_tombstones",
           "tombstone_count"]
