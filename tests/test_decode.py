"""decode_item on real files generated with PyAV / Pillow: segments, frames, audio, limits, bad input."""

from __future__ import annotations

import os
import sys
import types

import numpy as np
import pytest

from tests import media_factory as mf
from xmodal_index.pipeline import audio
from xmodal_index.pipeline.decode import (
    DecodeConfig,
    DecodeError,
    LimitExceededError,
    ProbeError,
    UnsupportedMediaError,
    decode_item,
    frame_times,
    segment_bounds,
)
from xmodal_index.pipeline.types import MediaItem


def item_for(path, kind: str, sidecars=()) -> MediaItem:
    path = str(path)
    return MediaItem(uri=path, kind=kind, size=os.path.getsize(path), mtime=0.0, etag="etag-1",
                     sidecars=tuple(str(s) for s in sidecars))


def decode_all(path, kind: str, config: DecodeConfig | None = None, sidecars=()):
    return list(decode_item(item_for(path, kind, sidecars), config or DecodeConfig()))


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)])


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """One set of generated files shared by the read-only tests of this module."""
    root = tmp_path_factory.mktemp("media")
    files = {
        "mp4": mf.make_video(root / "clip.mp4"),
        "webm": mf.make_video(root / "silent.webm", audio=False),
        "wav": mf.make_wav(root / "tone.wav", duration_s=0.5, sample_rate=8000),
        "png": mf.make_png(root / "still.png", width=48, height=32, color=(200, 30, 60)),
        "vtt": mf.make_vtt(root / "clip.vtt", mf.BOUNDARY_CUES),
    }
    return files


# ---------------------------------------------------------------- config and segmenting


@pytest.mark.parametrize("field, value", [("segment_s", 0), ("frame_rate_hz", -1.0), ("max_pixels", 0),
                                          ("timeout_s", float("nan")), ("workers", 0)])
def test_config_rejects_non_positive_values_naming_them(field, value):
    with pytest.raises(ValueError, match=field):
        DecodeConfig(**{field: value})


def test_config_rejects_unknown_audio_backend():
    with pytest.raises(ValueError, match="audio_backend = 'sox'"):
        DecodeConfig(audio_backend="sox")


def test_config_rejects_memory_too_small_for_a_worker():
    with pytest.raises(ValueError, match="memory_mb = 64"):
        DecodeConfig(memory_mb=64)


def test_segment_bounds_end_with_a_shorter_final_segment():
    assert segment_bounds(5.0, 2.0) == [(0.0, 2.0), (2.0, 4.0), (4.0, 5.0)]


def test_segment_bounds_drop_a_final_sliver_under_a_tenth_of_a_second():
    assert segment_bounds(4.05, 2.0) == [(0.0, 2.0), (2.0, 4.0)]


def test_segment_bounds_keep_a_sliver_when_it_is_the_only_segment():
    assert segment_bounds(0.05, 2.0) == [(0.0, 0.05)]


def test_frame_times_are_evenly_spaced_inside_the_segment_at_least_one():
    assert frame_times(2.0, 4.0, 1.0) == [2.5, 3.5]
    assert frame_times(4.0, 4.5, 1.0) == [4.25]


# ---------------------------------------------------------------- video


def test_video_with_audio_yields_video_then_audio_per_segment_in_time_order(media):
    segments = decode_all(media["mp4"], "video")
    assert [(s.modality, s.start_s, s.end_s) for s in segments] == [
        ("video", 0.0, 2.0), ("audio", 0.0, 2.0), ("video", 2.0, 4.0), ("audio", 2.0, 4.0)]
    assert {(s.uri, s.etag) for s in segments} == {(str(media["mp4"]), "etag-1")}


def test_video_segments_hold_one_resized_rgb_frame_per_second(media):
    video = [s for s in decode_all(media["mp4"], "video", DecodeConfig(frame_size=96)) if s.modality == "video"]
    assert [s.payload.shape for s in video] == [(2, 96, 96, 3)] * 2  # 96: a width decord cannot resize to
    assert all(s.payload.dtype == np.uint8 for s in video)
    assert [mf.frame_index_of(f) for f in video[1].payload] == [20, 28]


