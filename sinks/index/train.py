"""Index templates: the float and binary index chosen for a modality, trained once on
its sample; every shard of the modality clones them."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np

from .choice import BINARY_TRAIN_PER_LIST, IndexChoice, choose_index
from .config import IndexBuildConfig, IndexBuildError
from .scan import Sample

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Templates:
    float_index: Any
    binary_index: Any
    float_factory: str
    binary_factory: str
    choice: IndexChoice


def _make_float(factory: str, dim: int) -> Any:
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise IndexBuildError(f"float index factory {factory!r} is invalid for {dim = }: {err}") from err
    if faiss.try_extract_index_ivf(index) is None and not isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        index = faiss.IndexIDMap(index)
    return index


def _make_binary(factory: str, bits: int) -> Any:
    try:
        index = faiss.index_binary_factory(bits, factory)
    except RuntimeError as err:
        raise IndexBuildError(f"binary index factory {factory!r} is invalid for {bits = }: {err}") from err
    keeps_ids = (faiss.IndexBinaryIVF, faiss.IndexBinaryHash, faiss.IndexBinaryMultiHash, faiss.IndexBinaryIDMap,
                 faiss.IndexBinaryIDMap2)
    if not isinstance(index, keeps_ids):
        index = faiss.IndexBinaryIDMap(index)
    return index


def _needed_training_rows(index: Any, kind: str) -> int:
    """Rows below which training the index fails: IVF lists, or 256 PQ / SQ codebook entries."""
    if kind == "binary":
        return int(getattr(index, "nlist", 1))
    ivf = faiss.try_extract_index_ivf(index)
    need = int(ivf.nlist) if ivf is not None else 1
    inner = faiss.downcast_index(ivf) if ivf is not None else None
    if isinstance(inner, faiss.IndexIVFPQ):
        need = max(need, 1 << int(inner.pq.nbits))
    return need


def _trained(kind: str, factory: str, n: int, modality: str, held_out: np.ndarray, sample: np.ndarray,
             make: Callable[[str], Any]) -> tuple[str, Any]:
    """A trained empty index: on the training rows, on the whole sample when they are
    too few for the index's lists, or an exact index when even that is too small."""
    index = make(factory)
    if index.is_trained:
        return factory, index
    need = _needed_training_rows(index, kind)
    data = held_out if len(held_out) >= need else sample
    if kind == "binary":  # the caller shuffled the rows: a prefix is a random subset
        data = data[:max(need, BINARY_TRAIN_PER_LIST * need)]
    if len(data) < need:
        exact = "Flat" if kind == "float" else "BFlat"
        logger.warning("%s %s shards of %d rows are too small to train %r: using %s", modality, kind, n, factory, exact)
        return exact, make(exact)
    started = time.monotonic()
    try:
        index.train(np.ascontiguousarray(data))
    except RuntimeError as err:
        raise IndexBuildError(f"training {kind} index {factory!r} for modality {modality!r} "
                              f"on {len(data)} rows failed: {err}") from err
    logger.info("trained %s %s index %s on %d rows in %.1f s", modality, kind, factory, len(data),
                time.monotonic() - started)
    return factory, index


def train_templates(modality: str, n: int, sample: Sample, nqueries: int, dim: int, bits: int,
                     config: IndexBuildConfig, total_vectors: int, shards: int) -> Templates:
    choice = choose_index(n, dim, bits, memory_budget_bytes=config.memory_budget_bytes,
                          recall_target=config.recall_target, train_rows=min(config.train_sample, sample.filled),
                          total_vectors=total_vectors, shards=shards, float_factory=config.float_factory,
                          binary_factory=config.binary_factory)
    over = choice.estimated_bytes is not None and choice.estimated_bytes > config.memory_budget_bytes
    (logger.warning if over else logger.info)("%s: %s", modality, choice.reason)
    filled = sample.filled
    float_factory, float_index = _trained("float", choice.float_factory, n, modality, sample.x[nqueries:filled],
                                          sample.x[:filled], lambda f: _make_float(f, dim))
    # the training rows are in slot order: shuffle (seeded) before binary training takes a prefix
    shuffled = nqueries + np.random.default_rng(config.seed).permutation(filled - nqueries)
    binary_factory, binary_index = _trained("binary", choice.binary_factory, n, modality, sample.codes[shuffled],
                                            sample.codes[:filled], lambda f: _make_binary(f, bits))
    if (float_factory, binary_factory) != (choice.float_factory, choice.binary_factory):
        choice = dataclasses.replace(choice, float_factory=float_factory, binary_factory=binary_factory,
                                     reason=choice.reason + "; too few rows to train: exact search instead")
    return Templates(float_index, binary_index, float_factory, binary_factory, choice)
