"""DecodeSegments: MediaItem -> Segments, in killable worker processes.

Every item ends either with an ItemOutcome (decoded; its segment count) or with a
DeadLetter (stage, error type, message). A decoder crash or hang costs one item.
"""

from __future__ import annotations

import logging
from typing import Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics

from xmodal_index.pipeline import progress
from xmodal_index.pipeline.decode import DecodeConfig, DecodeError, decode_item
from xmodal_index.pipeline.encode import METRICS_NAMESPACE
from xmodal_index.pipeline.types import DeadLetter, ItemOutcome, MediaItem, Segment

logger = logging.getLogger(__name__)

DEADLETTER_TAG = "deadletter"
OUTCOME_TAG = "outcome"


class _DecodeFn(beam.DoFn):
    def __init__(self, config: DecodeConfig, isolate: bool):
        self._config = config
        self._isolate = isolate
        self._decoder = None
        self._items = Metrics.counter(METRICS_NAMESPACE, "items_decoded")
        self._failed = Metrics.counter(METRICS_NAMESPACE, "items_failed")
        self._segments = Metrics.counter(METRICS_NAMESPACE, "segments")
        self._per_item = Metrics.distribution(METRICS_NAMESPACE, "segments_per_item")

    def setup(self) -> None:
        if self._isolate:
            from xmodal_index.pipeline.isolation import IsolatedDecoder

            self._decoder = IsolatedDecoder(self._config)

    def teardown(self) -> None:
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None

    def _segments_of(self, item: MediaItem) -> Iterator[Segment]:
        if self._decoder is not None:
            return self._decoder.decode(item)
        return decode_item(item, self._config)

    def process(self, item: MediaItem):
        n = 0
        try:
            for seg in self._segments_of(item):
                n += 1
                yield seg
        except DecodeError as err:
            yield self._dead(item, getattr(err, "stage", "decode"), err)
            return
        except Exception as err:  # noqa: BLE001 - any decoder bug costs one item, not the run
            logger.warning("unexpected %s decoding %s: %s", type(err).__name__, item.uri, err)
            yield self._dead(item, "decode", err)
            return
        self._items.inc()
        self._segments.inc(n)
        self._per_item.update(n)
        progress.add("items_done")
        progress.add("segments", n)
        yield beam.pvalue.TaggedOutput(OUTCOME_TAG, ItemOutcome(item.uri, item.etag, item.size, item.mtime, n))

    def _dead(self, item: MediaItem, stage: str, err: BaseException):
        self._failed.inc()
        progress.add("items_failed")
        msg = str(err) or type(err).__name__
        return beam.pvalue.TaggedOutput(
            DEADLETTER_TAG, DeadLetter(item.uri, item.etag, stage, type(err).__name__, msg[:2000])
        )


class DecodeSegments(beam.PTransform):
    """PCollection[MediaItem] -> DoOutputsTuple(segments, deadletter=..., outcome=...).

    isolate=True (the default) decodes in warm, killable child processes with
    wall-clock and memory limits from DecodeConfig.
    """

    def __init__(self, config: DecodeConfig, isolate: bool = True):
        super().__init__()
        self._config = config
        self._isolate = isolate

    def expand(self, items):
        return items | "Decode" >> beam.ParDo(_DecodeFn(self._config, self._isolate)).with_outputs(
            DEADLETTER_TAG, OUTCOME_TAG, main="segments"
        )
