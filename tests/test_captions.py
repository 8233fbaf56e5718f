"""WebVTT / SRT parsing and the grouping of cues into segments."""

from __future__ import annotations

import os

import pytest

from tests import media_factory as mf
from xmodal_index.pipeline.captions import Cue, decode_text, parse_captions, parse_timestamp, texts_per_segment
from xmodal_index.pipeline.decode import DecodeConfig, LimitExceededError, ProbeError, decode_item
from xmodal_index.pipeline.types import MediaItem

VTT = """WEBVTT - a title
Kind: captions

NOTE a comment
that spans lines

STYLE
::cue { color: yellow }

intro
00:00.500 --> 00:01.250 align:start position:10%
<v Roger>Hello &amp; welcome</v>

00:00:02.000 --> 00:00:03.000
second <b>line</b>
continues
"""

SRT = ("1\r\n00:00:00,500 --> 00:00:01,250\r\n{\\an8}<i>Hello</i>\r\n\r\n"
       "2\r\n00:00:02,000 --> 00:00:03,000\r\nsecond\r\n")


def text_item(path) -> MediaItem:
    return MediaItem(uri=str(path), kind="text", size=os.path.getsize(path), mtime=0.0, etag="e")


@pytest.mark.parametrize("value, seconds", [
    ("01:02:03.456", 3723.456),  # WebVTT with hours
    ("02:03.5", 123.5),  # WebVTT without hours
    ("00:00:01,250", 1.25),  # SRT
    ("10:00:00", 36000.0),
])
def test_timestamps_parse_in_both_formats(value, seconds):
    assert parse_timestamp(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "12", "aa:bb.ccc", "00:61:00.000", "00:00:75,000", "-1:00:00.000", "1:2:3:4"])
def test_malformed_timestamps_are_rejected(value):
    with pytest.raises(ValueError):
        parse_timestamp(value)


def test_vtt_cues_parse_with_header_notes_styles_ids_settings_and_markup():
    parsed = parse_captions(VTT)
    assert parsed.cues == (Cue(0.5, 1.25, "Hello & welcome"), Cue(2.0, 3.0, "second line continues"))
    assert parsed.skipped == 0


def test_srt_cues_parse_with_crlf_index_lines_and_override_tags():
    parsed = parse_captions(SRT)
    assert parsed.cues == (Cue(0.5, 1.25, "Hello"), Cue(2.0, 3.0, "second"))


def test_malformed_cues_are_skipped_and_counted_the_rest_kept():
    text = """WEBVTT

00:00:01.000 --> 00:00:02.000
kept

00:00:0x.000 --> 00:00:02.000
bad start

00:00:05.000 --> 00:00:04.000
ends before it starts

just some text without timing

00:00:06.000 -->
no end
"""
    parsed = parse_captions(text)
    assert parsed.cues == (Cue(1.0, 2.0, "kept"),)
    assert parsed.skipped == 4


def test_cues_come_back_sorted_by_start():
    text = "2\n00:00:05,000 --> 00:00:06,000\nlater\n\n1\n00:00:01,000 --> 00:00:02,000\nearlier\n"
    assert [c.text for c in parse_captions(text).cues] == ["earlier", "later"]


def test_cues_after_max_time_are_dropped_and_the_rest_clipped():
    text = "00:00:01.000 --> 00:00:09.000\nlong\n\n00:00:20.000 --> 00:00:21.000\nlate\n"
    assert parse_captions(text, max_time_s=5.0).cues == (Cue(1.0, 5.0, "long"),)


def test_unclosed_markup_keeps_the_text_and_parses_in_one_pass():
    # A line of a million '<' would take a backtracking tag regex minutes.
    text = "00:00:01.000 --> 00:00:02.000\n" + "<" * 1_000_000 + "\n"
    (cue,) = parse_captions(text, max_cue_chars=10).cues
    assert cue.text == "<" * 10


def test_undecodable_bytes_are_replaced_and_utf16_with_bom_is_read():
    assert decode_text(b"caf\xe9") == "caf\ufffd"
    assert decode_text("hé".encode("utf-16")) == "hé"  # encode() writes the BOM


def test_cue_spanning_a_boundary_belongs_to_both_segments():
    cues = [Cue(1.5, 2.5, "across"), Cue(3.0, 3.5, "late")]
    assert list(texts_per_segment(cues, [(0.0, 2.0), (2.0, 4.0)], 100)) == ["across", "across late"]


def test_cue_ending_exactly_at_a_boundary_stays_in_the_first_segment():
    cues = [Cue(0.5, 2.0, "first")]
    assert list(texts_per_segment(cues, [(0.0, 2.0), (2.0, 4.0), (4.0, 6.0)], 100)) == ["first", None, None]


def test_segment_text_is_cut_to_max_chars():
    cues = [Cue(0.0, 1.0, "abc"), Cue(0.5, 1.5, "def")]
    assert list(texts_per_segment(cues, [(0.0, 2.0)], 5)) == ["abc d"]


def test_srt_file_decodes_to_text_segments(tmp_path):
    path = mf.make_srt(tmp_path / "talk.srt", mf.BOUNDARY_CUES)
    segments = list(decode_item(text_item(path), DecodeConfig()))
    assert [(s.modality, s.start_s, s.end_s, s.text) for s in segments] == [
        ("text", 0.0, 2.0, "hello there across the boundary"), ("text", 2.0, 3.8, "across the boundary the end")]


def test_caption_file_over_max_caption_bytes_is_refused(tmp_path):
    path = mf.make_vtt(tmp_path / "huge.vtt", [(float(i), i + 0.5, "words " * 20) for i in range(200)])
    with pytest.raises(LimitExceededError, match="huge.vtt.*max_caption_bytes=4096"):
        list(decode_item(text_item(path), DecodeConfig(max_caption_bytes=4096)))


def test_caption_file_with_only_malformed_cues_is_a_probe_error(tmp_path):
    path = tmp_path / "broken.vtt"
    path.write_text("WEBVTT\n\nnot a cue\n\n00:00:xx.000 --> 00:00:01.000\nbad\n", encoding="utf-8")
    with pytest.raises(ProbeError, match="broken.vtt: no valid caption cue \\(2 malformed\\)"):
        list(decode_item(text_item(path), DecodeConfig()))
