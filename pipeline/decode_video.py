"""Video frames per segment: the samplers behind ``DecodeConfig.frame_mode`` and ``fast``.

Every sampler answers ``sample(start_s, end_s) -> (frames, sampling)`` for segments
asked in time order: ``frames`` uint8 (T, frame_size, frame_size, 3), upright (the
stream's display rotation applied), ``sampling`` the value of the row's
``sampling`` column. ``end_s`` is the end of the last readable frame, known once
``finish()`` returned (truncation checks).

- ``DecordFrames`` (uniform, the default): decord indexes the file, decodes it
  front to back and converts only the sampled frames.
- ``StreamFrames`` (PyAV, one pass): ``keyframes`` sends only key-frame packets
  to the decoder (``skip_frame=nonkey`` besides); ``fast`` decodes every
  reference frame with the loop filter skipped; ``device = "cuda"`` decodes on
  NVDEC where FFmpeg has it, else on the CPU after one warning.
"""

from __future__ import annotations

import ctypes
import logging

import av
import decord
import numpy as np
from PIL import Image

from .audio import AV_OPEN_OPTIONS
from .decode_config import (
    SAMPLING_FAST,
    SAMPLING_KEYFRAMES,
    SAMPLING_KEYFRAMES_NEAREST,
    SAMPLING_UNIFORM,
    DecodeConfig,
    DecodeError,
    TruncatedMediaError,
    frame_times,
)
from .probe import MediaInfo, ffmpeg_reason

logger = logging.getLogger(__name__)

# A container whose video track has fewer readable frames than this share of the
# frames its index declares is treated as truncated.
_MIN_READABLE_FRAME_SHARE = 0.9
_DECORD_ERRORS = (decord.DECORDError, RuntimeError, IndexError, ValueError, OSError)
# FFmpeg options of the fast mode: no deblocking, non-bit-exact shortcuts, no
# decoding of frames no other frame refers to.
FAST_CODEC_OPTIONS = {"skip_loop_filter": "all", "flags2": "+fast"}
_warned_devices: set[str] = set()


def open_frames(path: str, uri: str, info: MediaInfo, config: DecodeConfig):
    """The sampler the config asks for."""
    hwaccel = _hwaccel(config.device)
    if config.frame_mode == "keyframes":
        return StreamFrames(path, uri, info, config, keyframes=True, hwaccel=hwaccel)
    if config.fast or hwaccel is not None:
        return StreamFrames(path, uri, info, config, keyframes=False, hwaccel=hwaccel)
    return DecordFrames(path, uri, info, config)


def _hwaccel(device: str):
    """PyAV's hardware decoder for ``device``, or None (CPU) with one warning per process."""
    if device == "cpu":
        return None
    reason = None
    if device not in av.codec.hwaccel.hwdevices_available():
        reason = "this FFmpeg build has no such hardware decoder"
    elif device == "cuda" and _cuda_device_count() == 0:
        reason = "no CUDA device (libcuda missing or no GPU visible)"
    if reason is None:
        return av.codec.hwaccel.HWAccel(device_type=device, allow_software_fallback=True)
    if device not in _warned_devices:
        _warned_devices.add(device)
        logger.warning("decode device %r unavailable (%s): decoding video on the CPU", device, reason)
    return None


