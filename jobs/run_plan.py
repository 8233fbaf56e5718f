"""What a run looks at and what it must do: backfill selection, listing, the ledger diff.

``list_selection`` lists the source (only under ``Selection.prefix``), applies the
include/exclude globs and the time range; ``plan_work`` splits the listed items
against the ledger into work to do, unchanged entries and deleted entries.
"""

from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import os
from collections.abc import Callable, Collection, Sequence

from xmodal_index.pipeline.listing import SourceConfig, plan_items, refused_links
from xmodal_index.pipeline.types import MediaItem
from xmodal_index.sinks import storage
from xmodal_index.sinks.errors import ObjectNotFoundError
from xmodal_index.sinks.ledger import LedgerEntry


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which part of the source a run looks at (backfill ranges).

    prefix: a path prefix relative to the source, S3-style ("videos/2024/" is a
      folder, "videos/2024-0" every name starting so); "" is the whole source.
    since / until: keep objects last modified in [since, until) (timezone-aware;
      an item's time is the newest of its file and its caption sidecars).
    Ledger entries outside the prefix are carried over untouched; only objects under
    it can be marked deleted. Objects outside the time range are left as they are.
    """

    prefix: str = ""
    since: datetime.datetime | None = None
    until: datetime.datetime | None = None

    def __post_init__(self) -> None:
        p = self.prefix
        if p.startswith("/") or "\\" in p or ".." in p.split("/") or any(c in p for c in "*?["):
            raise ValueError(f"{self.prefix = } must be a relative path prefix without '..' or glob characters")
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise ValueError(f"{name} = {value!r} must carry a timezone")
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ValueError(f"since = {self.since.isoformat()} must be before until = {self.until.isoformat()}")

    def in_range(self, mtime: float) -> bool:
        if self.since is not None and mtime < self.since.timestamp():
            return False
        return self.until is None or mtime < self.until.timestamp()



@dataclasses.dataclass(frozen=True)
class Listing:
    """What a run sees of its source."""

    items: list[MediaItem]  # selected: under the prefix and inside the time range
    listed: frozenset[str]  # uris of every item under the prefix (whatever its time)
    scope: str  # uri prefix: ledger entries starting with it can be marked deleted
    skipped_by_range: int
    # items (uri as in ``items``) that are listed but refused at stage list: uri -> (error type, reason)
    refused: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)


def _source_root(source: str) -> str:
    if storage.is_s3(source):
        return source.rstrip("/")
    path = source[len("file://"):] if source.startswith("file://") else source
    return os.path.abspath(path).rstrip(os.sep) or os.sep


def list_selection(source: str, config: SourceConfig | None = None, selection: Selection = Selection()) -> Listing:
    """List ``source`` (only under ``selection.prefix``), apply the include/exclude globs
    (relative to the source) and the time range, and plan the work items."""
    config = SourceConfig() if config is None else config
    root = _source_root(source)
    prefix = selection.prefix
    folder = prefix[: prefix.rfind("/") + 1]
    listed_root = storage.join(source, folder) if folder else source
    objects = storage.list_objects(listed_root)
    links = {link.info.uri: link for link in refused_links(listed_root)}  # symlinks the listing does not follow
    chosen = []
    for obj in [*objects, *(link.info for link in links.values())]:
        rel = obj.uri[len(root) + 1:] if obj.uri.startswith(root + "/") else os.path.basename(obj.uri)
        if not rel.startswith(prefix):
            continue
        if config.include and not any(fnmatch.fnmatchcase(rel, p) for p in config.include):
            continue
        if any(fnmatch.fnmatchcase(rel, p) for p in config.exclude):
            continue
        chosen.append(obj)
    if prefix and not chosen:
        raise ObjectNotFoundError(f"nothing under {source!r} matches the prefix {prefix!r}")
    mtimes = {o.uri: o.mtime for o in chosen}
    # a refused link is an item of its own, never a sidecar of another
    planned = sorted(plan_items([o for o in chosen if o.uri not in links])
                     + plan_items([o for o in chosen if o.uri in links]), key=lambda i: i.uri)
    items = [i for i in planned if selection.in_range(max([i.mtime, *(mtimes.get(s, 0.0) for s in i.sidecars)]))]
    refused = {_printable_uri(i.uri): (links[i.uri].error_type, links[i.uri].reason) for i in planned if i.uri in links}
    return Listing(items=items, listed=frozenset(i.uri for i in planned), scope=root + "/" + prefix,
                   skipped_by_range=len(planned) - len(items), refused=refused)


def plan_work(items: Sequence[MediaItem], ledger: dict[str, LedgerEntry], model_id: str, full: bool,
              retry_failed: bool, *, listed: Collection[str] | None = None,
              in_scope: Callable[[str], bool] | None = None,
              ) -> tuple[list[MediaItem], list[LedgerEntry], list[LedgerEntry]]:
    """Split listed items into (to process, unchanged ledger entries, deleted ledger entries).

    An item is processed when it is new, its etag or size changed, it was indexed with another
    model, it failed before and ``retry_failed``, or ``full``. Deleted: entries (not
    already deleted) that are in scope (``in_scope(uri)``, default all) but not among
    ``listed`` (default: the items' uris).
    """
    todo: list[MediaItem] = []
    unchanged: list[LedgerEntry] = []
    for item in items:
        prev = ledger.get(item.uri)
        if prev is None or full or (prev.etag, prev.size) != (item.etag, item.size) or prev.state == "deleted":
            todo.append(item)
        elif (prev.state == "failed" and not retry_failed) or (prev.state == "indexed" and prev.model_id == model_id):
            unchanged.append(prev)
        else:
            todo.append(item)
    seen = set(listed) if listed is not None else {i.uri for i in items}
    deleted = [
        dataclasses.replace(e, state="deleted", segments=0)
        for uri, e in ledger.items()
        if uri not in seen and e.state != "deleted" and (in_scope is None or in_scope(uri))
    ]
    return todo, unchanged, deleted


def _printable_uri(uri: str) -> str:
    """A file name that is not UTF-8 (surrogate-escaped by Python) with its bad bytes
    written as \\xNN: Beam's coders and Parquet can carry it, and it is stable."""
    return uri.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def split_unrepresentable(items: Sequence[MediaItem], listed: frozenset[str]
                          ) -> tuple[list[MediaItem], frozenset[str], set[str]]:
    """Give items whose names are not valid UTF-8 a printable uri; return the items,
    the listed uris in the same form, and the printable uris of those items."""
    out, bad = [], set()
    for item in items:
        fixed = _printable_uri(item.uri)
        if fixed != item.uri:
            bad.add(fixed)
            item = dataclasses.replace(item, uri=fixed, sidecars=tuple(_printable_uri(u) for u in item.sidecars))
        out.append(item)
    return out, frozenset(_printable_uri(u) for u in listed), bad
