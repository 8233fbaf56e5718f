"""ListArchive: turn a listing of objects into MediaItems (media + caption sidecars).

Storage listings follow symbolic links only to files inside the listed root.
:func:`refused_links` names the media-named links a listing left out (pointing
outside the root, dangling, looping), so that a run can report each of them as a
dead letter at stage ``list`` instead of leaving them out silently.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import posixpath
from collections.abc import Iterable, Iterator

import apache_beam as beam

from xmodal_index.sinks import storage
from xmodal_index.sinks.storage import ObjectInfo

from .types import CAPTION_EXTS, MediaItem, kind_of

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """Which objects under the source URI are part of the archive.

    include / exclude: glob patterns on the path relative to the source
    (e.g. "videos/*.mp4"); empty include means everything.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(p, str) and p for p in value):
                raise ValueError(f"source {name} = {value!r} must be a list of non-empty glob patterns")


def _stem(uri: str) -> str:
    base, _ext = posixpath.splitext(uri)
    return base


def plan_items(objects: Iterable[ObjectInfo]) -> list[MediaItem]:
    """Group objects into work items.

    A caption file (.vtt/.srt) whose stem matches a video or audio object becomes a
    sidecar of it; every other recognised object is an item of its own kind.
    Objects with unknown extensions are skipped. Output is sorted by uri.
    """
    objs = [o for o in objects if kind_of(o.uri) is not None]
    media_by_stem: dict[str, ObjectInfo] = {}
    for o in objs:
        if kind_of(o.uri) in ("video", "audio"):
            media_by_stem.setdefault(_stem(o.uri), o)
    sidecars: dict[str, list[ObjectInfo]] = {}
    attached: set[str] = set()
    for o in objs:
        if o.uri.lower().endswith(CAPTION_EXTS):
            owner = media_by_stem.get(_stem(o.uri))
            if owner is not None:
                sidecars.setdefault(owner.uri, []).append(o)
                attached.add(o.uri)
    items = []
    for o in objs:
        if o.uri in attached:
            continue
        side = sorted(sidecars.get(o.uri, []), key=lambda s: s.uri)
        items.append(
            MediaItem(
                uri=o.uri,
                kind=kind_of(o.uri),
                size=o.size,
                mtime=o.mtime,
                etag=MediaItem.combined_etag(o, side),
                sidecars=tuple(s.uri for s in side),
            )
        )
    items.sort(key=lambda i: i.uri)
    return items


LINK_OUTSIDE = "SymlinkOutsideSourceError"
LINK_BROKEN = "BrokenSymlinkError"
LINK_REASONS = {
    LINK_OUTSIDE: "symbolic link to a file outside the source root: not followed, not indexed "
                  "(copy the file into the archive, or link to a file inside it)",
    LINK_BROKEN: "symbolic link whose target does not exist (or a loop of links): not indexed",
}


@dataclasses.dataclass(frozen=True)
class RefusedLink:
    """A symlinked file of a local source that the listing does not follow."""

    info: ObjectInfo  # the link itself: its path, and lstat's size and time; etag from its target
    error_type: str  # LINK_OUTSIDE or LINK_BROKEN

    @property
    def reason(self) -> str:
        return LINK_REASONS[self.error_type]


def _inside(path: str, real_root: str) -> bool:
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def refused_links(prefix: str) -> list[RefusedLink]:
    """Symlinked files under a local ``prefix`` with a media or text name that
    ``storage.list_objects(prefix)`` leaves out: links to files outside the prefix's
    real root, dangling links and loops (sorted by path; none for s3://)."""
    if storage.is_s3(prefix):
        return []
    root = storage.normalize_uri(prefix)
    if not os.path.isdir(root):
        return []
    real_root = os.path.realpath(root)
    out = []
    for directory, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(directory, name)
            if not os.path.islink(path) or kind_of(path) is None:
                continue
            try:
                os.stat(path)
                if not os.path.isfile(path) or _inside(path, real_root):
                    continue  # followed by the listing, or not a file at all
                error_type = LINK_OUTSIDE
            except OSError as err:
                if err.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                    continue
                error_type = LINK_BROKEN
            try:
                st = os.lstat(path)
                target = os.readlink(path)
            except OSError:
                continue  # gone since it was listed
            fingerprint = f"{target}:{st.st_mtime_ns}".encode("utf-8", "surrogateescape")
            etag = "link-" + hashlib.sha1(fingerprint).hexdigest()[:20]
            out.append(RefusedLink(ObjectInfo(uri=path, size=st.st_size, mtime=st.st_mtime, etag=etag), error_type))
    out.sort(key=lambda link: link.info.uri)
    return out


def list_items(source: str, config: SourceConfig = SourceConfig()) -> list[MediaItem]:
    """List ``source`` through the storage layer and plan its items."""
    return plan_items(storage.list_objects(source, include=config.include, exclude=config.exclude))


class _ListFn(beam.DoFn):
    def __init__(self, config: SourceConfig):
        self._config = config

    def process(self, source: str) -> Iterator[MediaItem]:
        yield from list_items(source, self._config)


class ListArchive(beam.PTransform):
    """PCollection[str source URI] -> PCollection[MediaItem], spread over workers."""

    def __init__(self, config: SourceConfig = SourceConfig()):
        super().__init__()
        self._config = config

    def expand(self, sources):
        return sources | "List" >> beam.ParDo(_ListFn(self._config)) | "Spread" >> beam.Reshuffle()
