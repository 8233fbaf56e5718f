"""Queries arriving over HTTP: parse and validate a request body, run it on a served version.

A request is JSON (``{"text": ..., "k": ..., "modality": [...]}``) or
multipart/form-data with one field among text/audio/image/video (media as file
uploads) plus optional ``k`` and ``modality`` fields. Bad requests raise
:class:`RequestError` carrying the HTTP status and a one-line message. Decoding,
encoding, searching, fusing several streams and hit fields are the query core's
(``xmodal_index.query``), so the CLI, the Python API and the service answer alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.message
import email.parser
import json
import logging
import os
import tempfile
from typing import Any

import numpy as np

from xmodal_index.query.core import QueryIndex
from xmodal_index.query.encoder import load_query_encoder
from xmodal_index.query.errors import BadQueryError, QueryError
from xmodal_index.query.hits import hit_json  # noqa: F401 - re-exported for the service
from xmodal_index.query.media import decode_query_media
from xmodal_index.query.request import QUERY_KEYS, Query, check_text
from xmodal_index.sinks.schema import MODALITIES
from xmodal_index.sinks.serving.hot_swap import Served
from xmodal_index.sinks.serving.loader import IndexVersion

logger = logging.getLogger(__name__)

MEDIA_KEYS = tuple(k for k in QUERY_KEYS if k != "text")
FORM_FIELDS = (*QUERY_KEYS, "k", "modality")
JSON_KEYS = ("text", "k", "modality")
DEFAULT_K = 10
_MAX_MESSAGE = 300


class RequestError(Exception):
    """A request the service refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class QueryRequest:
    """One validated query: what to embed, how many hits, which streams to search."""

    modality: str  # text | audio | image | video: the query's own modality
    k: int
    search: tuple[str, ...] | None  # streams to search; None = all
    text: str | None = None
    data: bytes | None = None  # uploaded media
    filename: str = ""


# ---------------------------------------------------------------- parsing


def parse_request(body: bytes, content_type: str, *, max_k: int, default_k: int = DEFAULT_K) -> QueryRequest:
    """Dispatch on the Content-Type: application/json or multipart/form-data (415 otherwise)."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "application/json":
        return parse_json_request(body, max_k=max_k, default_k=default_k)
    if media_type == "multipart/form-data":
        return parse_multipart_request(body, content_type, max_k=max_k, default_k=default_k)
    raise RequestError(415, f"Content-Type {media_type or '(none)'!r} is not supported: "
                            "send application/json or multipart/form-data")


def parse_json_request(body: bytes, *, max_k: int, default_k: int = DEFAULT_K) -> QueryRequest:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as err:
        raise RequestError(400, f"the body is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise RequestError(400, f"the body must be a JSON object, not {type(data).__name__}")
    media = [key for key in MEDIA_KEYS if key in data]
    if media:
        raise RequestError(400, f"{media[0]} queries are file uploads: send multipart/form-data with a file "
                                f"field named {media[0]!r}")
    unknown = sorted(set(data) - set(JSON_KEYS))
    if unknown:
        raise RequestError(400, f"unknown keys {unknown}: a JSON query takes {', '.join(JSON_KEYS)}")
    if "text" not in data:
        raise RequestError(400, f"the query needs exactly one of {', '.join(QUERY_KEYS)}; got none")
    text = _check_text(data["text"])
    return QueryRequest(modality="text", text=text, k=_parse_k(data.get("k"), max_k, default_k),
                        search=_parse_modalities(data.get("modality")))


def parse_multipart_request(body: bytes, content_type: str, *, max_k: int,
                            default_k: int = DEFAULT_K) -> QueryRequest:
    fields: dict[str, tuple[bytes, str]] = {}
    for name, filename, content in _form_parts(body, _boundary(content_type)):
        if name not in FORM_FIELDS:
            raise RequestError(400, f"unknown form field {name!r}: fields are {', '.join(FORM_FIELDS)}")
        if name in fields:
            raise RequestError(400, f"form field {name!r} is given more than once")
        fields[name] = (content, filename)
    given = [key for key in QUERY_KEYS if key in fields]
    if len(given) != 1:
        raise RequestError(400, f"the query needs exactly one of {', '.join(QUERY_KEYS)}; "
                                f"got {', '.join(given) or 'none'}")
    modality = given[0]
    k = _parse_k(_form_text(fields, "k"), max_k, default_k)
    search = _parse_modalities(_form_text(fields, "modality"))
    if modality == "text":
        text = _check_text(_form_text(fields, "text") or "")
        return QueryRequest(modality="text", text=text, k=k, search=search)
    content, filename = fields[modality]
    if not content:
        raise RequestError(400, f"the uploaded {modality} {filename or modality!r} is empty")
    return QueryRequest(modality=modality, data=content, filename=filename or modality, k=k, search=search)


def _check_text(text: Any) -> str:
    """The core's rule for text queries (the CLI and the API apply the same one)."""
    try:
        return check_text(text)
    except BadQueryError as err:
        raise RequestError(400, str(err)) from err


