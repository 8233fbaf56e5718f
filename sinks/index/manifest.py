"""Index version manifests (SPEC 4.4), version names, checksums and the LATEST pointer.

Layout under an index root (e.g. ``WORKDIR/indexes/NAME``)::

    v000001/manifest.json    written after every other file of the version
    v000001/<shard, id-map and vector files, extra files such as model.safetensors>
    LATEST                   names the current version; written last of all

A version directory without ``manifest.json`` is an interrupted build: it is never
listed as a version, and its number is never reused. ``delete_version`` removes the
manifest first, so a version being deleted stops being listed at once.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from .. import storage
from ..errors import IndexVersionError, ObjectNotFoundError
from . import manifest_schema as schema
from . import seal

logger = logging.getLogger(__name__)

MANIFEST_NAME = schema.MANIFEST_NAME
LATEST_NAME = seal.LATEST_NAME
FORMAT_VERSION = schema.FORMAT_VERSION
SHARD_KINDS = schema.SHARD_KINDS
MAX_MANIFEST_BYTES = 16 << 20  # a larger manifest.json is refused unread
# Columns of a shard's id map Parquet file, sorted by segment_id.
ID_MAP_COLUMNS = ("segment_id", "uri", "modality", "start_s", "end_s", "text", "etag")
# Id-map column (int64) giving each row's position in the shard's stored-vectors file.
VECTOR_ROW_COLUMN = "vector_row"

_VERSION_RE = re.compile(r"v(\d{6,12})")


# ---------------------------------------------------------------- versions


def version_name(number: int) -> str:
    """``1 -> "v000001"``."""
    if number < 1:
        raise ValueError(f"{number = } must be >= 1")
    return f"v{number:06d}"


def version_number(name: str) -> int:
    """``"v000001" -> 1``; raises IndexVersionError for anything else."""
    match = _VERSION_RE.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise IndexVersionError(f"{seal.sanitise(str(name))} is not a version name (expected v000001, v000002, ...)")
    return int(match.group(1))


def _version_dirs(index_root: str) -> dict[str, set[str]]:
    """Version directory name -> names of the files directly inside it."""
    root = index_root.rstrip("/")
    root_local = root[len("file://"):] if root.startswith("file://") else root
    found: dict[str, set[str]] = {}
    try:
        objects = list(storage.list_objects(index_root))
    except ObjectNotFoundError:
        return found
    for obj in objects:
        rel = _relative(obj.uri, root, root_local)
        if rel is None:
            continue
        parts = rel.split("/")
        if len(parts) == 2 and _VERSION_RE.fullmatch(parts[0]):
            found.setdefault(parts[0], set()).add(parts[1])
    return found


def _relative(uri: str, root: str, root_local: str) -> str | None:
    for base in (root, root_local):
        if uri.startswith(base + "/"):
            return uri[len(base) + 1:]
    if "://" not in uri and "://" not in root_local:
        rel = os.path.relpath(uri, os.path.abspath(root_local))
        if not rel.startswith(".."):
            return rel.replace(os.sep, "/")
    return None


def list_versions(index_root: str) -> list[str]:
    """Complete versions (those with a manifest) under ``index_root``, oldest first."""
    dirs = _version_dirs(index_root)
    complete = [name for name, files in dirs.items() if MANIFEST_NAME in files]
    return sorted(complete, key=version_number)


def next_version(index_root: str) -> str:
    """The name after the highest version directory present, complete or not."""
    numbers = [version_number(name) for name in _version_dirs(index_root)]
    latest = read_latest(index_root)
    if latest is not None:
        numbers.append(version_number(latest))
    return version_name(max(numbers, default=0) + 1)


def read_latest(index_root: str) -> str | None:
    """The version LATEST names, or None when nothing was published yet (bounded,
    strict read: see seal.read_latest_record)."""
    record = seal.read_latest_record(index_root)
    return None if record is None else record.version


def incomplete_versions(index_root: str) -> list[str]:
    """Version directories without a manifest (interrupted or running builds), oldest first."""
    dirs = _version_dirs(index_root)
    return sorted((name for name, files in dirs.items() if MANIFEST_NAME not in files), key=version_number)


def delete_version(index_root: str, version: str) -> int:
    """Delete every object of one version directory, its manifest first; returns the count.

    Refuses the version LATEST names. Local roots also lose the emptied directory.
    """
    version_number(version)
    if read_latest(index_root) == version:
        raise IndexVersionError(f"refusing to delete {version} of {index_root!r}: LATEST names it")
    prefix = storage.join(index_root, version)
    try:
        uris = [obj.uri for obj in storage.list_objects(prefix)]
    except ObjectNotFoundError:
        return 0
    manifest = [u for u in uris if u.rstrip("/").endswith("/" + MANIFEST_NAME)]
    for uri in manifest + [u for u in uris if u not in manifest]:
        storage.delete(uri)
    if not storage.is_s3(index_root):
        local = prefix[len("file://"):] if prefix.startswith("file://") else prefix
        for path, _, _ in os.walk(local, topdown=False):
            try:
                os.rmdir(path)
            except OSError:
                pass
    logger.info("deleted %s of %s (%d objects)", version, index_root, len(uris))
    return len(uris)


# ---------------------------------------------------------------- checksums


def sha256_file(path: str, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- manifest


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """One file of a version: its name inside the version directory, sha256, size."""

    file: str
    sha256: str
    bytes: int
    origin: str = ""  # incremental versions: the older version whose directory holds the file ("" = this one)

    @classmethod
    def of_local(cls, path: str, name: str) -> FileEntry:
        return cls(file=name, sha256=sha256_file(path), bytes=os.path.getsize(path))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not self.origin:
            del out["origin"]
        return out


@dataclasses.dataclass(frozen=True)
class ShardEntry:
    """One FAISS shard: a float or binary index over the rows of one id map."""

    file: str
    sha256: str
    bytes: int
    ntotal: int
    modality: str
    kind: str  # "float" | "binary"
    id_map: str  # file name of the shard's id map
    factory: str = ""  # index_factory string actually used for this shard
    search_params: Mapping[str, int] = dataclasses.field(default_factory=dict)  # nprobe / efSearch / rerank
    recall_at_10: float | None = None
    vectors: str = ""  # file name of the shard's float16 vectors (rows via the id map's vector_row)
    origin: str = ""  # incremental versions: the older version whose directory holds the file ("" = this one)

    def __post_init__(self) -> None:
        if self.kind not in SHARD_KINDS:
            raise IndexVersionError(f"shard {self.file!r}: {self.kind = } must be one of {SHARD_KINDS}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["search_params"] = dict(self.search_params)
        if not self.origin:
            del out["origin"]
        return out


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a version holds and how it was built; ``manifest.json`` of the version."""

    version: str
    created_at: str  # ISO 8601, UTC
    parent_version: str | None
    model_id: str
    dim: int
    bits: int
    metric: str
    index_factory: Mapping[str, str]  # {"float": ..., "binary": ...} of the largest modality
    shards: tuple[ShardEntry, ...]
    id_maps: tuple[FileEntry, ...]
    files: tuple[FileEntry, ...]  # extra files (encoder checkpoint, configs)
    ntotal: int
    metrics: Mapping[str, Any]
    search_params: Mapping[str, int]  # {"nprobe": ..., "efSearch": ...}, the largest of any shard
    build_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    vectors: tuple[FileEntry, ...] = ()  # float16 vectors per shard, for re-ranking and two-stage search
    index_choice: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # per modality: factories, why
    build_stats: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # wall time, rows, passes, memory
    format: int = FORMAT_VERSION
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # unknown keys, kept on rewrite

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(sorted({s.modality for s in self.shards}))

    @property
    def tombstones(self) -> FileEntry | None:
        """Incremental versions: the file of deleted segment ids (sorted int64 .npy) searches skip."""
        entry = self.extra.get("tombstones")
        if not entry:
            return None
        return FileEntry(entry["file"], entry["sha256"], entry["bytes"], entry.get("origin", ""))

    def all_files(self) -> list[FileEntry]:
        """Every file a loader must fetch and verify: shards, id maps, vectors, extra files, tombstones."""
        shards = [FileEntry(s.file, s.sha256, s.bytes, s.origin) for s in self.shards]
        tombstones = [self.tombstones] if self.tombstones is not None else []
        return shards + list(self.id_maps) + list(self.vectors) + list(self.files) + tombstones

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out.update(
            format=self.format,
            version=self.version,
            created_at=self.created_at,
            parent_version=self.parent_version,
            model_id=self.model_id,
            dim=self.dim,
            bits=self.bits,
            metric=self.metric,
            index_factory=dict(self.index_factory),
            shards=[s.to_dict() for s in self.shards],
            id_maps=[f.to_dict() for f in self.id_maps],
            files=[f.to_dict() for f in self.files],
            ntotal=self.ntotal,
            metrics=dict(self.metrics),
            search_params=dict(self.search_params),
            build_config=dict(self.build_config),
            vectors=[f.to_dict() for f in self.vectors],
            index_choice=dict(self.index_choice),
            build_stats=dict(self.build_stats),
        )
        return out

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, fixed separators, ASCII): the bytes a version's digest seals."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "manifest") -> Manifest:
        """A Manifest from its JSON object, after the strict schema check (manifest_schema)."""
        schema.check_manifest(data, source)
        known = {f.name for f in dataclasses.fields(cls)}

        def entries(key: str) -> tuple[FileEntry, ...]:
            return tuple(FileEntry(f["file"], f["sha256"], f["bytes"], f.get("origin", "")) for f in data.get(key, []))

        return cls(
            version=data["version"],
            created_at=data["created_at"],
            parent_version=data.get("parent_version"),
            model_id=data["model_id"],
            dim=data["dim"],
            bits=data["bits"],
            metric=data["metric"],
            index_factory=dict(data["index_factory"]),
            shards=tuple(ShardEntry(**s) for s in data["shards"]),
            id_maps=entries("id_maps"),
            files=entries("files"),
            ntotal=data["ntotal"],
            metrics=dict(data.get("metrics", {})),
            search_params=dict(data.get("search_params", {})),
            build_config=dict(data.get("build_config", {})),
            vectors=entries("vectors"),
            index_choice=dict(data.get("index_choice", {})),
            build_stats=dict(data.get("build_stats", {})),
            format=data.get("format", FORMAT_VERSION),
            extra={k: v for k, v in data.items() if k not in known},
        )

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "manifest") -> Manifest:
        """Parse strictly (no duplicate keys, NaN or deep nesting), then check the schema."""
        data = schema.parse_json(text, source)
        if not isinstance(data, dict):
            raise IndexVersionError(f"{source} is not a JSON object")
        return cls.from_dict(data, source)


