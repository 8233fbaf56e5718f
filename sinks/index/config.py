"""How an index version is built: :class:`IndexBuildConfig` and the build's errors.

A light module (no faiss, numpy or pyarrow), so configs load and validate anywhere.
"""

from __future__ import annotations

import dataclasses

from ..errors import SinkError

METRICS = ("ip",)
DEFAULT_MEMORY_BUDGET_BYTES = 4 << 30  # RAM a loaded version may take on a query node


class IndexBuildError(SinkError):
    """An index version could not be built from the given rows."""


class EmptyIndexError(IndexBuildError):
    """The input holds no rows: nothing is published."""


@dataclasses.dataclass(frozen=True)
class IndexBuildConfig:
    """How shards are chosen, built, tuned and measured.

    float_factory / binary_factory: a faiss index_factory string, or "auto" (chosen
    by ``index_choice.choose_index`` from the vector count, dimension, memory budget
    and recall target). metric: "ip" (rows are L2-normalised: inner product = cosine).
    memory_budget_bytes: RAM the loaded version may take on a query node (float and
    binary indexes of all shards); also bounds the shards one build pass holds.
    recall_target: recall@10 against exact search that tuning aims for.
    nprobe / ef_search: search parameters; 0 tunes them on the held-out queries to
    the smallest value reaching ``recall_target``. recall_sample: held-out queries
    per modality for recall@10; train_sample: training rows per modality.
    store_vectors: keep a float16 copy of each shard's vectors (2 bytes x dim per
    vector on disk) for re-ranking product-quantized shards and two-stage search.
    add_threads: shards of one pass filled in parallel (0 = the CPU count).
    """

    float_factory: str = "auto"
    binary_factory: str = "auto"
    metric: str = "ip"
    max_shard_vectors: int = 1_000_000
    nprobe: int = 0
    ef_search: int = 0
    recall_sample: int = 1000
    train_sample: int = 100_000
    seed: int = 0
    recall_target: float = 0.95
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES
    store_vectors: bool = True
    add_threads: int = 0

    def __post_init__(self) -> None:
        if not self.float_factory.strip():
            raise ValueError(f"{self.float_factory = } must be 'auto' or a faiss index_factory string")
        if not self.binary_factory.strip():
            raise ValueError(f"{self.binary_factory = } must be 'auto' or a faiss binary index_factory string")
        if self.metric not in METRICS:
            raise ValueError(f"{self.metric = } must be one of {METRICS}")
        if self.max_shard_vectors <= 0:
            raise ValueError(f"{self.max_shard_vectors = } must be > 0")
        if self.nprobe < 0:
            raise ValueError(f"{self.nprobe = } must be >= 0 (0 = tuned)")
        if self.ef_search < 0:
            raise ValueError(f"{self.ef_search = } must be >= 0 (0 = tuned)")
        if self.recall_sample < 0:
            raise ValueError(f"{self.recall_sample = } must be >= 0")
        if self.train_sample <= 0:
            raise ValueError(f"{self.train_sample = } must be > 0")
        if not 0.0 < self.recall_target <= 1.0:
            raise ValueError(f"{self.recall_target = } must be in (0, 1]")
        if self.memory_budget_bytes <= 0:
            raise ValueError(f"{self.memory_budget_bytes = } must be > 0 (bytes)")
        if self.add_threads < 0:
            raise ValueError(f"{self.add_threads = } must be >= 0 (0 = the CPU count)")
