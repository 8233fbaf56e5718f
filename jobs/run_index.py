"""The run's index build: an incremental version on LATEST when the compaction policy
allows it (sinks/index/compaction.py), else a full build of every live row.

The run's change is read against the version it builds on, not against the
previous ledger (a refused or forced version may lie between them): the live
(uri, etag) pairs of the new ledger are compared with those of the parent's live
rows (its id maps less its tombstones). Inputs the parent lacks are added (their
rows, read from the run that indexed them); parent rows whose (uri, etag) is no
longer live (deleted or changed inputs) are tombstoned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from xmodal_index.sinks import storage
from xmodal_index.sinks.embeddings_io import live_batches
from xmodal_index.sinks.errors import ChecksumMismatchError
from xmodal_index.sinks.index import manifest as mf
from xmodal_index.sinks.index.build import build_version
from xmodal_index.sinks.index.compaction import BuildDecision, IncrementalConfig, decide_build
from xmodal_index.sinks.index.config import IndexBuildConfig
from xmodal_index.sinks.index.incremental import IncrementalError, build_increment
from xmodal_index.sinks.index.tombstones import read_tombstones
from xmodal_index.sinks.ledger import LedgerEntry

logger = logging.getLogger(__name__)


def _verified_read(index_root: str, manifest: mf.Manifest, entry: mf.FileEntry, read: Callable[[str], Any]) -> Any:
    uri = mf.entry_uri(index_root, manifest, entry)
    with storage.local_path(uri) as path:
        digest = mf.sha256_file(path)
        if digest != entry.sha256:
            raise ChecksumMismatchError(f"{manifest.version}: {entry.file} ({uri}) has sha256 {digest}, its manifest "
                                        f"says {entry.sha256}")
        return read(path)


def parent_rows(index_root: str, parent: mf.Manifest) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Segment ids and (uri, etag) of the parent's live rows."""
    ids, pairs = [], []
    for entry in parent.id_maps:
        table = _verified_read(index_root, parent, entry,
                               lambda p: pq.read_table(p, columns=["segment_id", "uri", "etag"]))
        ids.append(table.column("segment_id").to_numpy())
        pairs += list(zip(table.column("uri").to_pylist(), table.column("etag").to_pylist()))
    all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    tomb = parent.tombstones
    if tomb is not None:
        dead = _verified_read(index_root, parent, tomb, lambda p: read_tombstones(p, None, tomb.file))
        live = ~np.isin(all_ids, dead)
        all_ids = all_ids[live]
        pairs = [p for p, keep in zip(pairs, live.tolist()) if keep]
    return all_ids, pairs


def build_index(index_root: str, parent_version: str | None, workdir: str, entries: Mapping[str, LedgerEntry], *,
                model_id: str, dim: int, bits: int, config: IndexBuildConfig, policy: IncrementalConfig,
                rebuild: bool, version: str, extra_files: Mapping[str, str], metrics_extra: Mapping[str, Any],
                progress: Callable[..., None] | None = None) -> BuildDecision:
    """Upload ``version`` (unpublished) holding the live rows of ``entries``; returns how it was built."""
    parent = mf.read_manifest(index_root, parent_version) if parent_version else None
    decision = decide_build(parent, model_id=model_id, dim=dim, bits=bits, metric=config.metric,
                            modalities=set(parent.modalities) if parent else set(), added_rows=0, deleted_rows=0,
                            config=policy, rebuild=rebuild)
    if decision.incremental and parent is not None:
        ids, pairs = parent_rows(index_root, parent)
        have = set(pairs)
        live = {(e.uri, e.etag) for e in entries.values() if e.state == "indexed"}
        new = {u: e for u, e in entries.items() if e.state == "indexed" and (e.uri, e.etag) not in have}
        gone = np.fromiter((p not in live for p in pairs), bool, len(pairs))
        deleted = ids[gone]
        decision = decide_build(parent, model_id=model_id, dim=dim, bits=bits, metric=config.metric,
                                modalities=set(parent.modalities), added_rows=sum(e.segments for e in new.values()),
                                deleted_rows=len(deleted), config=policy, rebuild=rebuild)
        if decision.incremental:
            try:
                build_increment(index_root, parent.version, live_batches(workdir, new, model_id)(), deleted,
                                version=version, metrics_extra=dict(metrics_extra))
                logger.info("index: %s", decision.reason)
                return decision
            except IncrementalError as err:
                decision = BuildDecision(False, str(err))
    logger.info("index: full build: %s", decision.reason)
    build_version(live_batches(workdir, entries, model_id), index_root, model_id=model_id, dim=dim, bits=bits,
                  config=config, extra_files=extra_files, metrics_extra=metrics_extra, version=version, publish=False,
                  progress=progress)
    return decision