def _cuda_device_count() -> int:
    """GPUs the CUDA driver sees (0 without a driver), asked without importing torch."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


class DecordFrames:
    """Frames of one video at given times, resized by decord (only sampled frames reach RGB).

    decord applies the display rotation of the stream. It cannot produce some output
    widths (96 among them: its copy check fails); for those the frames are decoded
    at their own size and resized with Pillow.
    """

    end_known = True  # end_s is known before the first segment (from decord's index)

    def __init__(self, path: str, uri: str, info: MediaInfo, config: DecodeConfig) -> None:
        self._path, self._uri, self._config = path, uri, config
        self._reader = self._open(config.frame_size)
        self._resize = False
        n = len(self._reader)
        if n == 0:
            raise DecodeError(f"{uri}: the video track has no readable frames")
        declared = info.video.frames if info.video else 0
        if declared and n < _MIN_READABLE_FRAME_SHARE * declared:
            raise TruncatedMediaError(f"{uri}: truncated file: {n} of {declared} indexed video frames are readable")
        try:
            times = self._reader.get_frame_timestamp(np.arange(n))
        except _DECORD_ERRORS as err:  # decord counted frames it then cannot find
            raise DecodeError(f"{uri}: the video track has no readable frames ({err})") from err
        if len(times) == 0:
            raise DecodeError(f"{uri}: the video track has no readable frames")
        self._starts = times[:, 0] - times[0, 0]
        self.end_s = float(max(times[-1, 1], times[-1, 0]) - times[0, 0])  # end of the last readable frame

    def _open(self, size: int) -> decord.VideoReader:
        try:
            return decord.VideoReader(self._path, width=size, height=size, num_threads=self._config.decoder_threads)
        except _DECORD_ERRORS as err:
            raise DecodeError(f"{self._uri}: cannot read the video track: {err}") from err

    def frames_at(self, times: list[float]) -> np.ndarray:
        idx = np.searchsorted(self._starts, np.asarray(times), side="right") - 1
        idx = np.clip(idx, 0, len(self._starts) - 1).tolist()
        try:
            batch = self._reader.get_batch(idx).asnumpy()
        except _DECORD_ERRORS as err:
            if self._resize or "must exactly match" not in str(err):
                raise DecodeError(f"{self._uri}: cannot decode video frames {idx}: {err}") from err
            logger.debug("%s: decord cannot resize to %d px; resizing with Pillow", self._uri, self._config.frame_size)
            self._reader, self._resize = self._open(-1), True
            return self.frames_at(times)
        if not self._resize:
            return batch
        size = (self._config.frame_size, self._config.frame_size)
        return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BILINEAR)) for f in batch])

    def sample(self, start_s: float, end_s: float) -> tuple[np.ndarray, str]:
        return self.frames_at(frame_times(start_s, end_s, self._config.frame_rate_hz)), SAMPLING_UNIFORM

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


class StreamFrames:
    """One forward pass over the video packets with PyAV (keyframes, fast or hardware decode).

    Times are relative to the stream's first presentation time, as decord's are.
    ``frames_decoded`` counts the frames the decoder returned.
    """

    end_known = False  # end_s is known once finish() returned
    MAX_BAD_PACKETS = 50

    def __init__(self, path: str, uri: str, info: MediaInfo, config: DecodeConfig, *, keyframes: bool,
                 hwaccel=None) -> None:
        if info.video is None:
            raise DecodeError(f"{uri}: no video stream")
        self._uri, self._config, self._keyframes = uri, config, keyframes
        try:
            self._container = av.open(path, container_options=AV_OPEN_OPTIONS, metadata_errors="replace",
                                      hwaccel=hwaccel)
        except (av.error.FFmpegError, OSError) as err:
            raise DecodeError(f"{uri}: cannot read the video track: {ffmpeg_reason(err)}") from err
        try:
            stream = self._container.streams[info.video.index]
            ctx = stream.codec_context
            ctx.thread_count = config.decoder_threads
            if config.decoder_threads != 1:
                ctx.thread_type = "AUTO"
            if keyframes:
                ctx.skip_frame = "NONKEY"
            elif config.fast:
                ctx.options = dict(FAST_CODEC_OPTIONS)
                ctx.skip_frame = "NONREF"
            self._packets = self._container.demux(stream)
        except (av.error.FFmpegError, IndexError, ValueError) as err:
            self._container.close()
            raise DecodeError(f"{uri}: cannot read the video track: {ffmpeg_reason(err)}") from err
        self._time_base = stream.time_base
        self._origin = float(stream.start_time * stream.time_base) if stream.start_time is not None else None
        self._pending: list[tuple[float, av.VideoFrame]] = []
        self._eof = False
        self._bad_packets = 0
        self._packets_end = 0.0  # end of the last packet read, absolute seconds
        self.frames_decoded = 0
        # keyframes: decoded key frames still in reach of the next segments (time, RGB)
        self._keys: list[tuple[float, np.ndarray]] = []
        # uniform: the last frame at or before the latest sample time, and the one after it
        self._prev: tuple[float, av.VideoFrame] | None = None
        self._prev_rgb: np.ndarray | None = None
        self._next: tuple[float, av.VideoFrame] | None = None

    # -- packets and frames

    def _read_packet(self):
        try:
            return next(self._packets)
        except StopIteration:
            self._eof = True
            return None
        except (av.error.FFmpegError, OSError) as err:
            raise DecodeError(f"{self._uri}: cannot read video packets: {ffmpeg_reason(err)}") from err

    def _next_frame(self) -> tuple[float, av.VideoFrame] | None:
        """The next decoded frame (time relative to the stream start), None at the end."""
        while not self._pending:
            if self._eof:
                return None
            packet = self._read_packet()
            if packet is None:
                return None
            if packet.pts is not None and packet.time_base is not None:
                end = float((packet.pts + (packet.duration or 0)) * packet.time_base)
                self._packets_end = max(self._packets_end, end)
            if self._keyframes and packet.size and not packet.is_keyframe:
                continue  # never reaches the decoder
            try:
                frames = packet.decode()
            except av.error.FFmpegError as err:  # a damaged packet: skip it, as players do
                self._bad_packets += 1
                if self._bad_packets > self.MAX_BAD_PACKETS:
                    raise DecodeError(f"{self._uri}: over {self.MAX_BAD_PACKETS} undecodable video packets: "
                                      f"{ffmpeg_reason(err)}") from err
                continue
            for frame in frames:
                self.frames_decoded += 1
                if frame.time is None:
                    continue
                if self._origin is None:
                    self._origin = float(frame.time)
                self._pending.append((float(frame.time) - self._origin, frame))
        return self._pending.pop(0)

    def _rgb(self, frame: av.VideoFrame) -> np.ndarray:
        size = self._config.frame_size
        try:
            rgb = frame.reformat(width=size, height=size, format="rgb24", interpolation="BILINEAR").to_ndarray()
        except (av.error.FFmpegError, ValueError) as err:
            raise DecodeError(f"{self._uri}: cannot convert a video frame: {ffmpeg_reason(err)}") from err
        turns = round((frame.rotation or 0) / 90) % 4
        return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb

    @property
    def end_s(self) -> float:
        """End of the video packets read so far (of the whole track after ``finish``)."""
        return max(0.0, self._packets_end - (self._origin or 0.0))

    def finish(self) -> None:
        """Read the packets left (demux only, nothing decoded) so that ``end_s`` is the track's end."""
        while not self._eof:
            packet = self._read_packet()
            if packet is not None and packet.pts is not None and packet.time_base is not None:
                self._packets_end = max(self._packets_end,
                                        float((packet.pts + (packet.duration or 0)) * packet.time_base))

    def close(self) -> None:
        self._container.close()

    # -- sampling

    def sample(self, start_s: float, end_s: float) -> tuple[np.ndarray, str]:
        times = frame_times(start_s, end_s, self._config.frame_rate_hz)
        if self._keyframes:
            return self._sample_keyframes(start_s, end_s, times)
        return self._sample_uniform(times), SAMPLING_FAST if self._config.fast else SAMPLING_UNIFORM

    def _sample_uniform(self, times: list[float]) -> np.ndarray:
        """For each time, the last decoded frame starting at or before it (the first frame before any)."""
        out = []
        for t in times:
            while True:
                if self._next is None:
                    self._next = self._next_frame()
                if self._next is None or self._next[0] > t:
                    break
                self._prev, self._prev_rgb, self._next = self._next, None, None
            if self._prev is None:
                if self._next is None:
                    raise DecodeError(f"{self._uri}: the video track has no readable frames")
                out.append(self._rgb(self._next[1]))
                continue
            if self._prev_rgb is None:
                self._prev_rgb = self._rgb(self._prev[1])
            out.append(self._prev_rgb)
        return np.stack(out)

    def _sample_keyframes(self, start_s: float, end_s: float, times: list[float]) -> tuple[np.ndarray, str]:
        """The key frames inside the segment nearest each sample time, or, when the segment
        holds none, the one key frame nearest the segment's middle."""
        while not self._keys or self._keys[-1][0] < end_s:
            nxt = self._next_frame()
            if nxt is None:
                break
            t, frame = nxt
            if frame.key_frame or frame.pict_type == av.video.frame.PictureType.I:
                self._keys.append((t, self._rgb(frame)))
        if not self._keys:
            raise DecodeError(f"{self._uri}: the video track has no readable key frames")
        inside = [k for k in self._keys if start_s <= k[0] < end_s]
        if inside:
            chosen: list[int] = []
            for t in times:
                best = min(range(len(inside)), key=lambda i: abs(inside[i][0] - t))
                if best not in chosen:
                    chosen.append(best)
            frames, sampling = np.stack([inside[i][1] for i in chosen]), SAMPLING_KEYFRAMES
        else:
            middle = (start_s + end_s) / 2
            nearest = min(self._keys, key=lambda k: (abs(k[0] - middle), k[0]))
            frames, sampling = nearest[1][None], SAMPLING_KEYFRAMES_NEAREST
        before = [i for i, k in enumerate(self._keys) if k[0] < end_s]
        if before:  # the next segments start at end_s: keep the last key frame before it and those after
            del self._keys[:before[-1]]
        return frames, sampling