def _form_text(fields: dict[str, tuple[bytes, str]], name: str) -> str | None:
    if name not in fields:
        return None
    try:
        return fields[name][0].decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(400, f"form field {name!r} is not UTF-8 text") from err


def _boundary(content_type: str) -> bytes:
    msg = email.message.Message()
    msg["Content-Type"] = content_type
    boundary = msg.get_param("boundary")
    if not isinstance(boundary, str) or not boundary or len(boundary) > 200:
        raise RequestError(400, "multipart/form-data needs a boundary parameter of 1 to 200 characters")
    try:
        return boundary.encode("ascii")
    except UnicodeEncodeError as err:
        raise RequestError(400, "the multipart boundary must be ASCII") from err


def _form_parts(body: bytes, boundary: bytes) -> list[tuple[str, str, bytes]]:
    """(name, filename, content) of each part of a multipart/form-data body (RFC 7578)."""
    data = b"\r\n" + body
    sep = b"\r\n--" + boundary
    pos = data.find(sep)
    if pos < 0:
        raise RequestError(400, "the multipart body does not contain its boundary")
    parts: list[tuple[str, str, bytes]] = []
    while True:
        start = pos + len(sep)
        if data.startswith(b"--", start):
            return parts
        line_end = data.find(b"\r\n", start)
        head_end = data.find(b"\r\n\r\n", line_end) if line_end >= 0 else -1
        nxt = data.find(sep, head_end + 4) if head_end >= 0 else -1
        if nxt < 0:
            raise RequestError(400, "the multipart body is truncated: a part or the closing boundary is missing")
        headers = email.parser.BytesHeaderParser().parsebytes(data[line_end + 2:head_end + 4])
        name = headers.get_param("name", header="content-disposition")
        if headers.get_content_disposition() != "form-data" or not isinstance(name, str):
            raise RequestError(400, "each multipart part needs Content-Disposition: form-data; name=...")
        parts.append((name, headers.get_filename() or "", data[head_end + 4:nxt]))
        pos = nxt


def _parse_k(value: Any, max_k: int, default_k: int) -> int:
    if value is None:
        return min(default_k, max_k)
    k = value
    if isinstance(value, str):
        try:
            k = int(value.strip())
        except ValueError:
            k = value
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max_k:
        raise RequestError(422, f"k = {value!r} must be an integer in [1, {max_k}]")
    return k


def _parse_modalities(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        items: list[Any] = [m.strip() for m in value.split(",") if m.strip()]
    elif isinstance(value, list):
        items = value
    else:
        raise RequestError(422, f"modality = {value!r} must be a list or a comma-separated string of "
                                f"{', '.join(MODALITIES)}")
    bad = [m for m in items if m not in MODALITIES]
    if bad or not items:
        raise RequestError(422, f"modality = {value!r}: each must be one of {', '.join(MODALITIES)}")
    return tuple(dict.fromkeys(items))


# ---------------------------------------------------------------- running


def prepare_encoder(index: IndexVersion, current: Served | None) -> Any:
    """IndexHandle prepare hook: the version's encoder, reused when the model_id is unchanged."""
    if current is not None and current.extra is not None and current.manifest.model_id == index.manifest.model_id:
        return current.extra
    return load_query_encoder(index)


def run_query(request: QueryRequest, served: Served) -> dict[str, Any]:
    """Embed the query with the served version's encoder and search that version."""
    encoder = served.extra
    if request.modality not in encoder.modalities:
        raise RequestError(422, f"the encoder of {served.version} cannot embed {request.modality} queries "
                                f"(it takes {', '.join(encoder.modalities)})")
    core = QueryIndex(served.index, encoder)
    if request.modality == "text":
        query = Query("text", request.text)
        hits = core.run(query, k=request.k, modalities=request.search)
    else:
        # The upload is decoded here; the core searches its embedding.
        vec = encoder.encode(request.modality, [_decode_upload(request)]).embeddings
        hits = core.run(Query("embedding", np.asarray(vec[0], dtype=np.float32)), k=request.k,
                        modalities=request.search)
    return {"version": served.version, "hits": [h.to_json() for h in hits]}


def _decode_upload(request: QueryRequest) -> Any:
    """Decode uploaded media through a temporary file that is always deleted."""
    name = request.filename
    fd, path = tempfile.mkstemp(prefix="xmodal-query-", suffix=_safe_suffix(name))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(request.data or b"")
        try:
            return decode_query_media(request.modality, path)
        except QueryError as err:
            raise RequestError(400, f"the uploaded {request.modality} {name!r} has no {request.modality} "
                                    "stream") from err
        except Exception as err:
            reason = str(err).replace(path, name).splitlines()[0] if str(err) else type(err).__name__
            raise RequestError(400, f"cannot decode the uploaded {request.modality} {name!r}: "
                                    f"{reason[:_MAX_MESSAGE]}") from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _safe_suffix(filename: str) -> str:
    """The upload's extension when it is short and plain (decoders may use it as a hint)."""
    ext = os.path.splitext(os.path.basename(filename))[1]
    return ext if 1 < len(ext) <= 8 and ext[1:].isalnum() else ""
