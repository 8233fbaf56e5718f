"""Media queries of `serve`: uploads decoded in isolated, killable worker processes.

An uploaded audio, image or video file is decoded by ``pipeline.isolation``'s
``IsolatedDecoder`` (the workers `run` uses) under the limits of a ``DecodeConfig``
built from :class:`MediaQueryConfig`: bytes, declared duration, pixels, wall clock
and the workers' address space. The server process never decodes media itself, so a
hostile upload costs one worker, never the service's memory or its text queries.

Admission: a media query holds one of ``workers + queue`` slots from its arrival
until it is encoded: at most ``workers`` uploads decode at once, the others wait,
and any further media query is refused at once with :class:`MediaBusyError` (the
server answers 503 with Retry-After). Media queries are encoded by their own
``encode_threads`` (a video query by at most ``max_video_frames`` frames), apart
from text queries. A query whose
request budget runs out while it waits or decodes is stopped: its worker is killed
(and restarted for the next query) and :class:`MediaTimeoutError` is raised.
Decoded payloads are capped too: a query whose decoded media passes
``max_duration_s`` is refused whatever its container declared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from xmodal_index.pipeline.decode import DecodeConfig, DecodeError, LimitExceededError, decode_item
from xmodal_index.pipeline.types import MediaItem, Segment

logger = logging.getLogger(__name__)

MiB = 1 << 20
MEDIA_MODALITIES = ("audio", "image", "video")
_MAX_MESSAGE = 300
_SEGMENT_S = 30.0  # decoded media streams back from a worker in pieces of this many seconds


class MediaQueryError(Exception):
    """A media query refused; ``status`` is the HTTP status the server answers with."""

    status = 400


class MediaBusyError(MediaQueryError):
    """Every decode worker is busy and the wait queue is full."""

    status = 503

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class MediaTimeoutError(MediaQueryError):
    """The request's time budget ran out while its upload waited or decoded; the work was stopped."""

    status = 504


class MediaLimitError(MediaQueryError):
    """The upload is longer, larger or has more pixels than the service accepts."""

    status = 422


@dataclasses.dataclass(frozen=True)
class MediaQueryConfig:
    """How many uploads decode at once, how many may wait, and the limits each must keep."""

    workers: int = 2  # decode worker processes (uploads decoding at once)
    queue: int = 4  # media queries waiting for a worker; more get 503
    retry_after_s: int = 5  # the Retry-After of a 503 "media workers busy"
    max_duration_s: float = 600.0  # longer query media is refused (declared and decoded)
    max_pixels: int = 4096 * 4096  # width * height of an image or video frame
    memory_mb: int = 1536  # address-space limit of one decode worker, MiB
    frame_rate_hz: float = 2.0  # video frames sampled per second of a video query
    max_video_frames: int = 128  # frames of a video query that are encoded (evenly spread)
    encode_threads: int = 1  # media queries encoded at once (text queries have their own threads)

    def __post_init__(self) -> None:
        for name in ("workers", "max_pixels", "retry_after_s", "max_video_frames", "encode_threads"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"media {name} = {value!r} must be an integer >= 1")
        if not (isinstance(self.queue, int) and self.queue >= 0):
            raise ValueError(f"media queue = {self.queue!r} must be an integer >= 0")
        for name in ("max_duration_s", "frame_rate_hz"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"media {name} = {value!r} must be a finite number > 0")
        DecodeConfig(memory_mb=self.memory_mb)  # the decoder's own check of memory_mb

    def decode_config(self, max_bytes: int, timeout_s: float) -> DecodeConfig:
        """The DecodeConfig of one decode worker: these limits, one request's budget as its wall clock."""
        return DecodeConfig(segment_s=min(_SEGMENT_S, self.max_duration_s), frame_rate_hz=self.frame_rate_hz,
                            max_file_bytes=max_bytes, max_duration_s=self.max_duration_s,
                            max_pixels=self.max_pixels, timeout_s=timeout_s, idle_timeout_s=timeout_s,
                            memory_mb=self.memory_mb, workers=1, max_hold_bytes=0)


