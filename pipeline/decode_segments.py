"""DecodeSegments: MediaItem -> Segments, in killable worker processes.

Every item ends either with an ItemOutcome (decoded; its segment count) or with a
DeadLetter (stage, error type, message). A decoder crash or hang costs one item.

An item can fail after some of its segments were decoded (a file damaged midway,
a worker killed mid-stream). So that such an item leaves no rows behind, the
segments of an item are held back until the item has decoded completely, up to
``DecodeConfig.max_hold_bytes``; a failure drops them unseen. An item larger
than that streams on once the hold is full; if it fails later, the segments
already sent on are encoded and written like any others, and its dead letter's
message starts with ``PARTIAL_OUTPUT_MARK`` and their count. The ledger marks the
item failed, so index builds never read those rows (docs/BAD_MEDIA.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics

from . import progress
from .decode import DecodeConfig, DecodeError, decode_item
from .encode import METRICS_NAMESPACE
from .types import DeadLetter, ItemOutcome, MediaItem, Segment

logger = logging.getLogger(__name__)

DEADLETTER_TAG = "deadletter"
OUTCOME_TAG = "outcome"
PARTIAL_OUTPUT_MARK = "partial output:"
MAX_MESSAGE_CHARS = 2000

DecodeFn = Callable[[MediaItem, DecodeConfig], Iterable[Segment]]


def payload_bytes(segment: Segment) -> int:
    """Approximate bytes a segment holds (its payload's)."""
    payload = segment.payload
    if hasattr(payload, "nbytes"):
        return int(payload.nbytes)
    if isinstance(payload, (str, bytes)):
        return len(payload)
    return 64


class _HeldItem:
    """The segments of one item on their way out: held until the item completes or
    the hold is full, then passed on as they come."""

    def __init__(self, max_hold_bytes: int) -> None:
        self._max = max_hold_bytes
        self._held: list[Segment] = []
        self._held_bytes = 0
        self.released = 0  # segments already passed on
        self.total = 0

    def add(self, segment: Segment) -> list[Segment]:
        """Segments to pass on now (none while the hold has room)."""
        self.total += 1
        if self.released:
            self.released += 1
            return [segment]
        self._held.append(segment)
        self._held_bytes += payload_bytes(segment)
        if self._held_bytes <= self._max:
            return []
        return self.release()

    def release(self) -> list[Segment]:
        out, self._held, self._held_bytes = self._held, [], 0
        self.released += len(out)
        return out

    def drop(self) -> None:
        self._held, self._held_bytes = [], 0


class _DecodeFn(beam.DoFn):
    def __init__(self, config: DecodeConfig, isolate: bool, decode_fn: DecodeFn):
        self._config = config
        self._isolate = isolate
        self._decode_fn = decode_fn
        self._decoder = None
        self._items = Metrics.counter(METRICS_NAMESPACE, "items_decoded")
        self._failed = Metrics.counter(METRICS_NAMESPACE, "items_failed")
        self._failed_after_output = Metrics.counter(METRICS_NAMESPACE, "items_failed_after_output")
        self._segments = Metrics.counter(METRICS_NAMESPACE, "segments")
        self._per_item = Metrics.distribution(METRICS_NAMESPACE, "segments_per_item")

    def setup(self) -> None:
        if self._isolate:
            from .isolation import IsolatedDecoder

            self._decoder = IsolatedDecoder(self._config, decode_fn=self._decode_fn)
            self._decoder.start()  # the workers import their decoders while the bundle is set up

    def teardown(self) -> None:
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None

    def _segments_of(self, item: MediaItem) -> Iterable[Segment]:
        if self._decoder is not None:
            return self._decoder.decode(item)
        return self._decode_fn(item, self._config)

    def process(self, item: MediaItem):
        hold = _HeldItem(self._config.max_hold_bytes)
        spent, media_s = [0.0], 0.0
        try:
            for seg in _timed(self._segments_of(item), spent):
                if seg.modality in ("video", "audio"):
                    media_s = max(media_s, float(seg.end_s))
                yield from hold.add(seg)
            yield from hold.release()
        except DecodeError as err:
            hold.drop()
            yield self._dead(item, err.stage, err, hold.released)
            return
        except Exception as err:  # noqa: BLE001 - any decoder bug costs one item, not the run
            logger.warning("unexpected %s decoding %s: %s", type(err).__name__, item.uri, err)
            hold.drop()
            yield self._dead(item, "decode", err, hold.released)
            return
        n = hold.total
        self._items.inc()
        self._segments.inc(n)
        self._per_item.update(n)
        progress.add("items_done")
        progress.add("segments", n)
        progress.add("media_s", media_s)
        yield beam.pvalue.TaggedOutput(OUTCOME_TAG, ItemOutcome(
            item.uri, item.etag, item.size, item.mtime, n, finished_at=round(time.time(), 3),
            media_s=round(media_s, 3), decode_s=round(spent[0], 4)))

    def _dead(self, item: MediaItem, stage: str, err: BaseException, released: int):
        self._failed.inc()
        progress.add("items_failed")
        message = dead_letter_message(err, released)
        if released:
            self._failed_after_output.inc()
            logger.warning("%s failed after %d of its segments were passed on: %s", item.uri, released, err)
        return beam.pvalue.TaggedOutput(
            DEADLETTER_TAG, DeadLetter(item.uri, item.etag, stage, type(err).__name__, message)
        )


def _timed(segments: Iterable[Segment], spent: list[float]) -> Iterator[Segment]:
    """``segments`` as they come, adding the seconds spent producing them to ``spent[0]``
    (the time downstream steps take between two segments is not counted)."""
    it = iter(segments)
    while True:
        t = time.perf_counter()
        try:
            seg = next(it)
        except StopIteration:
            return
        finally:
            spent[0] += time.perf_counter() - t
        yield seg


def dead_letter_message(err: BaseException, released: int = 0) -> str:
    """The dead-letter message of an error, cut to ``MAX_MESSAGE_CHARS``; led by
    ``PARTIAL_OUTPUT_MARK`` when ``released`` segments of the item were passed on."""
    text = " ".join(str(err).split()) or type(err).__name__
    if released:
        text = (f"{PARTIAL_OUTPUT_MARK} {released} segment(s) were written before the failure "
                f"(not live: the ledger marks the item failed); {text}")
    return text[:MAX_MESSAGE_CHARS]


class DecodeSegments(beam.PTransform):
    """PCollection[MediaItem] -> DoOutputsTuple(segments, deadletter=..., outcome=...).

    isolate=True (the default) decodes in warm, killable child processes with
    wall-clock and memory limits from DecodeConfig. ``decode_fn`` (a module-level
    function of item and config that yields segments) replaces ``decode_item``.
    """

    def __init__(self, config: DecodeConfig, isolate: bool = True, decode_fn: DecodeFn = decode_item):
        super().__init__()
        self._config = config
        self._isolate = isolate
        self._decode_fn = decode_fn

    def expand(self, items):
        return items | "Decode" >> beam.ParDo(_DecodeFn(self._config, self._isolate, self._decode_fn)).with_outputs(
            DEADLETTER_TAG, OUTCOME_TAG, main="segments"
        )
