"""The OpenAPI 3 document of `serve` (GET /openapi.json), built from the server's own limits.

It describes every route, request body and answer closely enough for a schema-driven
fuzzer (schemathesis) to exercise the service: bounds such as ``max_k`` come from the
running server's ServerConfig, so the document never promises what the server refuses.
"""

from __future__ import annotations

from typing import Any

from xmodal_index.query.fusion import DEFAULT_FUSION, FUSIONS
from xmodal_index.sinks.schema import MODALITIES

from .serve_request import MAX_EMBEDDING_VALUES

OPENAPI_VERSION = "3.0.3"
_ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    reasons = {
        400: "Malformed request: bad JSON or form, nesting over the limit, a bad embedding, an undecodable upload",
        408: "The body did not arrive within the request's time budget",
        411: "No Content-Length (chunked bodies are not accepted)",
        413: "The body is over max_body_bytes",
        415: "Content-Type other than application/json or multipart/form-data",
        422: "k or modality out of range, media over its limits, or a modality the encoder cannot embed",
        503: "No servable version, media decode workers busy, or too many connections (see Retry-After)",
        504: "The query took longer than the request's time budget",
    }
    return {str(code): _json(_ERROR, reasons[code]) for code in codes}


def openapi_document(config: Any) -> dict[str, Any]:
    """The document for a server running with ``config`` (a ServerConfig)."""
    modality_list = {"type": "array", "items": {"type": "string", "enum": list(MODALITIES)}, "minItems": 1,
                     "uniqueItems": True, "description": "Streams to search (default: all)."}
    modality_any = {"oneOf": [modality_list, {"type": "string", "pattern": "^[a-z]+(,[a-z]+)*$",
                                              "description": "Comma-separated streams, e.g. audio,text"}]}
    k = {"type": "integer", "minimum": 1, "maximum": config.max_k, "default": config.default_k,
         "description": "Hits to return."}
    grouping = {
        "k_per_modality": {"type": "integer", "minimum": 1, "maximum": config.max_k,
                           "description": "Return instead the best k_per_modality hits of each stream, grouped."},
        "fusion": {"type": "string", "enum": list(FUSIONS), "default": DEFAULT_FUSION,
                   "description": "How the rankings of several streams are merged."},
    }
    text_query = {"type": "object", "additionalProperties": False, "required": ["text"],
                  "properties": {"text": {"type": "string", "minLength": 1, "pattern": r"\S",
                                          "description": "Text to embed with the served version's encoder."},
                                 "k": k, "modality": modality_any, **grouping}}
    embedding_query = {"type": "object", "additionalProperties": False, "required": ["embedding"],
                       "properties": {"embedding": {"type": "array", "items": {"type": "number"}, "minItems": 1,
                                                    "maxItems": MAX_EMBEDDING_VALUES,
                                                    "description": "A vector of the index's space: as many "
                                                                   "finite numbers as the version's dim "
                                                                   "(normalised before the search)."},
                                      "k": k, "modality": modality_any, **grouping}}
    upload = {"type": "string", "format": "binary"}
    form = {"type": "object", "additionalProperties": False, "minProperties": 1, "maxProperties": 3,
            "description": "Exactly one of text, audio, image, video, plus optional k and modality.",
            "properties": {"text": {"type": "string"}, "audio": upload, "image": upload, "video": upload,
                           "k": {"type": "string", "pattern": "^[0-9]+$"},
                           "modality": {"type": "string"}}}
    hit = {"type": "object", "required": ["uri", "modality", "start_s", "end_s", "score", "segment_id", "text"],
           "properties": {"uri": {"type": "string"}, "modality": {"type": "string", "enum": list(MODALITIES)},
                          "start_s": {"type": "number"}, "end_s": {"type": "number"}, "score": {"type": "number"},
                          "segment_id": {"type": "integer"}, "text": {"type": "string", "nullable": True}}}
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "xmodal-index query service", "version": "1",
                 "description": "Cross-modal search over a published index version, hot-swapped as LATEST moves."},
        "paths": {
            "/healthz": {"get": {"operationId": "health", "summary": "The served version, or why none is served",
                                 "responses": {"200": _json({"$ref": "#/components/schemas/Health"}, "Serving"),
                                               "503": _json({"$ref": "#/components/schemas/Health"},
                                                            "Nothing can be served")}}},
            "/query": {"post": {
                "operationId": "query", "summary": "Search with a text, an embedding or an uploaded media file",
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"oneOf": [text_query, embedding_query]}},
                    "multipart/form-data": {"schema": form}}},
                "responses": {"200": _json({"type": "object", "required": ["version", "hits"],
                                            "properties": {"version": {"type": "string"},
                                                           "hits": {"type": "array", "items": hit}}},
                                           "Hits, best first"),
                              **_errors(400, 408, 411, 413, 415, 422, 503, 504)}}},
            "/versions": {"get": {"operationId": "versions", "summary": "Versions of the served index",
                                  "responses": {"200": _json({"$ref": "#/components/schemas/Versions"},
                                                             "Complete versions, oldest first"),
                                                **_errors(503)}}},
            "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus metrics",
                                 "responses": {"200": {"description": "Prometheus text exposition format",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document",
                                      "responses": {"200": _json({"type": "object"}, "OpenAPI 3 document")}}},
        },
        "components": {"schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
            "Health": {"type": "object", "required": ["status"], "properties": {
                "status": {"type": "string", "enum": ["ok", "unavailable"]}, "version": {"type": "string"},
                "model_id": {"type": "string"}, "ntotal": {"type": "integer"}, "error": {"type": "string"},
                "modalities": {"type": "array", "items": {"type": "string"}}}},
            "Versions": {"type": "object", "required": ["index", "current", "latest", "versions"], "properties": {
                "index": {"type": "string"}, "current": {"type": "string", "nullable": True},
                "latest": {"type": "string", "nullable": True}, "pinned": {"type": "boolean"},
                "versions": {"type": "array", "items": {"type": "object", "required": ["version", "current"],
                                                        "properties": {"version": {"type": "string"},
                                                                       "current": {"type": "boolean"},
                                                                       "latest": {"type": "boolean"},
                                                                       "refused": {"type": "string"}}}}}},
        }},
    }
