"""Frame sampling modes on real H.264 files (GOP 50 at 25 fps: a key frame every 2 s).

The frames are textured (fixed noise, so the loop filter has work to do) over a grey
level that encodes the frame index, so a test can tell which frame a sampler used.
"""

from __future__ import annotations

import fractions
import logging
import os

import av
import numpy as np
import pytest

from xmodal_index.jobs.config import ConfigError, config_from_mapping
from xmodal_index.pipeline import decode_video
from xmodal_index.pipeline.decode import DecodeConfig, decode_item, probe, segment_bounds
from xmodal_index.pipeline.decode_video import StreamFrames, open_frames
from xmodal_index.pipeline.types import MediaItem

FPS = 25
GOP = 50
FRAMES = 200  # 8 s: key frames at 0, 2, 4 and 6 s
SIZE = 64
_BASE, _STEP = 40, 0.8  # grey level of frame i: 40 + 0.8 i (stays inside 40..200)


def level_of(index: int) -> float:
    return _BASE + _STEP * index


def index_of(frame: np.ndarray) -> float:
    return (float(np.asarray(frame, np.float64).mean()) - _BASE) / _STEP


def make_gop_video(path, *, frames: int = FRAMES, gop: int = GOP, audio: bool = True) -> str:
    rng = np.random.default_rng(0)
    texture = rng.integers(-24, 25, size=(SIZE, SIZE, 1)).astype(np.float64)
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=FPS, options={"g": str(gop), "keyint_min": str(gop),
                                                             "sc_threshold": "0", "crf": "12", "bf": "3"})
        video.width, video.height, video.pix_fmt = SIZE, SIZE, "yuv420p"
        sound = out.add_stream("aac", rate=16000, layout="mono") if audio else None
        for i in range(frames):
            image = np.clip(level_of(i) + texture, 0, 255).astype(np.uint8).repeat(3, axis=2)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, fractions.Fraction(1, FPS)
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        if sound is not None:
            samples = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000 * frames // FPS) / 16000)).astype(np.float32)
            chunk = sound.codec_context.frame_size or 1024
            for start in range(0, samples.size, chunk):
                frame = av.AudioFrame.from_ndarray(samples[None, start:start + chunk], format="flt", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = 16000, start, fractions.Fraction(1, 16000)
                out.mux(sound.encode(frame))
            out.mux(sound.encode(None))
    return str(path)


@pytest.fixture(scope="module")
def gop_video(tmp_path_factory):
    return make_gop_video(tmp_path_factory.mktemp("gop") / "gop50.mp4")


def item_for(path: str) -> MediaItem:
    return MediaItem(uri=path, kind="video", size=os.path.getsize(path), mtime=0.0, etag="e1")


def video_rows(path: str, **config):
    return [s for s in decode_item(item_for(path), DecodeConfig(**config)) if s.modality == "video"]


def test_frame_mode_is_read_from_the_decode_table():
    config = config_from_mapping({"decode": {"frame_mode": "keyframes"}})
    assert config.decode.frame_mode == "keyframes"
    with pytest.raises(ConfigError, match="frame_mode = 'iframes' must be one of"):
        config_from_mapping({"decode": {"frame_mode": "iframes"}})


def test_fast_is_refused_with_keyframes_naming_both():
    with pytest.raises(ValueError, match="fast = True applies to frame_mode = 'uniform' only"):
        DecodeConfig(frame_mode="keyframes", fast=True)


def test_keyframes_mode_decodes_only_the_key_frames(gop_video):
    config = DecodeConfig(frame_mode="keyframes", segment_s=1.0)
    info = probe(gop_video, gop_video, config)
    frames = open_frames(gop_video, gop_video, info, config)
    assert isinstance(frames, StreamFrames)
    try:
        for start, end in segment_bounds(info.duration_s, config.segment_s):
            frames.sample(start, end)
        frames.finish()
    finally:
        frames.close()
    assert frames.frames_decoded == FRAMES // GOP
    assert frames.end_s == pytest.approx(FRAMES / FPS, abs=0.05)


def test_keyframes_rows_show_the_key_frame_of_their_segment(gop_video):
    rows = video_rows(gop_video, frame_mode="keyframes", segment_s=2.0)
    assert [(r.start_s, r.end_s) for r in rows] == [(0.0, 2.0), (2.0, 4.0), (4.0, 6.0), (6.0, 8.0)]
    assert {r.sampling for r in rows} == {"keyframes"}
    shown = [index_of(r.payload[0]) for r in rows]
    assert shown == pytest.approx([0, 50, 100, 150], abs=3)
    assert all(r.payload.shape == (1, 112, 112, 3) and r.payload.dtype == np.uint8 for r in rows)


def test_segments_without_a_key_frame_take_the_nearest_and_say_so(gop_video):
    rows = video_rows(gop_video, frame_mode="keyframes", segment_s=1.0)
    assert [r.start_s for r in rows] == [float(s) for s in range(8)]
    # [1, 2) is nearer the key frame at 2 s than the one at 0 s; [3, 4) nearer 4 s than 2 s
    assert [r.sampling for r in rows] == ["keyframes", "keyframes-nearest"] * 4
    shown = [index_of(r.payload[0]) for r in rows]
    assert shown == pytest.approx([0, 50, 50, 100, 100, 150, 150, 150], abs=3)


def test_keyframes_rows_keep_the_segment_ids_of_uniform_rows(gop_video):
    uniform = [(r.modality, r.start_s, r.end_s) for r in decode_item(item_for(gop_video), DecodeConfig())]
    keyed = [(r.modality, r.start_s, r.end_s)
             for r in decode_item(item_for(gop_video), DecodeConfig(frame_mode="keyframes"))]
    assert keyed == uniform


def test_fast_mode_frames_stay_close_to_uniform_ones(gop_video):
    uniform = video_rows(gop_video, frame_rate_hz=2.0)
    fast = video_rows(gop_video, frame_rate_hz=2.0, fast=True)
    assert [(r.start_s, r.end_s) for r in fast] == [(r.start_s, r.end_s) for r in uniform]
    assert {r.sampling for r in uniform} == {"uniform"} and {r.sampling for r in fast} == {"fast"}
    for a, b in zip(uniform, fast):
        assert a.payload.shape == b.payload.shape
        for fa, fb in zip(a.payload, b.payload):
            assert abs(index_of(fa) - index_of(fb)) <= 3  # the same frame or one a few frames earlier
            assert np.abs(fa.astype(np.int16) - fb.astype(np.int16)).mean() < 8


def test_fast_mode_decodes_fewer_frames_than_the_file_holds(gop_video):
    config = DecodeConfig(fast=True)
    info = probe(gop_video, gop_video, config)
    frames = open_frames(gop_video, gop_video, info, config)
    try:
        for start, end in segment_bounds(info.duration_s, config.segment_s):
            frames.sample(start, end)
    finally:
        frames.close()
    assert 0 < frames.frames_decoded < FRAMES  # non-reference B-frames are skipped


def test_keyframes_mode_reads_a_whole_video_only_file_to_its_end(tmp_path):
    # the last key frame is at 6 s of 8: the track's end comes from the packets, not the key frames
    path = make_gop_video(tmp_path / "silent.mp4", audio=False)
    rows = video_rows(path, frame_mode="keyframes")
    assert [r.start_s for r in rows] == [0.0, 2.0, 4.0, 6.0]


def test_keyframes_frames_come_out_upright(tmp_path):
    from tests import bad_media as bm

    (case,) = bm.rotated_video(tmp_path, tmp_path)
    rows = video_rows(str(case.path), frame_mode="keyframes")
    frame = rows[0].payload[0].astype(float)
    half = frame.shape[0] // 2
    assert frame[half + 8:].mean() > 200 and frame[:half - 8].mean() < 50  # the white half is at the bottom


def test_cuda_decode_falls_back_to_the_cpu_with_one_warning(gop_video, caplog, monkeypatch):
    monkeypatch.setattr(decode_video, "_warned_devices", set())
    monkeypatch.setattr(decode_video, "_cuda_device_count", lambda: 0)
    with caplog.at_level(logging.WARNING, logger="xmodal_index.pipeline.decode_video"):
        first = video_rows(gop_video, device="cuda")
        video_rows(gop_video, device="cuda")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "decode device 'cuda' unavailable" in warnings[0] and "on the CPU" in warnings[0]
    expected = video_rows(gop_video)
    assert [index_of(r.payload[0]) for r in first] == pytest.approx([index_of(r.payload[0]) for r in expected], abs=1)


@pytest.mark.gpu
def test_cuda_decode_shows_the_frames_the_cpu_decode_shows(gop_video, caplog):
    with caplog.at_level(logging.WARNING, logger="xmodal_index.pipeline.decode_video"):
        gpu = video_rows(gop_video, device="cuda")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # NVDEC used, no fallback
    cpu = video_rows(gop_video)
    assert [index_of(r.payload[0]) for r in gpu] == pytest.approx([index_of(r.payload[0]) for r in cpu], abs=1)
