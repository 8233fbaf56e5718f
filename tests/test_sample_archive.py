"""The bundled sample archive: committed subset, deterministic generator, make-sample command."""

from __future__ import annotations

import hashlib
import json
import re
import wave
from pathlib import Path

import av
import decord
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from xmodal_index.jobs.sample_cmd import make_sample
from xmodal_index.pipeline.sample_archive import (
    DIGIT_WORDS,
    SPEAKERS,
    ArchiveExistsError,
    SampleArchiveConfig,
    build_sample_archive,
    load_sample_subset,
    resample,
    webm_available,
)

SMALL = dict(videos=3, segments_per_video=3)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample") / "archive"
    manifest = build_sample_archive(str(root))
    truth = [json.loads(line) for line in (root / "ground_truth.jsonl").read_text().splitlines()]
    return root, manifest, truth


@pytest.fixture(scope="module")
def subset():
    return load_sample_subset()


def _videos(root: Path) -> list[Path]:
    return sorted(p for p in (root / "videos").iterdir() if p.suffix in (".mp4", ".webm"))


def _lines(truth, path: str, modality: str) -> list[dict]:
    return sorted((t for t in truth if t["path"] == path and t["modality"] == modality), key=lambda t: t["start_s"])


def _decode_audio(path: Path) -> tuple[np.ndarray, int]:
    """Mono float samples of the first audio stream and their rate."""
    chunks, rate = [], None
    with av.open(str(path)) as container:
        assert container.streams.audio[0].codec_context.channels == 1
        for frame in container.decode(audio=0):
            chunks.append(frame.to_ndarray().astype(np.float32).reshape(-1))
            rate = frame.sample_rate
    return np.concatenate(chunks), rate


def _parse_cues(text: str) -> list[tuple[float, float, str]]:
    stamp = r"(\d+):(\d\d):(\d\d)[.,](\d{3})"
    cues = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = block.strip().splitlines()
        for i, line in enumerate(lines):
            m = re.match(stamp + r"\s*-->\s*" + stamp, line)
            if m:
                g = [int(x) for x in m.groups()]
                start = g[0] * 3600 + g[1] * 60 + g[2] + g[3] / 1000
                end = g[4] * 3600 + g[5] * 60 + g[6] + g[7] / 1000
                cues.append((start, end, " ".join(lines[i + 1:])))
    return cues


def _nearest_image(subset, image: np.ndarray) -> int:
    """Index of the subset image closest to an (N*8, N*8) gray picture averaged down to 8x8."""
    n = image.shape[0] // 8
    small = image.astype(np.float64).reshape(8, n, 8, n).mean(axis=(1, 3)) * 16 / 255
    return int(np.argmin(np.abs(subset.images.astype(np.float64) - small).sum(axis=(1, 2))))


# --- the committed subset -------------------------------------------------------------------


def test_committed_subset_has_two_recordings_per_speaker_and_digit(subset):
    keys = sorted((r.digit, r.speaker, r.index) for r in subset.recordings)
    assert keys == [(d, s, i) for d in range(10) for s in SPEAKERS for i in (0, 1)]


def test_committed_subset_has_ten_images_per_digit(subset):
    assert subset.images.shape == (100, 8, 8)
    assert np.bincount(subset.labels, minlength=10).tolist() == [10] * 10
    assert subset.images.max() <= 16


def test_committed_subset_carries_its_license_notice(subset):
    text = subset.license_text.decode()
    assert "CC BY-SA 4.0" in text and "https://github.com/Jakobovski/free-spoken-digit-dataset" in text
    assert "Zohar Jackson" in text and "Alpaydin" in text


# --- the generator ------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files(tmp_path):
    first = build_sample_archive(str(tmp_path / "a"), seed=3, **SMALL)
    second = build_sample_archive(str(tmp_path / "b"), seed=3, **SMALL)
    on_disk = {p.relative_to(tmp_path / "b").as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in (tmp_path / "b").rglob("*") if p.is_file()}
    assert first.sha256 == second.sha256 == on_disk


def test_other_seed_gives_other_ground_truth(tmp_path):
    first = build_sample_archive(str(tmp_path / "a"), seed=1, **SMALL)
    second = build_sample_archive(str(tmp_path / "b"), seed=2, **SMALL)
    assert first.sha256["ground_truth.jsonl"] != second.sha256["ground_truth.jsonl"]