def test_video_frames_are_sampled_at_evenly_spaced_times(media):
    # 8 fps clip, 2 frames/s: samples at 0.25, 0.75, ... s are frames 2, 6, 10, ...
    config = DecodeConfig(frame_rate_hz=2.0)
    video = [s for s in decode_all(media["mp4"], "video", config) if s.modality == "video"]
    sampled = [[mf.frame_index_of(frame) for frame in s.payload] for s in video]
    assert sampled == [[2, 6, 10, 14], [18, 22, 26, 30]]


def test_video_audio_is_16khz_mono_float32_of_segment_length(media):
    audio = [s for s in decode_all(media["mp4"], "video") if s.modality == "audio"]
    for segment in audio:
        assert segment.payload.dtype == np.float32 and segment.payload.ndim == 1
        assert abs(len(segment.payload) - 32000) <= 160  # 2 s at 16 kHz, within AAC priming
        assert np.abs(segment.payload).max() <= 1.0
        assert dominant_hz(segment.payload, 16000) == pytest.approx(mf.TONE_HZ, abs=2)


def test_video_only_webm_yields_only_video_segments(media):
    segments = decode_all(media["webm"], "video")
    assert [(s.modality, s.start_s) for s in segments] == [("video", 0.0), ("video", 2.0)]
    assert [mf.frame_index_of(f) for f in segments[1].payload] == [20, 28]


def test_video_file_without_a_video_stream_decodes_as_audio(tmp_path):
    path = mf.make_video(tmp_path / "voice.mp4", video=False, duration_s=3.0)
    segments = decode_all(path, "video")
    assert [(s.modality, s.start_s, s.end_s) for s in segments] == [("audio", 0.0, 2.0), ("audio", 2.0, 3.0)]


def test_caption_sidecar_text_attaches_to_every_segment_a_cue_overlaps(media):
    segments = decode_all(media["mp4"], "video", sidecars=[media["vtt"]])
    text = [(s.start_s, s.end_s, s.text) for s in segments if s.modality == "text"]
    assert text == [(0.0, 2.0, "hello there across the boundary"), (2.0, 4.0, "across the boundary the end")]
    assert all(s.payload == s.text for s in segments if s.modality == "text")


def test_caption_sidecar_over_max_caption_bytes_fails_the_item(media):
    with pytest.raises(LimitExceededError, match="max_caption_bytes"):
        decode_all(media["mp4"], "video", DecodeConfig(max_caption_bytes=20), sidecars=[media["vtt"]])


# ---------------------------------------------------------------- audio


def test_half_second_wav_gives_one_segment_resampled_to_16khz(media):
    (segment,) = decode_all(media["wav"], "audio")
    assert (segment.modality, segment.start_s, segment.end_s) == ("audio", 0.0, 0.5)
    assert segment.payload.dtype == np.float32 and segment.payload.shape == (8000,)
    assert dominant_hz(segment.payload, 16000) == pytest.approx(mf.TONE_HZ, abs=3)


def test_mp3_decodes_to_segments(tmp_path):
    path = mf.make_mp3(tmp_path / "tone.mp3", duration_s=1.0)
    (segment,) = decode_all(path, "audio")
    assert (segment.start_s, segment.end_s) == (0.0, 1.0)
    assert abs(len(segment.payload) - 16000) <= 400
    assert dominant_hz(segment.payload, 16000) == pytest.approx(mf.TONE_HZ, abs=3)


def test_audio_whose_sample_rate_changes_midway_decodes_at_16khz_throughout(tmp_path):
    first = mf.make_mp3(tmp_path / "a.mp3", duration_s=1.0, sample_rate=22050).read_bytes()
    second = mf.make_mp3(tmp_path / "b.mp3", duration_s=1.0, sample_rate=44100).read_bytes()
    path = tmp_path / "joined.mp3"
    path.write_bytes(first + second)
    segments = decode_all(path, "audio", DecodeConfig(segment_s=1.0))
    assert [s.start_s for s in segments] == [0.0, 1.0]
    assert len(segments[0].payload) == 16000
    assert dominant_hz(segments[1].payload, 16000) == pytest.approx(mf.TONE_HZ, abs=3)


