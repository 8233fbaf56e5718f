"""Each kind of bad input, listed and decoded in a killable worker, ends as documented;
an item that fails midway leaves no segments behind.

The corpus and its expected outcomes live in tests/bad_media.py (docs/BAD_MEDIA.md
is the prose version). Decoding runs in an IsolatedDecoder with short timeouts, so
an input that made a decoder hang or crash would fail its test, not the session.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from tests import bad_media as bm
from tests import media_factory as mf
from xmodal_index.pipeline import captions
from xmodal_index.pipeline.decode import DecodeConfig, DecodeError, ProbeError, decode_item, segment_bounds
from xmodal_index.pipeline.decode_segments import PARTIAL_OUTPUT_MARK, DecodeSegments
from xmodal_index.pipeline.isolation import IsolatedDecoder
from xmodal_index.pipeline.listing import RefusedLink, list_items, refused_links
from xmodal_index.pipeline.types import MediaItem, Segment

CONFIG = DecodeConfig(**bm.CORPUS_DECODE)


@pytest.fixture(scope="module")
def decoder():
    with IsolatedDecoder(CONFIG) as dec:
        yield dec


def outcome_of(decoder: IsolatedDecoder, item: MediaItem) -> tuple[str, object]:
    try:
        segments = list(decoder.decode(item))
    except DecodeError as err:
        return bm.DEAD, err
    return bm.INDEXED, segments


def check(case: bm.Case, items: dict[str, MediaItem], decoder: IsolatedDecoder,
          refused: dict[str, RefusedLink]) -> list[Segment]:
    item = items.get(str(case.path))
    if case.outcome == bm.NOT_LISTED:
        assert item is None and str(case.path) not in refused, f"{case.name}: listed, but must not be"
        return []
    if case.outcome == bm.DEAD and case.stage == "list":
        link = refused.get(str(case.path))
        assert item is None and link is not None, f"{case.name}: not refused by the listing"
        assert link.error_type == case.error and re.search(case.reason, link.reason), f"{case.name}: {link}"
        return []
    assert item is not None, f"{case.name}: not listed"
    outcome, result = outcome_of(decoder, item)
    if case.outcome == bm.DEAD:
        assert outcome == bm.DEAD, f"{case.name}: decoded to {len(result)} segments, expected {case.error}"
        assert (result.stage, type(result).__name__) == (case.stage, case.error), f"{case.name}: {result!r}"
        assert re.search(case.reason, str(result)), f"{case.name}: {result}"
        assert str(result).startswith(str(case.path)), f"{case.name}: the message must start with the uri"
        return []
    assert outcome == bm.INDEXED, f"{case.name}: {type(result).__name__}: {result}"
    assert {s.modality for s in result} == case.modalities, case.name
    assert all(s.uri == str(case.path) and s.etag == item.etag for s in result)
    return result


@pytest.mark.parametrize("make", bm.GENERATORS, ids=lambda f: f.__name__)
def test_each_bad_input_ends_as_documented(make, tmp_path, decoder):
    src, outside = tmp_path / "src", tmp_path / "outside"
    src.mkdir()
    outside.mkdir()
    cases = make(src, outside)
    items = {i.uri: i for i in list_items(str(src))}
    refused = {link.info.uri: link for link in refused_links(str(src))}
    for case in cases:
        check(case, items, decoder, refused)
    assert decoder.restarts == 0  # no input crashed or hung a worker


def test_corpus_names_every_kind_the_issue_lists(tmp_path):
    cases = bm.build_corpus(tmp_path / "src", tmp_path / "outside")
    names = " | ".join(c.name for c in cases)
    for kind in ("zero-byte", "mp4 cut", "webm cut", "mp3 cut", "random bytes", "text file named .mp4",
                 "named .mp4", "video without audio", "audio without video", "no streams", "2x2", "variable frame",
                 "rotated", "10 h declared", "20 streams", "non-UTF-8", "255-byte", "declaring 100000x100000",
                 "malformed", "over max_caption_bytes", "link"):
        assert kind in names, kind
    assert {c.outcome for c in cases} == {bm.INDEXED, bm.DEAD, bm.NOT_LISTED}


def test_variable_frame_rate_samples_the_frame_shown_at_each_time(tmp_path):
    (case,) = bm.variable_frame_rate(tmp_path, tmp_path)
    item = list_items(str(tmp_path))[0]
    segments = list(decode_item(item, CONFIG))
    shown = [(t / bm.VFR_RATE, i) for i, t in enumerate(bm.VFR_PTS)]
    for seg in segments:
        times = np.linspace(seg.start_s, seg.end_s, len(seg.payload) * 2 + 1)[1::2]
        expected = [max(i for start, i in shown if start <= t) for t in times]
        assert [mf.frame_index_of(f) for f in seg.payload] == expected, (seg.start_s, seg.end_s)
    assert [s.start_s for s in segments] == [0.0, 1.0, 2.0, 3.0]


def test_rotated_video_frames_come_out_upright(tmp_path):
    bm.rotated_video(tmp_path, tmp_path)
    item = list_items(str(tmp_path))[0]
    frame = next(iter(decode_item(item, CONFIG))).payload[0].astype(float)
    half = frame.shape[0] // 2
    assert frame[half + 8:].mean() > 200 and frame[:half - 8].mean() < 50  # the white half is at the bottom


def test_non_utf8_file_name_decodes_by_its_path(tmp_path, decoder):
    (tmp_path / "src").mkdir()
    (case,) = bm.non_utf8_name(tmp_path / "src", tmp_path)
    (item,) = list_items(str(tmp_path / "src"))
    assert item.uri == str(case.path) and "\udce9" in item.uri
    (segment,) = decoder.decode(item)
    assert segment.modality == "image"


@pytest.mark.parametrize("content, name", [(b"#EXTM3U\n", "list.mp3"),
                                           (b"\xef\xbb\xbf  ffconcat version 1.0\n", "a.mkv"),
                                           (b"v=0\no=- 0 0 IN IP4 127.0.0.1\n", "s.mp4")])
def test_texts_that_name_other_files_are_refused_unopened(tmp_path, content, name):
    path = tmp_path / name
    path.write_bytes(content + b"/dev/zero\n")
    item = MediaItem(str(path), "video", path.stat().st_size, 0.0, "e")
    with pytest.raises(DecodeError, match="refused unopened"):
        list(decode_item(item, CONFIG))


def test_caption_bombs_at_the_default_limit_parse_in_bounded_time(tmp_path):
    """A 4 MiB cue of a million tags, and 80k cues all spanning one hour, decode
    within the worker's timeout (naive parsing is quadratic in both)."""
    limit = DecodeConfig().max_caption_bytes
    tags = tmp_path / "tags.vtt"
    tags.write_text("WEBVTT\n\n00:00:00.000 --> 00:00:01.000\n" + "<i>x" * (limit // 4 - 20) + "\n")
    overlap = tmp_path / "overlap.srt"
    overlap.write_text("".join(f"{i}\n00:00:00,000 --> 01:00:00,000\nw\n\n" for i in range(80_000)))
    assert overlap.stat().st_size < limit
    config = DecodeConfig(timeout_s=60, idle_timeout_s=30)
    with IsolatedDecoder(config) as dec:
        (row,) = dec.decode(MediaItem(str(tags), "text", tags.stat().st_size, 0.0, "e"))
        assert row.text == "x" * config.max_text_chars
        rows = list(dec.decode(MediaItem(str(overlap), "text", overlap.stat().st_size, 0.0, "e")))
    assert len(rows) == 3600 / config.segment_s
    assert all(len(r.text) == config.max_text_chars for r in rows)


def test_file_emptied_after_listing_is_refused_as_empty(tmp_path):
    path = tmp_path / "shrunk.wav"
    path.write_bytes(b"")
    item = MediaItem(str(path), "audio", 5000, 0.0, "e")  # listed before it was emptied
    with pytest.raises(ProbeError, match="empty file"):
        list(decode_item(item, CONFIG))


# ---------------------------------------------------------------- items that fail midway


def test_items_failing_midway_leave_no_segments_unless_over_the_hold(tmp_path):
    """Held segments of a failed item are dropped; an item over max_hold_bytes has
    streamed its first segments on, and its dead letter says so."""
    truncated = bm.truncated_webm(tmp_path, tmp_path)[1].path  # yields segments, then TruncatedMediaError
    names = ("good", "fails-small", "fails-large", "crashes")
    items = [MediaItem(f"{bm.FAULT_URI_PREFIX}{name}", "audio", 1, 0.0, "e") for name in names]
    items.append(MediaItem(str(truncated), "video", truncated.stat().st_size, 0.0, "e"))
    config = DecodeConfig(max_hold_bytes=1_000_000, idle_timeout_s=10, timeout_s=20, memory_mb=1024)
    uri = bm.FAULT_URI_PREFIX.__add__
    with test_pipeline.TestPipeline() as p:
        out = p | beam.Create(items) | DecodeSegments(config, isolate=True, decode_fn=bm.decode_or_fail)
        assert_that(out.segments | "Uri" >> beam.Map(lambda s: s.uri),
                    equal_to([uri("good")] * 3 + [uri("fails-large")] * 20), label="segments")
        letters = out.deadletter | "Letter" >> beam.Map(
            lambda d: (d.uri, d.stage, d.error_type, d.message.startswith(PARTIAL_OUTPUT_MARK + " 20 ")))
        assert_that(letters, equal_to([(uri("fails-small"), "decode", "DecodeError", False),
                                       (uri("fails-large"), "decode", "DecodeError", True),
                                       (uri("crashes"), "decode", "DecoderCrashedError", False),
                                       (str(truncated), "decode", "TruncatedMediaError", False)]), label="letters")
        assert_that(out.outcome | "Outcome" >> beam.Map(lambda o: (o.uri, o.segments)),
                    equal_to([(uri("good"), 3)]), label="outcomes")


def test_bounded_caption_grouping_equals_the_plain_definition():
    """texts_per_segment's bounded scan gives what joining every overlapping cue gives."""
    rng = np.random.default_rng(7)
    for _ in range(200):
        starts = rng.uniform(0, 20, rng.integers(0, 40))
        cues = [captions.Cue(float(s), float(s + rng.uniform(0.01, 15)), "w" * int(rng.integers(1, 9)))
                for s in starts]
        bounds = segment_bounds(25.0, float(rng.choice([0.5, 1.0, 2.0])))
        max_chars = int(rng.integers(1, 60))
        plain = []
        for start, end in bounds:
            text = " ".join(c.text for c in sorted(cues, key=lambda c: c.start_s)
                            if c.start_s < end and c.end_s > start)[:max_chars]
            plain.append(text or None)
        assert list(captions.texts_per_segment(cues, bounds, max_chars)) == plain


MAIN_SCRIPT = '''
import os, sys
if __name__ != "__main__":  # spawn re-running this script in a child
    open(os.environ["MARKER"], "a").write(__name__ + "\\n")
from xmodal_index.pipeline.decode import DecodeConfig
from xmodal_index.pipeline.isolation import IsolatedDecoder
from xmodal_index.pipeline.types import MediaItem
if __name__ == "__main__":
    path = sys.argv[1]
    with IsolatedDecoder(DecodeConfig(workers=2)) as dec:
        item = MediaItem(path, "image", os.path.getsize(path), 0.0, "e")
        print(len(list(dec.decode(item))))
'''


def test_decode_workers_do_not_rerun_the_parents_main_script(tmp_path):
    """The `xmodal-index` console script imports Beam and torch; a worker that re-ran
    it would take seconds and hundreds of MiB to start."""
    script = tmp_path / "main_script.py"
    script.write_text(MAIN_SCRIPT)
    marker = tmp_path / "reimported"
    png = mf.make_png(tmp_path / "a.png")
    env = dict(os.environ, MARKER=str(marker))
    done = subprocess.run([sys.executable, str(script), str(png)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"
    assert not marker.exists(), marker.read_text()


# ---------------------------------------------------------------- hostile object keys

HOSTILE_KEYS = ["media/../../../escape.png", "media/./dot/../x.png", "media/%2e%2e%2fpct.png",
                "media/a\\..\\..\\b.png", "media//double-slash.png"]
LONG_KEY = "media/" + "n" * 300 + ".png"  # S3 allows 1024-byte keys; a file name ends at 255 bytes


@pytest.mark.parametrize("key", HOSTILE_KEYS + [LONG_KEY])
def test_hostile_s3_keys_decode_inside_a_private_temp_dir(key, s3_bucket, tmp_path, monkeypatch):
    from xmodal_index.sinks import storage

    png = mf.make_png(tmp_path / "a.png")
    storage.write_bytes(f"{s3_bucket}/{key}", png.read_bytes())
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    before = sorted(p.name for p in tmp_path.iterdir())
    (item,) = [i for i in list_items(f"{s3_bucket}/media") if i.uri == f"{s3_bucket}/{key}"]
    (segment,) = decode_item(item, CONFIG)
    assert segment.modality == "image"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written beside the temp dir
    assert list(scratch.iterdir()) == []  # and the temp dir is cleaned up
