"""ListArchive: turn a listing of objects into MediaItems (media + caption sidecars)."""

from __future__ import annotations

import dataclasses
import logging
import posixpath
from typing import Iterable, Iterator

import apache_beam as beam

from xmodal_index.pipeline.types import CAPTION_EXTS, MediaItem, kind_of
from xmodal_index.sinks import storage
from xmodal_index.sinks.storage import ObjectInfo

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