def test_wav_named_mp3_decodes_by_content(tmp_path):
    path = tmp_path / "mislabelled.mp3"
    path.write_bytes(mf.make_wav(tmp_path / "real.wav", duration_s=0.5).read_bytes())
    (segment,) = decode_all(path, "audio")
    assert segment.payload.shape == (8000,)


def test_audio_backend_torchaudio_reads_in_chunks(media, monkeypatch):
    """The torchaudio backend's chunking and resampling glue, over a stand-in module
    (torchaudio does not install beside this torch build)."""
    torch = pytest.importorskip("torch")
    import av

    with av.open(str(media["wav"])) as container:  # 8 kHz mono int16
        source = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)]) / 32768.0
    calls = []

    def load(path, frame_offset=0, num_frames=-1):
        calls.append((frame_offset, num_frames))
        chunk = source[frame_offset:frame_offset + num_frames].astype(np.float32)
        return torch.from_numpy(np.stack([chunk, chunk])), 8000

    def resample(wave, orig_freq, new_freq):
        n = wave.shape[-1] * new_freq // orig_freq
        x = np.arange(n) * orig_freq / new_freq
        return torch.from_numpy(np.stack([np.interp(x, np.arange(wave.shape[-1]), w.numpy()) for w in wave]))

    fake = types.ModuleType("torchaudio")
    fake.load = load
    fake.functional = types.SimpleNamespace(resample=resample)
    monkeypatch.setitem(sys.modules, "torchaudio", fake)
    monkeypatch.setattr(audio, "_torchaudio_ok", True)
    monkeypatch.setattr(audio.TorchaudioAudio, "CHUNK_S", 0.05)
    (segment,) = decode_all(media["wav"], "audio", DecodeConfig(audio_backend="auto"))
    assert len(calls) > 2  # read in chunks, not at once
    assert segment.payload.dtype == np.float32 and segment.payload.shape == (8000,)
    assert dominant_hz(segment.payload, 16000) == pytest.approx(mf.TONE_HZ, abs=3)


# ---------------------------------------------------------------- images


def test_png_gives_one_rgb_image_segment_at_time_zero(media):
    (segment,) = decode_all(media["png"], "image")
    assert (segment.modality, segment.start_s, segment.end_s) == ("image", 0.0, 0.0)
    assert segment.payload.shape == (32, 48, 3) and segment.payload.dtype == np.uint8
    assert tuple(segment.payload[0, 0]) == (200, 30, 60)


def test_large_image_is_downscaled_to_the_long_side_limit(tmp_path):
    path = mf.make_png(tmp_path / "wide.png", width=2048, height=1024)
    (segment,) = decode_all(path, "image")
    assert segment.payload.shape == (512, 1024, 3)


def test_png_declaring_too_many_pixels_is_refused_before_decoding(tmp_path):
    # The pixel data is that of a 1x1 image: decoding it would fail with another error.
    path = mf.make_png_declaring(tmp_path / "bomb.png", 3000, 3000)
    with pytest.raises(LimitExceededError, match="3000x3000.*max_pixels=1000000"):
        decode_all(path, "image", DecodeConfig(max_pixels=1_000_000))


