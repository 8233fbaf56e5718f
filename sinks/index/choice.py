"""Choosing the float and binary FAISS indexes of a version under a memory budget.

Inputs: ``n`` vectors in the shard being planned, ``total_vectors`` in the whole
version, the dimension ``d``, the hash ``bits`` (``B = bits / 8`` bytes), the
``memory_budget_bytes`` a query node may spend on the loaded version, the
``recall_target`` (recall@10 against exact search) and the training sample size.

Memory model: bytes in RAM once a version is loaded, per vector and per shard.

=================================  =====================  ==========================
index                              bytes per vector       bytes per shard (fixed)
=================================  =====================  ==========================
``Flat`` (in an IndexIDMap)        4d + 8                 0
``HNSW{M}``                        4d + 8 + 8.5 M         0   (2M level-0 links, ~M/(M-1) upper)
``IVF{L},Flat``                    4d + 8                 4 L d  (coarse centroids)
``IVF{L},SQ8``                     d + 8                  4 L d + 8 d
``IVF{L},PQ{m}np``                 m + 8                  4 L d + 4 * 256 d
``OPQ{m}_{d},IVF{L},PQ{m}np``      m + 8                  4 L d + 4 * 256 d + 4 d^2
``BFlat`` / ``BIVF{L}``            B + 8                  B L
``BHash{bits}``                    B + 16                 0
=================================  =====================  ==========================

The version fits when ``total_vectors * (float + binary bytes per vector) + shards *
(fixed bytes)`` is at most the budget. Not counted: the float16 copy of every vector
(2d bytes each) kept per shard for re-ranking; query nodes memory-map it from disk
and read only the candidates' rows.

Training cost (on the sample, once per modality; shards clone the trained template):
k-means over ``train_rows x L x d x 10`` (faiss's 10 iterations), PQ codebooks over
at most 65536 rows, OPQ about ten PQ trainings more; HNSW needs no training but its
build costs roughly 3-5x an IVF-Flat add of the same rows. ``L = 4 sqrt(n)``, capped
so that every list gets at least MIN_TRAIN_PER_LIST training rows.

Float rule, first match wins:

1. ``n < FLAT_MAX_VECTORS`` and Flat fits: ``Flat`` (exact, nothing to train or tune).
2. ``n >= HNSW_MIN_VECTORS``, ``recall_target <= HNSW_MAX_RECALL_TARGET`` and HNSW32
   fits: ``HNSW32`` (IVF's query cost grows with sqrt(n), HNSW's with log n; below 2M
   vectors per shard IVF-Flat answers as fast and builds several times faster; above
   recall 0.95 HNSW needs efSearch in the thousands).
3. IVF-Flat fits: ``IVF{L},Flat`` (exact distances, recall bounded only by nprobe).
4. SQ8 fits: ``IVF{L},SQ8`` (8 bits per dimension: ranking nearly exact).
5. Otherwise product quantization with the largest code ``m`` (a divisor of ``d``,
   at most ``d / 2``) that fits, with OPQ in front when each sub-vector spans 8 or more
   dimensions (rotation matters most for coarse codes). PQ alone caps recall@10 far
   below usual targets, so these shards re-rank ``rerank x k`` candidates with the
   stored float16 vectors; the build tunes ``rerank`` and nprobe to the recall target.
6. Nothing fits: IndexChoiceError naming the smallest budget that would.

Binary rule: ``BFlat`` below BINARY_FLAT_MAX_VECTORS (an exact Hamming scan is a few
ms per million codes); ``BHash{bits}`` for codes of at most BINARY_HASH_MAX_BITS bits
(the whole code is the bucket key, nflip tuned: exact within the radius, and at these
lengths the 10 nearest codes lie within a radius of 2-3); else ``BIVF{Lb}`` with
``Lb = sqrt(n)`` lists (scanning codes is cheap, so fewer, larger lists than the float
side), trained on at most BINARY_TRAIN_PER_LIST rows per list.

Explicit factory strings in the config always win; their size is estimated when the
form is one of the above, else left unknown (the manifest records the real sizes).

Search parameters (``tune_search_params``), per shard after its rows are added, on
the held-out recall queries: the smallest nprobe (powers of two up to nlist),
efSearch (16 ... 1024) or nflip (0 ... 6) whose recall@10 reaches the target, else
the largest tried. Product-quantized shards also get ``rerank`` (4, 16, 64: the
smallest that reaches the target with some nprobe).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ..errors import SinkError
from .search import RERANK_PARAM, apply_search_params, tunable_param

FLAT_MAX_VECTORS = 20_000  # exact search of 20k 256-d vectors: ~0.8 ms per query on one core
HNSW_MIN_VECTORS = 2_000_000
HNSW_MAX_RECALL_TARGET = 0.95
HNSW_M = 32
BINARY_FLAT_MAX_VECTORS = 100_000
BINARY_HASH_MAX_BITS = 24
MIN_TRAIN_PER_LIST = 32
BINARY_TRAIN_PER_LIST = 64
OPQ_MIN_DIMS_PER_CODE = 8
PQ_CODEBOOK = 256
ID_BYTES = 8
NPROBE_DEFAULT_DIVISOR = 16  # nprobe = nlist / 16 when nothing can be measured
EF_SEARCH_CANDIDATES = (16, 32, 64, 128, 256, 512, 1024)
EF_SEARCH_DEFAULT = 64
NFLIP_MAX = 6
NFLIP_DEFAULT = 2
RERANK_CANDIDATES = (4, 16, 64)  # rerank * k candidates re-scored per product-quantized shard
_PQ_RE = re.compile(r"(^|,)PQ\d+")


class IndexChoiceError(SinkError):
    """No index of the known kinds fits the memory budget."""


class ChoiceSettings(Protocol):
    """The fields of IndexBuildConfig the chooser reads."""

    float_factory: str
    binary_factory: str
    memory_budget_bytes: int
    recall_target: float
    train_sample: int


@dataclasses.dataclass(frozen=True)
class IndexChoice:
    """The chosen factories, their estimated size and why they were chosen."""

    float_factory: str
    binary_factory: str
    bytes_per_vector: float | None  # float + binary index, in RAM; None when unknown
    bytes_per_shard: int | None  # fixed part (centroids, codebooks, rotation)
    estimated_bytes: int | None  # the whole version: total_vectors and every shard
    memory_budget_bytes: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def nlist_for(n: int, train_rows: int, per_sqrt: float = 4.0) -> int:
    """Inverted lists for ``n`` vectors: per_sqrt x sqrt(n) (4 for float indexes, 1 for
    binary ones), at most train_rows / MIN_TRAIN_PER_LIST."""
    cap = max(1, train_rows // MIN_TRAIN_PER_LIST)
    return max(1, min(int(round(per_sqrt * math.sqrt(n))), cap))


# ---------------------------------------------------------------- sizes


def float_bytes(factory: str, dim: int) -> tuple[float, int] | None:
    """(bytes per vector, fixed bytes per shard) of a float factory string, or None
    when its form is not one this module knows."""
    f = factory.replace(" ", "")
    if f == "Flat":
        return 4 * dim + ID_BYTES, 0
    if m := re.fullmatch(r"HNSW(\d+)(,Flat)?", f):
        links = int(m.group(1))
        return 4 * dim + ID_BYTES + 8.5 * links, 0
    m = re.fullmatch(r"(?:OPQ(\d+)(?:_(\d+))?,)?IVF(\d+),(Flat|SQ8|PQ(\d+)(?:x8)?(?:np)?)", f)
    if m is None:
        return None
    opq, nlist, codes, pq_m = m.group(1), int(m.group(3)), m.group(4), m.group(5)
    fixed = 4 * nlist * dim
    if opq:
        fixed += 4 * dim * dim
    if codes == "Flat":
        return 4 * dim + ID_BYTES, fixed
    if codes == "SQ8":
        return dim + ID_BYTES, fixed + 8 * dim
    return int(pq_m) + ID_BYTES, fixed + 4 * PQ_CODEBOOK * dim


def binary_bytes(factory: str, bits: int) -> tuple[float, int] | None:
    """(bytes per vector, fixed bytes per shard) of a binary factory string, or None."""
    nbytes = bits // 8
    f = factory.replace(" ", "")
    if f == "BFlat":
        return nbytes + ID_BYTES, 0
    if m := re.fullmatch(r"BIVF(\d+)", f):
        return nbytes + ID_BYTES, nbytes * int(m.group(1))
    if re.fullmatch(r"BHash(\d+)", f):
        return nbytes + 2 * ID_BYTES, 0
    return None


def _total(per_vector: float, fixed: int, total_vectors: int, shards: int) -> int:
    return int(math.ceil(per_vector * total_vectors + fixed * shards))


# ---------------------------------------------------------------- the rule


def _pq_codes(dim: int) -> list[int]:
    """Candidate PQ code sizes m (bytes per vector), largest first: divisors of dim up to dim / 2."""
    return [m for m in range(dim // 2, 0, -1) if dim % m == 0 and m >= 2 and (m % 4 == 0 or m == dim // 2)]


def _choose_binary(n: int, bits: int, train_rows: int) -> tuple[str, str]:
    if n < BINARY_FLAT_MAX_VECTORS:
        return "BFlat", f"{n} codes < {BINARY_FLAT_MAX_VECTORS}: exact Hamming scan"
    if bits <= BINARY_HASH_MAX_BITS:
        return f"BHash{bits}", f"{bits}-bit codes <= {BINARY_HASH_MAX_BITS}: hash buckets on the whole code"
    nlist = nlist_for(n, train_rows, per_sqrt=1.0)
    return f"BIVF{nlist}", f"{n} codes of {bits} bits: binary IVF with {nlist} lists"


def _float_candidates(n: int, dim: int, recall_target: float, train_rows: int) -> list[tuple[str, str]]:
    """(factory, why) in order of preference; the first that fits wins."""
    nlist = nlist_for(n, train_rows)
    out: list[tuple[str, str]] = []
    if n < FLAT_MAX_VECTORS:
        out.append(("Flat", f"{n} vectors < {FLAT_MAX_VECTORS}: exact search"))
    if n >= HNSW_MIN_VECTORS and recall_target <= HNSW_MAX_RECALL_TARGET:
        out.append((f"HNSW{HNSW_M}", f"{n} vectors >= {HNSW_MIN_VECTORS} per shard at recall target "
                                     f"{recall_target} <= {HNSW_MAX_RECALL_TARGET}: graph search"))
    out.append((f"IVF{nlist},Flat", "IVF with exact codes fits the budget"))
    out.append((f"IVF{nlist},SQ8", "exact codes do not fit: 8-bit scalar quantization"))
    for m in _pq_codes(dim):
        prefix = f"OPQ{m}_{dim}," if dim // m >= OPQ_MIN_DIMS_PER_CODE else ""
        out.append((f"{prefix}IVF{nlist},PQ{m}np",
                    f"SQ8 does not fit: {m}-byte {'OPQ+' if prefix else ''}PQ codes, re-ranked with float16 vectors"))
    return out


def choose_index(n: int, dim: int, bits: int, *, memory_budget_bytes: int, recall_target: float,
                 train_rows: int, total_vectors: int | None = None, shards: int = 1,
                 float_factory: str = "auto", binary_factory: str = "auto") -> IndexChoice:
    """Factories for a shard of ``n`` vectors in a version of ``total_vectors`` vectors
    spread over ``shards`` shards (see the module docstring for the rule)."""
    if n < 0 or dim <= 0 or bits <= 0 or bits % 8:
        raise ValueError(f"{n = }, {dim = }, {bits = } must be >= 0, > 0 and a positive multiple of 8")
    if memory_budget_bytes <= 0:
        raise ValueError(f"{memory_budget_bytes = } must be > 0")
    total = max(n, total_vectors if total_vectors is not None else n)
    shards = max(1, shards)
    reasons = []
    if binary_factory == "auto":
        binary_factory, why = _choose_binary(n, bits, train_rows)
        reasons.append(f"binary {binary_factory}: {why}")
    else:
        reasons.append(f"binary {binary_factory}: configured")
    b_size = binary_bytes(binary_factory, bits)
    if float_factory != "auto":
        f_size = float_bytes(float_factory, dim)
        reasons.insert(0, f"float {float_factory}: configured")
        if f_size is None or b_size is None:
            return IndexChoice(float_factory, binary_factory, None, None, None, memory_budget_bytes, "; ".join(reasons))
        per_vector, fixed = f_size[0] + b_size[0], f_size[1] + b_size[1]
        need = _total(per_vector, fixed, total, shards)
        if need > memory_budget_bytes:
            reasons.append(f"estimated {need} bytes, over memory_budget_bytes = {memory_budget_bytes}: "
                           "configured factories are used as given")
        return IndexChoice(float_factory, binary_factory, per_vector, fixed, need, memory_budget_bytes,
                           "; ".join(reasons))
    b_per_vector, b_fixed = b_size if b_size is not None else (bits // 8 + ID_BYTES, 0)
    smallest: tuple[int, str] | None = None
    for factory, why in _float_candidates(n, dim, recall_target, train_rows):
        form = float_bytes(factory, dim)
        if form is None:  # every candidate has a known form; an unknown one cannot be sized
            continue
        f_per_vector, f_fixed = form
        per_vector, fixed = f_per_vector + b_per_vector, f_fixed + b_fixed
        need = _total(per_vector, fixed, total, shards)
        if smallest is None or need < smallest[0]:
            smallest = (need, factory)
        if need <= memory_budget_bytes:
            reasons.insert(0, f"float {factory}: {why} ({need} of {memory_budget_bytes} budget bytes "
                              f"for {total} vectors in {shards} shards)")
            return IndexChoice(factory, binary_factory, per_vector, fixed, need, memory_budget_bytes,
                               "; ".join(reasons))
    if smallest is None:
        raise IndexChoiceError(f"no float index candidate for {total} vectors of dim {dim}")
    need, factory = smallest
    raise IndexChoiceError(f"no index fits memory_budget_bytes = {memory_budget_bytes} for {total} vectors of "
                           f"dim {dim} in {shards} shards: the smallest, {factory!r}, needs {need} bytes")


def choose_factories(n: int, dim: int, bits: int, config: ChoiceSettings, total_vectors: int | None = None,
                     shards: int = 1) -> tuple[str, str]:
    """(float factory, binary factory) for a shard of ``n`` vectors; explicit config strings win."""
    choice = choose_index(n, dim, bits, memory_budget_bytes=config.memory_budget_bytes,
                          recall_target=config.recall_target, train_rows=config.train_sample,
                          total_vectors=total_vectors, shards=shards, float_factory=config.float_factory,
                          binary_factory=config.binary_factory)
    return choice.float_factory, choice.binary_factory


# ---------------------------------------------------------------- search parameters


def uses_product_quantizer(factory: str) -> bool:
    """True for factories whose codes are PQ (recall needs a re-rank with exact vectors)."""
    return bool(_PQ_RE.search(factory.replace(" ", "")))


def _param_candidates(name: str, limit: int) -> list[int]:
    if name == "nprobe":
        return [1 << i for i in range(max(1, limit).bit_length()) if (1 << i) < limit] + [limit]
    if name == "nflip":
        return list(range(0, min(limit, NFLIP_MAX) + 1))
    return list(EF_SEARCH_CANDIDATES)


def _default_value(name: str, limit: int) -> int:
    if name == "nprobe":
        return max(1, limit // NPROBE_DEFAULT_DIVISOR)
    return EF_SEARCH_DEFAULT if name == "efSearch" else NFLIP_DEFAULT


def tune_search_params(index: Any, *, binary: bool, recall_target: float, fixed: Mapping[str, int],
                       measure: Callable[[Mapping[str, int]], float] | None,
                       rerank: bool = False) -> tuple[dict[str, int], float | None]:
    """Set the index's search parameter and return (params, recall@10 measured with them).

    fixed: configured values ({"nprobe": 0, "efSearch": 0}: 0 = tune). measure(params)
    returns recall@10 with the parameters applied (None: nothing to measure, defaults
    are used). rerank: also choose RERANK_PARAM (product-quantized shards).
    """
    param = tunable_param(index, binary)
    reranks = RERANK_CANDIDATES if rerank else (0,)
    best: tuple[dict[str, int], float | None] = ({}, None)
    for factor in reranks:
        extra = {RERANK_PARAM: factor} if factor else {}
        if param is None:
            best = (extra, measure(extra) if measure else None)
        else:
            name, limit = param
            value = int(fixed.get(name, 0))
            if value or measure is None:
                value = (min(value, limit) if name == "nprobe" else value) if value else _default_value(name, limit)
                values = [value]
            else:
                values = _param_candidates(name, limit)
            for value in values:
                params = {name: value, **extra}
                apply_search_params(index, params, binary)
                best = (params, measure(params) if measure else None)
                if best[1] is not None and best[1] >= recall_target:
                    break
        if measure is None or (best[1] is not None and best[1] >= recall_target):
            break
    return best
