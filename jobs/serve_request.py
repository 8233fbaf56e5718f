"""Request bodies of `serve`'s POST /query: JSON (text or raw embedding) and multipart uploads.

JSON bodies are checked for nesting depth before they are parsed (a deeply nested
body is a 400, never a RecursionError), then take exactly one of ``text`` or
``embedding`` plus optional ``k``, ``modality``, ``k_per_modality`` (grouped results)
and ``fusion``. A raw embedding is a list of finite numbers, each named when it is
not; its length and direction are checked by the query core against the served
version when the query runs. Text follows the core's one rule. Multipart uploads
are parsed by ``query_support``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

import numpy as np

from xmodal_index.query.errors import BadQueryError
from xmodal_index.query.fusion import DEFAULT_FUSION, FUSIONS
from xmodal_index.query.request import check_text

from .query_support import (
    QUERY_KEYS,
    QueryRequest,
    RequestError,
    _parse_k,
    _parse_modalities,
    parse_multipart_request,
)

JSON_KEYS = ("text", "embedding", "k", "modality", "k_per_modality", "fusion")
MAX_EMBEDDING_VALUES = 1 << 16
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_OPEN = np.frombuffer(b"[{", dtype=np.uint8)
_CLOSE = np.frombuffer(b"]}", dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class EmbeddingRequest:
    """A query given as a vector of the index's space."""

    embedding: tuple[float, ...]
    k: int
    search: tuple[str, ...] | None
    modality: str = "embedding"


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    """How the hits of several streams are returned: fused (``fusion``) or grouped (``per_modality``)."""

    per_modality: int | None = None
    fusion: str = DEFAULT_FUSION


DEFAULT_OPTIONS = SearchOptions()


def parse_request(body: bytes, content_type: str, *, max_k: int, default_k: int,
                  max_json_depth: int) -> tuple[QueryRequest | EmbeddingRequest, SearchOptions]:
    """Dispatch on the Content-Type: application/json or multipart/form-data (415 otherwise)."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "application/json":
        return parse_json_request(body, max_k=max_k, default_k=default_k, max_json_depth=max_json_depth)
    if media_type == "multipart/form-data":
        return parse_multipart_request(body, content_type, max_k=max_k, default_k=default_k), DEFAULT_OPTIONS
    raise RequestError(415, f"Content-Type {media_type or '(none)'!r} is not supported: "
                            "send application/json or multipart/form-data")


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (strings ignored)."""
    bare = np.frombuffer(_STRING.sub(b"", body), dtype=np.uint8)
    steps = np.isin(bare, _OPEN).astype(np.int32) - np.isin(bare, _CLOSE).astype(np.int32)
    return int(np.cumsum(steps).max(initial=0))


def parse_json_request(body: bytes, *, max_k: int, default_k: int,
                       max_json_depth: int) -> tuple[QueryRequest | EmbeddingRequest, SearchOptions]:
    depth = json_depth(body)
    if depth > max_json_depth:
        raise RequestError(400, f"the JSON body nests {depth} levels deep, over max_json_depth={max_json_depth}")
    try:
        data = json.loads(body)
    except RecursionError as err:
        raise RequestError(400, "the JSON body nests too deeply") from err
    except (UnicodeDecodeError, ValueError) as err:
        raise RequestError(400, f"the body is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise RequestError(400, f"the body must be a JSON object, not {type(data).__name__}")
    media = [key for key in QUERY_KEYS if key != "text" and key in data]
    if media:
        raise RequestError(400, f"{media[0]} queries are file uploads: send multipart/form-data with a file "
                                f"field named {media[0]!r}")
    unknown = sorted(set(data) - set(JSON_KEYS))
    if unknown:
        raise RequestError(400, f"unknown keys {unknown}: a JSON query takes {', '.join(JSON_KEYS)}")
    given = [key for key in ("text", "embedding") if key in data]
    if len(given) != 1:
        raise RequestError(400, f"the query needs exactly one of text, embedding (or a multipart upload of "
                                f"audio, image, video); got {', '.join(given) or 'none'}")
    k = _parse_k(data.get("k"), max_k, default_k)
    search = _parse_modalities(data.get("modality"))
    options = _parse_options(data, max_k)
    if given[0] == "embedding":
        return EmbeddingRequest(embedding=_parse_embedding(data["embedding"]), k=k, search=search), options
    try:
        text = check_text(data["text"])
    except BadQueryError as err:
        raise RequestError(400, str(err)) from err
    return QueryRequest(modality="text", text=text, k=k, search=search), options


def _parse_options(data: dict[str, Any], max_k: int) -> SearchOptions:
    per_modality = data.get("k_per_modality")
    if per_modality is not None and (isinstance(per_modality, bool) or not isinstance(per_modality, int)
                                     or not 1 <= per_modality <= max_k):
        raise RequestError(422, f"k_per_modality = {per_modality!r} must be an integer in [1, {max_k}]")
    fusion = data.get("fusion", DEFAULT_FUSION)
    if fusion not in FUSIONS:
        raise RequestError(422, f"fusion = {json.dumps(fusion)[:40]} must be one of {', '.join(FUSIONS)}")
    return SearchOptions(per_modality=per_modality, fusion=fusion)


def _parse_embedding(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise RequestError(400, "embedding must be a non-empty list of numbers")
    if len(value) > MAX_EMBEDDING_VALUES:
        raise RequestError(400, f"embedding has {len(value)} values, over {MAX_EMBEDDING_VALUES}")
    for i, x in enumerate(value):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise RequestError(400, f"embedding[{i}] = {json.dumps(x)[:40]} is not a number")
        if not math.isfinite(x) or abs(x) > 3.4e38:
            raise RequestError(400, f"embedding[{i}] = {x!r} is not a finite float32 number")
    return tuple(float(x) for x in value)