def test_png_declaring_a_decompression_bomb_is_refused(tmp_path):
    path = mf.make_png_declaring(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(LimitExceededError, match="bomb.png"):
        decode_all(path, "image")


# ---------------------------------------------------------------- text


def test_txt_gives_one_text_row_truncated_to_max_text_chars(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("word " * 100, encoding="utf-8")
    (segment,) = decode_all(path, "text", DecodeConfig(max_text_chars=12))
    assert (segment.modality, segment.start_s, segment.end_s, segment.text) == ("text", 0.0, 0.0, "word word wo")


def test_txt_that_is_not_utf8_decodes_with_replacement_characters(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café".encode("latin-1"))
    (segment,) = decode_all(path, "text")
    assert segment.text == "caf\ufffd"


def test_standalone_vtt_groups_cues_into_the_segments_they_overlap(media):
    segments = decode_all(media["vtt"], "text")
    assert [(s.start_s, s.end_s, s.text) for s in segments] == [
        (0.0, 2.0, "hello there across the boundary"), (2.0, 3.8, "across the boundary the end")]


# ---------------------------------------------------------------- limits and bad input


def test_file_over_max_file_bytes_is_refused(media):
    with pytest.raises(LimitExceededError, match="max_file_bytes=1000"):
        decode_all(media["mp4"], "video", DecodeConfig(max_file_bytes=1000))


def test_listed_size_over_the_limit_is_refused_before_fetching(tmp_path):
    item = MediaItem(uri=str(tmp_path / "absent.mp4"), kind="video", size=10**12, mtime=0.0, etag="e")
    with pytest.raises(LimitExceededError, match="absent.mp4"):
        list(decode_item(item, DecodeConfig()))


@pytest.mark.parametrize("config, reason", [
    (DecodeConfig(max_pixels=1000), "64x64, over max_pixels=1000"),
    (DecodeConfig(max_duration_s=1.0), "over max_duration_s=1.0"),
    (DecodeConfig(max_streams=1), "2 streams, over max_streams=1"),
])
def test_video_beyond_a_probe_limit_is_refused_with_the_reason(media, config, reason):
    with pytest.raises(LimitExceededError, match=reason) as info:
        decode_all(media["mp4"], "video", config)
    assert info.value.stage == "probe"


def test_zero_byte_file_is_a_probe_error(tmp_path):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(ProbeError, match="empty.mp4: empty file"):
        decode_all(path, "video")


def test_random_bytes_named_mp4_are_a_probe_error(tmp_path):
    path = tmp_path / "noise.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    with pytest.raises(ProbeError, match="noise.mp4: not a readable media container"):
        decode_all(path, "video")


def test_mp4_truncated_before_its_index_is_a_probe_error(tmp_path, media):
    data = media["mp4"].read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ProbeError, match="cut.mp4"):
        decode_all(path, "video")


def test_mp4_truncated_after_its_index_is_a_decode_error(tmp_path):
    data = mf.make_video(tmp_path / "whole.mp4", faststart=True).read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DecodeError, match="cut.mp4: truncated file") as info:
        decode_all(path, "video")
    assert info.value.stage == "decode"


def test_garbage_named_png_is_a_probe_error(tmp_path):
    path = tmp_path / "fake.png"
    path.write_bytes(b"not an image at all")
    with pytest.raises(ProbeError, match="fake.png: not a readable image"):
        decode_all(path, "image")


def test_missing_object_is_a_probe_error(tmp_path):
    item = MediaItem(uri=str(tmp_path / "gone.wav"), kind="audio", size=10, mtime=0.0, etag="e")
    with pytest.raises(ProbeError, match="gone.wav: cannot fetch"):
        list(decode_item(item, DecodeConfig()))


def test_unknown_kind_is_unsupported(media):
    item = MediaItem(uri=str(media["wav"]), kind="hologram", size=10, mtime=0.0, etag="e")
    with pytest.raises(UnsupportedMediaError, match="hologram"):
        list(decode_item(item, DecodeConfig()))


def test_audio_file_truncated_after_its_index_is_a_decode_error(tmp_path):
    data = mf.make_video(tmp_path / "whole.m4a", video=False, duration_s=4.0, faststart=True,
                         container_format="mp4").read_bytes()
    path = tmp_path / "cut.m4a"
    path.write_bytes(data[: len(data) // 2])  # the index still declares 4 s
    with pytest.raises(DecodeError, match=r"cut.m4a: truncated file: the audio ends at 1\.\d+ s of the 4\.00 s"):
        decode_all(path, "audio")
