"""The strict schema of ``manifest.json`` (SPEC 4.4), checked before anything is fetched.

A query node treats a manifest as hostile input. :func:`check_manifest` checks the
parsed JSON object for types, ranges and consistency and raises IndexVersionError
with one line naming the first bad key (its value echoed short and sanitised):

- file names (shards, id maps, vectors, extra files) are plain names: one path
  segment of 1-128 characters from ``A-Za-z0-9._-``, not starting with ``.``, not a
  reserved name (manifest.json, SEAL, LATEST), unique across the version;
- sha256 values are 64 lowercase hex digits, sizes and counts bounded integers
  (never booleans or floats);
- every shard's ``id_map`` is listed in ``id_maps`` and every listed id map is used;
  each shard's ``vectors`` is listed in ``vectors``; an id map has at most one shard of
  each kind, all of one modality and one ``ntotal``;
- the float shards' ``ntotal`` add up to ``ntotal``, and so do the binary shards';
- ``dim``, ``bits`` and ``metric`` are in range and known; kinds and modalities known;
- incremental versions: an entry's optional ``origin`` names an older version
  whose directory holds the file; ``tombstones`` is a file entry with ``count``
  (deleted segment ids, subtracted from the shards' totals), ``base_version`` a
  version name, ``delta_count`` an int >= 0;
- known optional keys have their types, at the top level or in ``metrics`` (where
  ``run`` records them): ``fencing_token`` an int >= 0, ``rows_fingerprint`` a string,
  ``ledger_snapshot`` null or a plain file name. Other unknown top-level keys are kept (newer releases
  may add some); unknown keys inside a shard or file entry are refused.

Parsing (:func:`parse_json`) refuses duplicate keys, NaN/Infinity and deep nesting.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from ..errors import IndexVersionError
from ..schema import MODALITIES
from .seal import LATEST_NAME, SEAL_NAME, VERSION_PATTERN, sanitise

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
SHARD_KINDS = ("float", "binary")
METRICS = ("ip",)
MAX_FILE_NAME_CHARS = 128
MAX_DIM = 65_536
MAX_BITS = 65_536
MAX_FILE_BYTES = 1 << 44  # 16 TiB: any one file of a version
MAX_NTOTAL = 1 << 40
MAX_FILES = 100_000  # entries of one list (shards, id maps, vectors, files)
MAX_TEXT_CHARS = 1_024  # model_id, factory strings, created_at
MAX_NESTING = 32
RESERVED_NAMES = (MANIFEST_NAME, SEAL_NAME, LATEST_NAME)

_NAME_RE = re.compile(rf"[A-Za-z0-9_-][A-Za-z0-9._-]{{0,{MAX_FILE_NAME_CHARS - 1}}}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_VERSION_RE = re.compile(VERSION_PATTERN)
_CREATED_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)")
_PARAM_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}")

REQUIRED_KEYS = (
    "version", "created_at", "model_id", "dim", "bits", "metric", "index_factory", "shards", "id_maps", "ntotal",
)
FILE_KEYS = ("file", "sha256", "bytes")
SHARD_KEYS = FILE_KEYS + ("ntotal", "modality", "kind", "id_map", "factory", "search_params", "recall_at_10",
                          "vectors", "origin")
_FILE_ALLOWED = FILE_KEYS + ("origin",)
_TOMBSTONE_KEYS = _FILE_ALLOWED + ("count",)
_SHARD_REQUIRED = FILE_KEYS + ("ntotal", "modality", "kind", "id_map")


class _Bad(Exception):
    """Internal: one schema violation, turned into IndexVersionError with the source."""


def plain_file_name(name: object) -> str:
    """``name`` when it is a plain file name of a version; IndexVersionError otherwise."""
    try:
        return _name(name, "file")
    except _Bad as err:
        raise IndexVersionError(str(err)) from None


def _name(value: object, where: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value) or value in RESERVED_NAMES:
        raise _Bad(f"{where} = {sanitise(str(value))} is not a plain file name (1-{MAX_FILE_NAME_CHARS} of "
                   f"A-Za-z0-9._-, not starting with '.', not one of {list(RESERVED_NAMES)})")
    return value


def _int(value: object, where: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise _Bad(f"{where} = {sanitise(str(value))} must be an integer within [{lo}, {hi}]")
    return value


def _text(value: object, where: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT_CHARS or (not empty and not value) \
            or not value.isprintable():
        raise _Bad(f"{where} = {sanitise(str(value))} must be printable text of "
                   f"{0 if empty else 1}-{MAX_TEXT_CHARS} characters")
    return value


def _obj(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _Bad(f"{where} must be a JSON object, not {type(value).__name__}")
    return value


def _list(value: object, where: str) -> list[Any]:
    if not isinstance(value, list) or len(value) > MAX_FILES:
        raise _Bad(f"{where} must be a list of at most {MAX_FILES} entries")
    return value


def _keys(entry: Mapping[str, Any], where: str, allowed: tuple[str, ...], required: tuple[str, ...]) -> None:
    missing = [k for k in required if k not in entry]
    if missing:
        raise _Bad(f"{where} lacks {missing}")
    unknown = sorted(k for k in entry if k not in allowed)
    if unknown:
        raise _Bad(f"{where} has unknown keys {[sanitise(k) for k in unknown[:3]]}")


def _origin(entry: Mapping[str, Any], where: str, version: str) -> None:
    """An entry's ``origin``: an older version than the manifest's own."""
    if "origin" not in entry:
        return
    origin = entry["origin"]
    if not isinstance(origin, str) or not _VERSION_RE.fullmatch(origin) or int(origin[1:]) >= int(version[1:]):
        raise _Bad(f"{where}.origin = {sanitise(str(origin))} is not the name of a version older than {version}")


def _file(entry: object, where: str, allowed: tuple[str, ...] = _FILE_ALLOWED) -> Mapping[str, Any]:
    entry = _obj(entry, where)
    _keys(entry, where, allowed, FILE_KEYS)
    _name(entry["file"], f"{where}.file")
    if not isinstance(entry["sha256"], str) or not _SHA256_RE.fullmatch(entry["sha256"]):
        raise _Bad(f"{where}.sha256 = {sanitise(str(entry['sha256']))} is not 64 lowercase hex digits")
    _int(entry["bytes"], f"{where}.bytes", 0, MAX_FILE_BYTES)
    return entry


def _params(value: object, where: str) -> None:
    for key, v in _obj(value, where).items():
        if not _PARAM_RE.fullmatch(key):
            raise _Bad(f"{where} has a bad key {sanitise(key)}")
        _int(v, f"{where}.{key}", 0, 1 << 20)


def _shard(entry: object, where: str) -> Mapping[str, Any]:
    entry = _obj(entry, where)
    _keys(entry, where, SHARD_KEYS, _SHARD_REQUIRED)
    _file({k: entry[k] for k in FILE_KEYS}, where, FILE_KEYS)
    _int(entry["ntotal"], f"{where}.ntotal", 0, MAX_NTOTAL)
    if entry["modality"] not in MODALITIES:
        raise _Bad(f"{where}.modality = {sanitise(str(entry['modality']))} is not one of {list(MODALITIES)}")
    if entry["kind"] not in SHARD_KINDS:
        raise _Bad(f"{where}.kind = {sanitise(str(entry['kind']))} is not one of {list(SHARD_KINDS)}")
    _name(entry["id_map"], f"{where}.id_map")
    if "factory" in entry:
        _text(entry["factory"], f"{where}.factory", empty=True)
    if "search_params" in entry:
        _params(entry["search_params"], f"{where}.search_params")
    recall = entry.get("recall_at_10")
    if recall is not None and (type(recall) not in (int, float) or not 0.0 <= recall <= 1.0):
        raise _Bad(f"{where}.recall_at_10 = {sanitise(str(recall))} must be null or a number within [0, 1]")
    vectors = entry.get("vectors", "")
    if vectors != "":
        _name(vectors, f"{where}.vectors")
    return entry


def _check(data: Mapping[str, Any]) -> None:
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise _Bad(f"lacks {missing}")
    fmt = data.get("format", FORMAT_VERSION)
    if type(fmt) is not int or fmt != FORMAT_VERSION:
        raise _Bad(f"format = {sanitise(str(fmt))} is not {FORMAT_VERSION} (written by another release?)")
    if not isinstance(data["version"], str) or not _VERSION_RE.fullmatch(data["version"]):
        raise _Bad(f"version = {sanitise(str(data['version']))} is not a version name")
    parent = data.get("parent_version")
    if parent is not None and (not isinstance(parent, str) or not _VERSION_RE.fullmatch(parent)):
        raise _Bad(f"parent_version = {sanitise(str(parent))} is not null or a version name")
    if not isinstance(data["created_at"], str) or not _CREATED_RE.fullmatch(data["created_at"]):
        raise _Bad(f"created_at = {sanitise(str(data['created_at']))} is not an ISO 8601 UTC time")
    _text(data["model_id"], "model_id")
    _int(data["dim"], "dim", 1, MAX_DIM)
    bits = _int(data["bits"], "bits", 8, MAX_BITS)
    if bits % 8:
        raise _Bad(f"bits = {bits} is not a multiple of 8")
    if data["metric"] not in METRICS:
        raise _Bad(f"metric = {sanitise(str(data['metric']))} is not one of {list(METRICS)}")
    factory = _obj(data["index_factory"], "index_factory")
    _keys(factory, "index_factory", SHARD_KINDS, SHARD_KINDS)
    for kind in SHARD_KINDS:
        _text(factory[kind], f"index_factory.{kind}")
    ntotal = _int(data["ntotal"], "ntotal", 0, MAX_NTOTAL)
    for key in ("metrics", "build_config", "index_choice", "build_stats"):
        if key in data:
            _obj(data[key], key)
    if "search_params" in data:
        _params(data["search_params"], "search_params")
    for prefix, holder in (("", data), ("metrics.", data.get("metrics", {}))):  # the run records them in metrics
        if "fencing_token" in holder:
            _int(holder["fencing_token"], f"{prefix}fencing_token", 0, (1 << 63) - 1)
        if "rows_fingerprint" in holder:
            _text(holder["rows_fingerprint"], f"{prefix}rows_fingerprint")
        if holder.get("ledger_snapshot") is not None:
            _name(holder["ledger_snapshot"], f"{prefix}ledger_snapshot")

    if data.get("base_version") is not None and (not isinstance(data["base_version"], str)
                                                 or not _VERSION_RE.fullmatch(data["base_version"])):
        raise _Bad(f"base_version = {sanitise(str(data['base_version']))} is not null or a version name")
    if "delta_count" in data:
        _int(data["delta_count"], "delta_count", 0, MAX_FILES)

    shards = [_shard(s, f"shards[{i}]") for i, s in enumerate(_list(data["shards"], "shards"))]
    if not shards:
        raise _Bad("shards is empty")
    lists = {key: [_file(f, f"{key}[{i}]") for i, f in enumerate(_list(data.get(key, []), key))]
             for key in ("id_maps", "vectors", "files")}
    tombstones = data.get("tombstones")
    dead = 0
    if tombstones is not None:
        tombstones = _file(tombstones, "tombstones", _TOMBSTONE_KEYS)
        dead = _int(tombstones.get("count"), "tombstones.count", 0, MAX_NTOTAL)
        if tombstones["bytes"] < 8 * dead:
            raise _Bad(f"tombstones.bytes = {tombstones['bytes']} cannot hold {dead} int64 segment ids")
    for i, s in enumerate(shards):
        _origin(s, f"shards[{i}]", data["version"])
    for key, entries in lists.items():
        for i, f in enumerate(entries):
            _origin(f, f"{key}[{i}]", data["version"])
    if tombstones is not None:
        _origin(tombstones, "tombstones", data["version"])
    seen: set[str] = set()
    for where, name in ([(f"shards[{i}]", s["file"]) for i, s in enumerate(shards)]
                        + [(f"{key}[{i}]", f["file"]) for key, entries in lists.items()
                           for i, f in enumerate(entries)]
                        + ([("tombstones", tombstones["file"])] if tombstones is not None else [])):
        if name in seen:
            raise _Bad(f"{where}.file = {sanitise(name)} is listed twice")
        seen.add(name)

    id_maps = {f["file"] for f in lists["id_maps"]}
    vectors = {f["file"] for f in lists["vectors"]}
    by_map: dict[str, list[Mapping[str, Any]]] = {}
    for i, s in enumerate(shards):
        if s["id_map"] not in id_maps:
            raise _Bad(f"shards[{i}].id_map = {sanitise(s['id_map'])} is not listed in id_maps")
        if s.get("vectors", "") and s["vectors"] not in vectors:
            raise _Bad(f"shards[{i}].vectors = {sanitise(s['vectors'])} is not listed in vectors")
        group = by_map.setdefault(s["id_map"], [])
        first = group[0] if group else s
        if any(g["kind"] == s["kind"] for g in group) or (s["modality"], s["ntotal"], s.get("vectors", "")) != (
                first["modality"], first["ntotal"], first.get("vectors", "")):
            raise _Bad(f"shards[{i}] disagrees with another shard of id map {sanitise(s['id_map'])} "
                       "(one shard per kind, same modality, ntotal and vectors)")
        group.append(s)
    unused = sorted(id_maps - set(by_map)) or sorted(vectors - {s.get("vectors", "") for s in shards})
    if unused:
        raise _Bad(f"{sanitise(unused[0])} is listed but no shard uses it")
    for kind in SHARD_KINDS:
        total = sum(s["ntotal"] for s in shards if s["kind"] == kind)
        if total - dead != ntotal:
            less = f" less {dead} tombstones" if dead else ""
            raise _Bad(f"the {kind} shards hold {total} vectors in all{less}, ntotal says {ntotal}")


def check_manifest(data: object, source: str = "manifest") -> Mapping[str, Any]:
    """``data`` when it is a valid manifest object; IndexVersionError naming the first problem."""
    try:
        _check(_obj(data, "the manifest"))
    except _Bad as err:
        raise IndexVersionError(f"{source}: {err}; refusing this version") from None
    return data  # type: ignore[return-value]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Bad(f"key {sanitise(key)} appears twice in one object")
        out[key] = value
    return out


def _refuse_constant(name: str) -> Any:
    raise _Bad(f"{name} is not a JSON number")


_STRING_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKET_RE = re.compile(r"[\[\]{}]")


def _depth(text: str) -> int:
    """Deepest nesting of arrays and objects (brackets inside strings do not count)."""
    depth = deepest = 0
    for ch in _BRACKET_RE.findall(_STRING_RE.sub("", text)):
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def parse_json(data: str | bytes, source: str = "manifest") -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity, at most MAX_NESTING levels."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        if _depth(text) > MAX_NESTING:
            raise _Bad(f"nests deeper than {MAX_NESTING} levels")
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except _Bad as err:
        raise IndexVersionError(f"{source} is not valid JSON: {err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IndexVersionError(f"{source} is not valid JSON: {str(err)[:120]}") from None