def test_archive_holds_every_kind_and_stays_small(archive):
    root, manifest, _ = archive
    assert manifest.counts == {"video": 6, "caption": 5, "audio": 10, "image": 10, "text": 5, "other": 2}
    assert (root / "ground_truth.jsonl").is_file() and (root / "LICENSE.md").is_file()
    assert manifest.total_bytes < 5 * 1024 * 1024


def test_license_notice_is_copied_beside_the_media(archive, subset):
    root, _, _ = archive
    assert (root / "LICENSE.md").read_bytes() == subset.license_text


@pytest.mark.skipif(not webm_available(), reason="this PyAV build cannot encode VP9/Opus")
def test_last_video_is_webm_with_srt_and_one_mp4_has_no_captions(archive):
    root, _, _ = archive
    names = sorted(p.name for p in (root / "videos").iterdir())
    assert names[-2:] == ["clip_05.srt", "clip_05.webm"]
    assert "clip_04.mp4" in names and not any(n.startswith("clip_04.") and n != "clip_04.mp4" for n in names)


def test_videos_decode_with_decord_to_slots_times_fps_frames(archive):
    root, _, _ = archive
    for path in _videos(root):
        reader = decord.VideoReader(str(path))
        assert reader.get_avg_fps() == pytest.approx(10.0)
        assert len(reader) == 8 * 10, path.name
        assert reader.get_batch([0, 40, 79]).asnumpy().shape == (3, 112, 112, 3)


def test_audio_tracks_decode_with_pyav_to_slot_duration(archive):
    root, _, _ = archive
    for path in _videos(root):
        samples, rate = _decode_audio(path)
        assert len(samples) / rate == pytest.approx(8 * 1.0, abs=0.1), path.name


def test_mid_slot_frames_show_the_ground_truth_digit(archive, subset):
    root, _, truth = archive
    for path in _videos(root):
        lines = _lines(truth, f"videos/{path.name}", "video")
        reader = decord.VideoReader(str(path))
        mids = [round((t["start_s"] + t["end_s"]) / 2 * reader.get_avg_fps()) for t in lines]
        frames = reader.get_batch(mids).asnumpy()
        shown = [_nearest_image(subset, frame[:, :, 0]) for frame in frames]
        assert [int(subset.labels[i]) for i in shown] == [t["digit"] for t in lines], path.name
        assert [int(subset.image_rows[i]) for i in shown] == [t["image_row"] for t in lines], path.name


def test_captions_parse_and_match_ground_truth_words(archive):
    root, _, truth = archive
    sidecars = sorted(p for p in (root / "videos").iterdir() if p.suffix in (".vtt", ".srt"))
    assert sidecars
    for sidecar in sidecars:
        video = next(p for p in _videos(root) if p.stem == sidecar.stem)
        lines = _lines(truth, f"videos/{video.name}", "text")
        cues = _parse_cues(sidecar.read_text())
        assert [(s, e, w) for s, e, w in cues] == [(t["start_s"], t["end_s"], t["word"]) for t in lines]
        assert all(t["sidecar"] == f"videos/{sidecar.name}" for t in lines)


def test_speech_energy_lies_where_ground_truth_says(archive):
    root, _, truth = archive
    for path in _videos(root):
        samples, rate = _decode_audio(path)
        energy = samples.astype(np.float64) ** 2
        for t in _lines(truth, f"videos/{path.name}", "audio"):
            slot = energy[round(t["start_s"] * rate):round(t["end_s"] * rate)]
            lo = round((t["speech_start_s"] - 0.03) * rate)
            hi = round((t["speech_end_s"] + 0.03) * rate)
            inside = energy[lo:hi].sum()
            assert slot.sum() > 0, (path.name, t["slot"])
            assert inside / slot.sum() > 0.99, (path.name, t["slot"])
            assert t["start_s"] <= t["speech_start_s"] < t["speech_end_s"] <= t["end_s"]


def test_each_video_slot_has_frame_audio_and_caption_lines(archive):
    root, _, truth = archive
    for path in _videos(root):
        rel = f"videos/{path.name}"
        captioned = any(p.stem == path.stem and p.suffix in (".vtt", ".srt") for p in path.parent.iterdir())
        for modality in ("video", "audio", "text"):
            lines = _lines(truth, rel, modality)
            expected = 8 if modality != "text" or captioned else 0
            assert len(lines) == expected, (rel, modality)
            assert [t["start_s"] for t in lines] == [float(s) for s in range(expected)]
        for t in _lines(truth, rel, "audio"):
            assert t["speaker"] in SPEAKERS and t["recording"].startswith(f"{t['digit']}_{t['speaker']}_")