def canonical_json(data: Mapping[str, Any]) -> str:
    """One fixed text per value: sorted keys, no whitespace, ASCII, no NaN; ends with a newline."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False) + "\n"


def utc_now_iso() -> str:
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return now.isoformat().replace("+00:00", "Z")


def manifest_uri(index_root: str, version: str) -> str:
    return storage.join(index_root, version, MANIFEST_NAME)


def read_manifest(index_root: str, version: str) -> Manifest:
    """The manifest of one version; IndexVersionError when the version is absent or incomplete."""
    return parse_manifest(read_manifest_data(index_root, version), index_root, version)


def read_manifest_data(index_root: str, version: str) -> bytes:
    """The bytes of one version's manifest.json as stored (at most MAX_MANIFEST_BYTES);
    IndexVersionError when the version is absent, incomplete or the file too large."""
    version_number(version)
    uri = manifest_uri(index_root, version)
    try:
        with storage.open_read(uri) as f:
            data = seal.read_at_most(f, MAX_MANIFEST_BYTES + 1)
    except ObjectNotFoundError as err:
        raise IndexVersionError(f"version {version} has no manifest at {uri!r} (missing or interrupted build)") from err
    if len(data) > MAX_MANIFEST_BYTES:
        raise IndexVersionError(f"{uri!r} is larger than {MAX_MANIFEST_BYTES} bytes; refusing it")
    return data


def parse_manifest(data: bytes, index_root: str, version: str) -> Manifest:
    """Parse and check manifest bytes read from ``version`` of ``index_root``."""
    uri = manifest_uri(index_root, version)
    manifest = Manifest.from_json(data, source=uri)
    if manifest.version != version:
        raise IndexVersionError(f"{uri!r} describes version {manifest.version!r}, not {version!r}")
    return manifest


def entry_uri(index_root: str, manifest: Manifest, entry: FileEntry) -> str:
    """Where a listed file is stored: its version's directory, or its ``origin``'s."""
    return storage.join(index_root, entry.origin or manifest.version, entry.file)


def missing_files(index_root: str, manifest: Manifest) -> list[str]:
    """Files the manifest lists that are absent or of another size under the version
    (or under the older version an entry's ``origin`` names; a cheap check by listing;
    the loader verifies every sha256 before serving)."""
    sizes: dict[str, dict[str, int]] = {}
    for where in {e.origin or manifest.version for e in manifest.all_files()} | {manifest.version}:
        try:
            sizes[where] = {obj.uri.rsplit("/", 1)[-1].rsplit(os.sep, 1)[-1]: obj.size
                            for obj in storage.list_objects(storage.join(index_root, where))}
        except ObjectNotFoundError:
            sizes[where] = {}
    problems = []
    for entry in manifest.all_files():
        size = sizes[entry.origin or manifest.version].get(entry.file)
        if size is None:
            problems.append(f"{entry.file} is missing")
        elif size != entry.bytes:
            problems.append(f"{entry.file} has {size} bytes, the manifest says {entry.bytes}")
    return problems


def write_manifest(index_root: str, manifest: Manifest) -> str:
    """Write the manifest as canonical JSON, then its SEAL (digest, and the HMAC when
    XMODAL_INDEX_SIGNING_KEY is set); returns the manifest's URI."""
    uri = manifest_uri(index_root, manifest.version)
    data = manifest.to_json().encode("utf-8")
    Manifest.from_json(data, source=f"the manifest of {manifest.version} being written")  # the schema readers apply
    storage.write_bytes(uri, data)
    digest = seal.manifest_digest(data)
    signature = seal.sign(manifest.version, digest, seal.signing_key_from_env())
    seal.write_seal(index_root, manifest.version, digest, signature)
    return uri
