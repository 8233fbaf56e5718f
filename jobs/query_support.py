"""Queries arriving over HTTP: multipart uploads, shared request checks, the encoder hook.

JSON bodies are parsed by ``serve_request``; multipart/form-data bodies (one field among
text/audio/image/video, media as file uploads, plus optional ``k`` and ``modality``)
here. Bad requests raise :class:`RequestError` carrying the HTTP status and a one-line
message; uploads are decoded in the isolated workers of ``serve_media``. Decoding,
encoding, searching, fusing several streams and hit fields are the query core's
(``xmodal_index.query``), so the CLI, the Python API and the service answer alike.
"""

from __future__ import annotations

import dataclasses
import email.message
import email.parser
import logging
from typing import Any

from xmodal_index.query.encoder import load_query_encoder
from xmodal_index.query.errors import BadQueryError
from xmodal_index.query.request import QUERY_KEYS, check_text
from xmodal_index.sinks.schema import MODALITIES
from xmodal_index.sinks.serving.hot_swap import Served
from xmodal_index.sinks.serving.loader import IndexVersion

logger = logging.getLogger(__name__)

FORM_FIELDS = (*QUERY_KEYS, "k", "modality")
DEFAULT_K = 10


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


# ---------------------------------------------------------------- the encoder hook


def prepare_encoder(index: IndexVersion, current: Served | None) -> Any:
    """IndexHandle prepare hook: the version's encoder, reused when the model_id is unchanged."""
    if current is not None and current.extra is not None and current.manifest.model_id == index.manifest.model_id:
        return current.extra
    return load_query_encoder(index)
