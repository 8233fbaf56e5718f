"""Audio tracks resampled to mono float32, handed out one time segment at a time.

The two backends (PyAV streaming decode, chunked ``torchaudio.load``) behind one
``AudioTrack`` interface. Inside the module failures raise ``AudioError``;
``open_audio`` and ``take_audio`` (what ``decode.py`` calls) turn them into
``DecodeError``s naming the item, for the dead-letter table.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import av
import numpy as np

from .decode_config import DecodeError

logger = logging.getLogger(__name__)

# Only plain files may be opened: never a URL or another file named inside the content.
AV_OPEN_OPTIONS = {"protocol_whitelist": "file"}


class AudioError(Exception):
    """An audio track cannot be opened, read or resampled; the message names the URI."""


class AudioTrack:
    """One audio track resampled to mono float32, handed out segment by segment.

    Subclasses fill ``_chunks`` in ``_pull``; only the samples of the segment being
    cut (plus one decoded packet) are held. Sample 0 is the container's first
    presentation time; a track that starts later is led by silence.
    """

    def __init__(self, uri: str, rate: int) -> None:
        self._uri = uri
        self._rate = rate
        self._chunks: list[np.ndarray] = []
        self._pos = 0  # absolute sample index of the first buffered sample
        self._end = 0  # absolute sample index after the last buffered sample
        self._started = False
        self._eof = False

    def _pull(self) -> None:
        raise NotImplementedError

    def _start_at(self, offset: int) -> None:
        self._pos = self._end = offset
        self._started = True

    def _push(self, samples: np.ndarray) -> None:
        if samples.size:
            self._chunks.append(samples)
            self._end += samples.size

    def take(self, start_s: float, end_s: float) -> np.ndarray:
        """Samples of [start_s, end_s); shorter (or empty) where the track ends first."""
        a, b = round(start_s * self._rate), round(end_s * self._rate)
        while (not self._started or self._end < b) and not self._eof:
            self._pull()
        buf = (self._chunks[0] if len(self._chunks) == 1
               else np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32))
        hi = min(b, self._end)
        out = np.zeros(0, np.float32)
        if hi > a:
            lead = max(0, min(self._pos, hi) - a)
            first = min(max(a - self._pos, 0), len(buf))
            last = max(hi - self._pos, first)
            out = np.concatenate([np.zeros(lead, np.float32), buf[first:last]]) if lead else buf[first:last].copy()
        cut = min(max(b - self._pos, 0), len(buf))
        self._chunks = [buf[cut:]] if cut < len(buf) else []
        self._pos += cut
        return np.clip(out, -1.0, 1.0, out=out)

    @property
    def end_s(self) -> float:
        """End of the samples decoded so far (of the whole track once it reached its end)."""
        return self._end / self._rate

    @property
    def finished(self) -> bool:
        """Whether the whole track has been decoded."""
        return self._eof

    def close(self) -> None:
        pass


class PyAVAudio(AudioTrack):
    """Streaming decode with PyAV, resampled by libswresample."""

    MAX_BAD_PACKETS = 50

    def __init__(self, path: str, uri: str, stream_index: int, origin_s: float, rate: int) -> None:
        super().__init__(uri, rate)
        self._origin_s = origin_s
        try:
            self._container = av.open(path, container_options=AV_OPEN_OPTIONS, metadata_errors="replace")
        except (av.error.FFmpegError, OSError) as err:
            raise AudioError(f"{uri}: cannot open audio stream {stream_index}: {err}") from err
        try:
            stream = self._container.streams[stream_index]
            self._packets = self._container.demux(stream)
        except (av.error.FFmpegError, IndexError) as err:
            self._container.close()
            raise AudioError(f"{uri}: cannot open audio stream {stream_index}: {err}") from err
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        self._input_shape: tuple | None = None  # (sample format, layout, rate) the resampler was set up for
        self._bad_packets = 0

    def _pull(self) -> None:
        try:
            packet = next(self._packets)
        except StopIteration:
            self._resample(None)
            self._eof = True
            return
        except (av.error.FFmpegError, OSError) as err:
            raise AudioError(f"{self._uri}: cannot read audio packets: {err}") from err
        try:
            frames = packet.decode()
        except av.error.FFmpegError as err:  # a damaged packet: skip it, as players do
            self._bad_packets += 1
            if self._bad_packets > self.MAX_BAD_PACKETS:
                raise AudioError(f"{self._uri}: over {self.MAX_BAD_PACKETS} undecodable audio packets: {err}") from err
            return
        for frame in frames:
            if not self._started:
                t = frame.time if frame.time is not None else self._origin_s
                self._start_at(max(0, round((t - self._origin_s) * self._rate)))
            self._resample(frame)

    def _resample(self, frame: av.AudioFrame | None) -> None:
        try:
            if frame is not None:
                shape = (frame.format.name, frame.layout.name, frame.sample_rate)
                if shape != self._input_shape:  # the stream changed its rate or channels mid-way
                    if self._input_shape is not None:
                        self._resample(None)
                    self._resampler = av.AudioResampler(format="flt", layout="mono", rate=self._rate)
                    self._input_shape = shape
            for out in self._resampler.resample(frame):
                self._push(out.to_ndarray().reshape(-1))
        except (av.error.FFmpegError, ValueError) as err:
            raise AudioError(f"{self._uri}: cannot resample audio: {err}") from err
        if not self._started and frame is None:
            self._start_at(0)

    def close(self) -> None:
        self._container.close()


class TorchaudioAudio(AudioTrack):
    """Chunked ``torchaudio.load`` + ``torchaudio.functional.resample`` (the default stream)."""

    CHUNK_S = 30.0

    def __init__(self, path: str, uri: str, rate: int) -> None:
        super().__init__(uri, rate)
        import torchaudio  # optional and heavy: imported where used

        self._ta = torchaudio
        self._path = path
        self._offset = 0  # source frames read so far
        self._source_rate = 0
        self._pull()

    def _pull(self) -> None:
        chunk = round(self.CHUNK_S * (self._source_rate or 48000))
        try:
            wave, source_rate = self._ta.load(self._path, frame_offset=self._offset, num_frames=chunk)
            got = wave.shape[-1]
            if got and source_rate != self._rate:
                wave = self._ta.functional.resample(wave, source_rate, self._rate)
        except (RuntimeError, OSError, ValueError) as err:
            raise AudioError(f"{self._uri}: torchaudio cannot read audio: {err}") from err
        self._source_rate = source_rate
        if not self._started:
            self._start_at(0)
        self._offset += got
        self._push(wave.mean(dim=0).float().numpy())
        self._eof = got < chunk


_torchaudio_ok: bool | None = None


def _torchaudio_importable() -> bool:
    global _torchaudio_ok
    if _torchaudio_ok is None:
        try:
            import torchaudio  # noqa: F401 - imported only to see that it imports
            _torchaudio_ok = True
        except (ImportError, OSError):
            _torchaudio_ok = False
    return _torchaudio_ok


@contextlib.contextmanager
def open_audio(path: str, uri: str, stream_index: int, origin_s: float, rate: int,
               backend: str) -> Iterator[AudioTrack]:
    """The audio track of a file with the configured backend (``auto`` falls back to PyAV)."""
    track: AudioTrack | None = None
    if backend == "torchaudio" or (backend == "auto" and _torchaudio_importable()):
        try:
            track = TorchaudioAudio(path, uri, rate)
        except AudioError as err:
            if backend == "torchaudio":
                raise DecodeError(str(err)) from err
            logger.info("%s: torchaudio cannot read it; decoding audio with PyAV", uri)
    if track is None:
        try:
            track = PyAVAudio(path, uri, stream_index, origin_s, rate)
        except AudioError as err:
            raise DecodeError(str(err)) from err
    try:
        yield track
    finally:
        track.close()


def take_audio(audio: AudioTrack, start: float, end: float) -> np.ndarray:
    try:
        return audio.take(start, end)
    except AudioError as err:
        raise DecodeError(str(err)) from err
