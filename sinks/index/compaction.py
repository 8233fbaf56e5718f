"""When a run builds an incremental version and when a full one: :class:`IncrementalConfig`
and :func:`decide_build`.

A light module (no faiss, numpy or pyarrow). A full build reads every live row,
trains new quantizers and writes new base shards: it is how deltas and tombstones
are folded in (compaction) and how a model, dimension or metric change is taken.
An incremental version (sinks/index/incremental.py) is built otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

DELTA_PREFIX = "delta-"


@dataclasses.dataclass(frozen=True)
class IncrementalConfig:
    """Compaction policy of incremental versions.

    enabled: build incremental versions at all (False: every run rebuilds).
    max_deltas: increments stacked on one full build; the next run compacts.
    max_delta_fraction: share of the live rows held in delta shards above which
      the run compacts (deltas are not re-tuned and fragment the search).
    max_tombstone_fraction: share of the shards' rows that are tombstoned above
      which the run compacts (searches over-fetch by the tombstones of a shard).
    drift_recall_margin: a delta's recall@10, measured on its own rows when it is
      built (the parent's quantizers on the new data), below the build's
      recall_target less this margin means the data drifted: the next run retrains.
    """

    enabled: bool = True
    max_deltas: int = 8
    max_delta_fraction: float = 0.2
    max_tombstone_fraction: float = 0.1
    drift_recall_margin: float = 0.05

    def __post_init__(self) -> None:
        if self.max_deltas < 0:
            raise ValueError(f"{self.max_deltas = } must be >= 0 (0 = never incremental)")
        if not 0.0 <= self.max_delta_fraction <= 1.0:
            raise ValueError(f"{self.max_delta_fraction = } must be within [0, 1]")
        if not 0.0 <= self.max_tombstone_fraction <= 1.0:
            raise ValueError(f"{self.max_tombstone_fraction = } must be within [0, 1]")
        if not 0.0 <= self.drift_recall_margin <= 1.0:
            raise ValueError(f"{self.drift_recall_margin = } must be within [0, 1]")


@dataclasses.dataclass(frozen=True)
class BuildDecision:
    incremental: bool
    reason: str


def decide_build(parent: Any, *, model_id: str, dim: int, bits: int, metric: str, modalities: set[str],
                 added_rows: int, deleted_rows: int, config: IncrementalConfig,
                 rebuild: bool = False) -> BuildDecision:
    """Incremental on ``parent`` (a Manifest, or None) or a full build, with the reason.

    added_rows / deleted_rows: rows the run adds / tombstones; modalities: those of
    the added rows.
    """
    def full(reason: str) -> BuildDecision:
        return BuildDecision(False, reason)

    if rebuild:
        return full("a full rebuild was asked for (--rebuild-index)")
    if parent is None:
        return full("no published version to build on")
    if not config.enabled:
        return full("incremental versions are off ([incremental] enabled = false)")
    for name, new, old in (("model_id", model_id, parent.model_id), ("dim", dim, parent.dim),
                           ("bits", bits, parent.bits), ("metric", metric, parent.metric)):
        if new != old:
            return full(f"{name} changed ({old} -> {new}): new quantizers are trained")
    missing = sorted(set(modalities) - set(parent.modalities))
    if missing:
        return full(f"modality {missing[0]} is new: it has no trained index to add to")
    target = float((parent.build_config or {}).get("recall_target", 0.0))
    measured = [s.recall_at_10 for s in parent.shards
                if s.kind == "float" and s.file.startswith(DELTA_PREFIX) and s.recall_at_10 is not None]
    if measured and min(measured) < target - config.drift_recall_margin:
        return full(f"drift: a delta's recall@10 {min(measured):.3f} is below recall_target {target} less "
                    f"drift_recall_margin {config.drift_recall_margin}; retraining")
    deltas = int(parent.extra.get("delta_count", 0)) + (1 if added_rows else 0)
    if deltas > config.max_deltas:
        return full(f"compaction: {deltas} deltas would exceed max_deltas {config.max_deltas}")
    stored = sum(s.ntotal for s in parent.shards if s.kind == "float")
    in_deltas = sum(s.ntotal for s in parent.shards if s.kind == "float" and s.file.startswith(DELTA_PREFIX))
    tombstones = int((parent.extra.get("tombstones") or {}).get("count", 0))
    live = parent.ntotal + added_rows - deleted_rows
    if live <= 0:
        return full("no live rows would remain")
    delta_share = (in_deltas + added_rows) / live
    if delta_share > config.max_delta_fraction:
        return full(f"compaction: deltas would hold {delta_share:.1%} of the live rows, over max_delta_fraction "
                    f"{config.max_delta_fraction}")
    dead_share = (tombstones + deleted_rows) / (stored + added_rows)
    if dead_share > config.max_tombstone_fraction:
        return full(f"compaction: {dead_share:.1%} of the rows would be tombstoned, over max_tombstone_fraction "
                    f"{config.max_tombstone_fraction}")
    return BuildDecision(True, f"incremental on {parent.version}: {added_rows} rows added, {deleted_rows} deleted")
