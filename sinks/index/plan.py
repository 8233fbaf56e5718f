"""Shards of a version: contiguous segment-id ranges per modality, and the groups of
shards that one build pass fills together."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from .choice import IndexChoice
from .config import IndexBuildConfig
from .scan import Scan


@dataclasses.dataclass
class ShardPlan:
    modality: str
    index: int
    of: int
    count: int

    @property
    def stem(self) -> str:
        return f"shard-{self.modality}-{self.index:05d}-of-{self.of:05d}"


def plan_shards(scan: Scan, max_shard_vectors: int) -> tuple[list[ShardPlan], np.ndarray]:
    """Split each modality into contiguous id ranges; returns plans and shard-of-unique-id."""
    plans: list[ShardPlan] = []
    shard_of = np.empty(len(scan.unique_ids), np.int32)
    for code, modality in enumerate(scan.modalities):
        where = np.nonzero(scan.modality_code == code)[0]
        n = len(where)
        nshards = -(-n // max_shard_vectors)
        local = (np.arange(n, dtype=np.int64) * nshards) // n
        shard_of[where] = len(plans) + local
        counts = np.bincount(local, minlength=nshards)
        plans.extend(ShardPlan(modality, i, nshards, int(counts[i])) for i in range(nshards))
    return plans, shard_of


def group_shards(plans: list[ShardPlan], choices: Mapping[str, IndexChoice], config: IndexBuildConfig
                  ) -> list[list[int]]:
    """Consecutive shards filled in one pass: as many as memory_budget_bytes holds by the
    chooser's estimate, else (sizes unknown) as many as max_shard_vectors vectors."""
    def size(plan: ShardPlan) -> float | None:
        c = choices[plan.modality]
        if c.bytes_per_vector is None or c.bytes_per_shard is None:
            return None
        return c.bytes_per_vector * plan.count + c.bytes_per_shard

    estimated = [size(p) for p in plans]
    sizes: list[float]
    if any(s is None for s in estimated):
        sizes = [float(p.count) for p in plans]
        budget = float(max(config.max_shard_vectors, max(p.count for p in plans)))
    else:
        sizes = [float(s) for s in estimated if s is not None]
        budget = float(config.memory_budget_bytes)
    groups: list[list[int]] = [[]]
    total = 0.0
    for i, s in enumerate(sizes):
        if groups[-1] and total + s > budget:
            groups.append([])
            total = 0.0
        groups[-1].append(i)
        total += s
    return groups
