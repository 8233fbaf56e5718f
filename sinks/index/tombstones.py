"""Tombstones of an incremental version: the segment ids its searches skip.

A tombstone file is an .npy array of sorted, unique little-endian int64 segment ids,
listed in the manifest as ``tombstones: {file, sha256, bytes, count}`` (and verified
with the version's other files). Needs only numpy: query nodes load it.

Searching with tombstones: a float shard whose index takes a FAISS id selector (IVF,
IDMap over a flat index, HNSW) is searched with ``IDSelectorNot(IDSelectorBatch(its
tombstoned ids))``; any other shard (binary, re-ranked, two-stage) is asked for ``k``
plus the number of its rows that are tombstoned. Tombstoned ids are dropped before
the merge either way, so every shard still contributes its best ``k`` live rows
(exact indexes: exactly what a version built without those rows returns).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import faiss
import numpy as np

from ..errors import IndexVersionError


def read_tombstones(path: str, count: int | None = None, name: str = "tombstones") -> np.ndarray:
    """The sorted, unique int64 segment ids of a tombstone file; IndexVersionError otherwise."""
    try:
        ids = np.load(path, allow_pickle=False, mmap_mode=None)
    except (OSError, ValueError) as err:
        raise IndexVersionError(f"cannot read tombstone file {name!r}: {err}") from err
    if not isinstance(ids, np.ndarray) or ids.dtype != np.dtype("<i8") or ids.ndim != 1:
        raise IndexVersionError(f"tombstone file {name!r} is not a 1-d int64 array")
    if len(ids) > 1 and np.any(ids[1:] <= ids[:-1]):
        raise IndexVersionError(f"tombstone file {name!r} is not sorted and unique")
    if count is not None and len(ids) != count:
        raise IndexVersionError(f"tombstone file {name!r} holds {len(ids)} ids, the manifest says {count}")
    return ids


@dataclasses.dataclass
class Tombstones:
    ids: np.ndarray  # sorted int64
    per_id_map: dict[str, np.ndarray]  # tombstoned ids of each id map (= of each of its shards)
    _params: dict[int, Any] = dataclasses.field(default_factory=dict)  # id(index) -> (params, selectors)

    def extra(self, id_map: str) -> int:
        """How many more rows than k a shard of ``id_map`` must return (without a selector)."""
        dead = self.per_id_map.get(id_map)
        return 0 if dead is None else len(dead)

    def search_params(self, index: Any, id_map: str) -> Any:
        """FAISS search parameters that skip the shard's tombstoned ids (with the
        index's own nprobe / efSearch), or None: then over-fetch by ``extra``."""
        dead = self.per_id_map.get(id_map)
        if dead is None:
            return None
        key = id(index)
        if key not in self._params:
            self._params[key] = _selector_params(index, dead)
        found = self._params[key]
        return None if found is None else found[0]

    def dead(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``ids`` are tombstoned."""
        if not len(self.ids):
            return np.zeros(ids.shape, bool)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return self.ids[pos] == ids


def _selector_params(index: Any, dead: np.ndarray) -> tuple[Any, ...] | None:
    batch = faiss.IDSelectorBatch(dead)
    sel = faiss.IDSelectorNot(batch)
    ivf = faiss.try_extract_index_ivf(index)
    inner = faiss.downcast_index(index)
    params: Any
    if ivf is not None:
        params = faiss.SearchParametersIVF(sel=sel, nprobe=int(ivf.nprobe))  # type: ignore[call-arg]
    elif isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)) and isinstance(
            faiss.downcast_index(inner.index), faiss.IndexFlat):
        params = faiss.SearchParameters(sel=sel)  # type: ignore[call-arg]
    elif isinstance(inner, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(sel=sel, efSearch=int(inner.hnsw.efSearch))  # type: ignore[attr-defined]
    else:
        return None
    return params, sel, batch  # the selectors live as long as the parameters


def load(manifest: Any, paths: Mapping[str, str], id_maps: Mapping[str, Any]) -> Tombstones | None:
    """The version's tombstones (None without any), counted per id map; every
    tombstoned id must be a row of the version."""
    entry = manifest.tombstones
    if entry is None:
        return None
    count = int(manifest.extra["tombstones"]["count"])
    ids = read_tombstones(paths[entry.file], count, entry.file)
    per: dict[str, np.ndarray] = {}
    found = 0
    for name, id_map in id_maps.items():
        dead = id_map.ids[np.isin(id_map.ids, ids, assume_unique=True)]
        if len(dead):
            per[name] = dead
            found += len(dead)
    if found != len(ids):
        raise IndexVersionError(f"version {manifest.version}: {len(ids) - found} tombstoned segment ids are not "
                                "rows of the version; refusing it")
    return Tombstones(ids, per)