def test_standalone_wavs_are_unchanged_fsdd_recordings(archive, subset):
    root, _, truth = archive
    by_name = {r.name: r for r in subset.recordings}
    lines = [t for t in truth if t["path"].startswith("audio/")]
    assert len(lines) == 10
    for t in lines:
        data = (root / t["path"]).read_bytes()
        assert data == by_name[t["recording"]].wav_bytes
        with wave.open(str(root / t["path"])) as w:
            assert w.getnframes() / w.getframerate() == pytest.approx(t["end_s"], abs=1e-3)
        assert t["digit"] == int(t["recording"].split("_")[0])


def test_standalone_images_show_the_ground_truth_digit(archive, subset):
    root, _, truth = archive
    lines = [t for t in truth if t["modality"] == "image"]
    assert sorted(t["digit"] for t in lines) == list(range(10))
    for t in lines:
        gray = np.asarray(Image.open(root / t["path"]).convert("L"))
        assert int(subset.image_rows[_nearest_image(subset, gray)]) == t["image_row"]
        assert int(subset.labels[_nearest_image(subset, gray)]) == t["digit"]


def test_texts_name_the_ground_truth_digit(archive):
    root, _, truth = archive
    lines = [t for t in truth if t["path"].startswith("text/")]
    assert len(lines) == 5
    for t in lines:
        words = re.findall(r"[a-z]+", (root / t["path"]).read_text())
        assert [w for w in words if w in DIGIT_WORDS] == [t["word"]] and DIGIT_WORDS[t["digit"]] == t["word"]


def test_build_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ArchiveExistsError, match=re.escape(str(tmp_path))):
        build_sample_archive(str(tmp_path), **SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_config_rejects_a_slot_that_is_not_whole_frames():
    with pytest.raises(ValueError, match=r"slot_s = 0\.25"):
        SampleArchiveConfig(slot_s=0.25)


def test_resample_keeps_duration_and_pitch():
    t = np.arange(8000) / 8000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    out = resample(tone, 8000, 16000)
    assert len(out) == 16000
    spectrum = np.abs(np.fft.rfft(out))
    assert np.argmax(spectrum) * 16000 / len(out) == pytest.approx(440, abs=2)


# --- the make-sample command --------------------------------------------------------------


def test_cli_refuses_a_non_empty_out_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(make_sample, ["--out", str(tmp_path), "--videos", "1"])
    assert result.exit_code != 0
    assert str(tmp_path) in result.output and "--force" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_cli_force_replaces_the_archive_and_keeps_other_files(tmp_path):
    runner = CliRunner()
    args = ["--out", str(tmp_path), "--segments-per-video", "2"]
    assert runner.invoke(make_sample, [*args, "--videos", "3"]).exit_code == 0
    (tmp_path / "notes.txt").write_text("keep me")
    result = runner.invoke(make_sample, [*args, "--videos", "1", "--force"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == ["clip_00.mp4", "clip_00.vtt"]
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_cli_prints_a_summary_naming_the_ground_truth(tmp_path):
    out = tmp_path / "archive"
    result = CliRunner().invoke(make_sample, ["--out", str(out), "--videos", "2", "--segments-per-video", "2",
                                              "--slot-s", "0.5", "--seed", "7"])
    assert result.exit_code == 0, result.output
    assert str(out / "ground_truth.jsonl") in result.output
    assert re.search(r"videos\s+2 files", result.output) and re.search(r"total\s+\d+ files", result.output)
    truth = [json.loads(line) for line in (out / "ground_truth.jsonl").read_text().splitlines()]
    assert max(t["end_s"] for t in truth if t["path"].startswith("videos/")) == 1.0


def test_cli_help_names_every_default_and_unit():
    result = CliRunner().invoke(make_sample, ["--help"])
    assert result.exit_code == 0
    for text in ("default: 0", "default: 6", "default: 8", "default: 1.0", "seconds", "count", "Default: off"):
        assert text in result.output


def test_cli_rejects_a_slot_that_is_not_whole_frames(tmp_path):
    result = CliRunner().invoke(make_sample, ["--out", str(tmp_path / "a"), "--slot-s", "0.25"])
    assert result.exit_code == 2
    assert "slot_s = 0.25" in result.output