class _Lease:
    """One upload decoding in one worker; the deadline timer kills the worker only while it lasts."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = False
        self.killed = False


class MediaDecoders:
    """A fixed set of isolated decoders shared by the server's media queries (thread-safe)."""

    def __init__(self, config: MediaQueryConfig, *, max_bytes: int, timeout_s: float,
                 decode_fn: Callable[[MediaItem, DecodeConfig], Iterable[Segment]] = decode_item) -> None:
        from xmodal_index.pipeline.isolation import IsolatedDecoder

        self.config = config
        self._decode_config = config.decode_config(max_bytes, timeout_s)
        self._free = [IsolatedDecoder(self._decode_config, decode_fn=decode_fn) for _ in range(config.workers)]
        self._all = list(self._free)
        self._cond = threading.Condition()
        self._admitted = 0  # decoding + waiting
        self.rejected = 0  # refused with MediaBusyError
        self.killed = 0  # workers killed because a request ran out of time

    def start(self) -> None:
        """Start every worker now (each imports its decoders while the server comes up)."""
        for decoder in self._all:
            decoder.start()

    def close(self) -> None:
        """Stop every worker at once (killed: a decode worker holds nothing worth a clean exit)."""
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for decoder in self._all:
            decoder.close()

    @property
    def in_flight(self) -> int:
        """Media queries admitted: decoding or waiting for a worker."""
        with self._cond:
            return self._admitted

    @property
    def pids(self) -> list[int]:
        return [pid for decoder in self._all for pid in decoder.pids if pid is not None]

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one of the ``workers + queue`` media slots while a media query decodes and encodes;
        MediaBusyError at once when none is free."""
        with self._cond:
            limit = self.config.workers + self.config.queue
            if self._admitted >= limit:
                self.rejected += 1
                raise MediaBusyError(f"all {self.config.workers} media decode workers are busy and "
                                     f"{self.config.queue} media queries are waiting: retry later",
                                     self.config.retry_after_s)
            self._admitted += 1
        try:
            yield
        finally:
            with self._cond:
                self._admitted -= 1

    def decode(self, modality: str, data: bytes, filename: str, deadline: float) -> Any:
        """The payload the encoder takes for an upload, decoded in a worker before ``deadline``
        (a ``time.monotonic()`` value). Raises a MediaQueryError subclass on refusal."""
        decoder = self._take(deadline)
        try:
            return self._decode_in(decoder, modality, data, filename, deadline)
        finally:
            with self._cond:
                self._free.append(decoder)
                self._cond.notify()

    def _take(self, deadline: float) -> Any:
        with self._cond:
            if not self._cond.wait_for(lambda: self._free, timeout=max(0.0, deadline - time.monotonic())):
                raise MediaTimeoutError("the request's time budget ran out while its upload waited for a "
                                        "decode worker")
            return self._free.pop()

    def _decode_in(self, decoder: Any, modality: str, data: bytes, filename: str, deadline: float) -> Any:
        fd, path = tempfile.mkstemp(prefix="xmodal-query-", suffix=_safe_suffix(filename))
        lease = _Lease()
        timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._kill, (decoder, lease))
        timer.daemon = True
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            item = MediaItem(uri=path, kind=modality, size=len(data), mtime=0.0, etag="query")
            timer.start()
            try:
                return self._collect(decoder.decode(item), modality, filename)
            except DecodeError as err:
                with lease.lock:
                    lease.done = True
                if lease.killed:
                    raise MediaTimeoutError(f"decoding the uploaded {modality} {filename!r} took longer than the "
                                            "request's time budget; its worker was stopped") from err
                raise _refusal(err, modality, filename, path) from err
            finally:
                with lease.lock:
                    lease.done = True
        finally:
            timer.cancel()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            if lease.killed:
                decoder.start()  # a fresh worker warms up for the next query

    def _kill(self, decoder: Any, lease: _Lease) -> None:
        with lease.lock:
            if lease.done:
                return
            lease.killed = True
            self.killed += 1
            for pid in decoder.pids:
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        logger.warning("a media query ran out of its time budget: its decode worker was killed")

    def _collect(self, segments: Iterable[Segment], modality: str, filename: str) -> Any:
        parts = []
        for seg in segments:
            if seg.end_s > self.config.max_duration_s + self._decode_config.segment_s:
                close = getattr(segments, "close", None)
                if close is not None:
                    close()
                raise MediaLimitError(f"the uploaded {modality} {filename!r} decodes past max_duration_s="
                                      f"{self.config.max_duration_s:g}")
            if seg.modality == modality:
                parts.append(seg.payload)
        if not parts:
            raise MediaQueryError(f"the uploaded {modality} {filename!r} has no {modality} stream")
        if modality == "audio":
            return np.concatenate(parts).astype(np.float32)
        if modality == "video":
            frames = np.concatenate(parts, axis=0)
            if len(frames) > self.config.max_video_frames:  # evenly spread over the clip
                frames = frames[np.linspace(0, len(frames) - 1, self.config.max_video_frames).round().astype(int)]
            return frames
        return parts[0]


def _refusal(err: DecodeError, modality: str, filename: str, path: str) -> MediaQueryError:
    reason = str(err).replace(path, filename).splitlines()[0] if str(err) else type(err).__name__
    cls = MediaLimitError if isinstance(err, LimitExceededError) else MediaQueryError
    return cls(f"cannot decode the uploaded {modality} {filename!r}: {reason[:_MAX_MESSAGE]}")


def _safe_suffix(filename: str) -> str:
    """The upload's extension when it is short and plain (decoders may use it as a hint)."""
    ext = os.path.splitext(os.path.basename(filename))[1]
    return ext if 1 < len(ext) <= 8 and ext[1:].isalnum() else ""
