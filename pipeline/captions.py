"""WebVTT / SRT caption parsing, and the grouping of cues into time segments.

Pure functions over text already read (``decode.py`` reads files with the size
limit). Parsing is one pass over the lines with no backtracking regular
expressions, so its time is linear in the input whatever the input holds;
malformed cues are skipped and counted, never fatal on their own.
"""

from __future__ import annotations

import codecs
import dataclasses
import html
from collections.abc import Iterable, Iterator, Sequence

TIMED_CAPTION_EXTS = (".vtt", ".srt")
_SKIPPED_VTT_BLOCKS = ("WEBVTT", "NOTE", "STYLE", "REGION")


@dataclasses.dataclass(frozen=True)
class Cue:
    start_s: float
    end_s: float
    text: str


@dataclasses.dataclass(frozen=True)
class ParsedCaptions:
    cues: tuple[Cue, ...]  # sorted by start time
    skipped: int  # blocks that looked like cues but did not parse


def decode_text(data: bytes) -> str:
    """Bytes of a text file as str: UTF-8 (or UTF-16 with a BOM), undecodable bytes replaced."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16", errors="replace")
    return data.decode("utf-8-sig", errors="replace")


def parse_timestamp(value: str) -> float:
    """Seconds of a WebVTT (``[hh:]mm:ss.ttt``) or SRT (``hh:mm:ss,ttt``) timestamp.

    Raises ValueError for anything else.
    """
    parts = value.strip().split(":")
    if not 2 <= len(parts) <= 3:
        raise ValueError(f"timestamp {value!r} must look like hh:mm:ss.ttt, mm:ss.ttt or hh:mm:ss,ttt")
    seconds_part = parts[-1].replace(",", ".")
    whole, _, fraction = seconds_part.partition(".")
    fields = parts[:-1] + [whole] + ([fraction] if fraction else [])
    if not all(f.isascii() and f.isdigit() for f in fields):
        raise ValueError(f"timestamp {value!r} has a field that is not a number")
    hours = int(parts[0]) if len(parts) == 3 else 0
    minutes, seconds = int(parts[-2]), int(whole)
    if minutes >= 60 or seconds >= 60:
        raise ValueError(f"timestamp {value!r} has minutes or seconds over 59")
    frac = int(fraction) / 10 ** len(fraction) if fraction else 0.0
    return hours * 3600 + minutes * 60 + seconds + frac


def _strip_markup(text: str) -> str:
    """Drop <tags> (WebVTT voices, classes, inline times; SRT <i>) and {\\ass} overrides.

    A linear scan (each opener position is searched for once, not once per tag): an
    unclosed ``<`` or ``{`` keeps the rest of the text as is.
    """
    out: list[str] = []
    pos = 0
    next_lt = next_brace = -2  # -2: not searched yet; -1: none left
    while pos < len(text):
        if next_lt != -1 and next_lt < pos:
            next_lt = text.find("<", pos)
        if next_brace != -1 and next_brace < pos:
            next_brace = text.find("{\\", pos)
        starts = [i for i in (next_lt, next_brace) if i >= 0]
        if not starts:
            break
        start = min(starts)
        close = text.find(">" if start == next_lt else "}", start)
        if close < 0:
            break
        out.append(text[pos:start])
        pos = close + 1
    out.append(text[pos:])
    return "".join(out)


def clean_cue_text(lines: Iterable[str], max_chars: int) -> str:
    text = html.unescape(_strip_markup(" ".join(lines)))
    return " ".join(text.split())[:max_chars]


def _blocks(text: str) -> Iterator[list[str]]:
    block: list[str] = []
    for line in text.splitlines():
        if line.strip():
            block.append(line)
        elif block:
            yield block
            block = []
    if block:
        yield block


def _parse_block(block: list[str], max_chars: int) -> Cue | None:
    """A cue from one block: an optional identifier (SRT index, VTT id), the
    ``start --> end [settings]`` line, then the text lines. Raises ValueError."""
    timing = 0 if "-->" in block[0] else 1
    if timing >= len(block) or "-->" not in block[timing]:
        raise ValueError("no 'start --> end' line")
    left, _, right = block[timing].partition("-->")
    end_field = right.split()
    if not end_field:
        raise ValueError("no end time")
    start, end = parse_timestamp(left), parse_timestamp(end_field[0])
    if end <= start:
        raise ValueError(f"cue ends ({end}) before it starts ({start})")
    text = clean_cue_text(block[timing + 1:], max_chars)
    return Cue(start, end, text) if text else None


def parse_captions(text: str, *, max_cue_chars: int = 2000, max_time_s: float = float("inf")) -> ParsedCaptions:
    """Cues of a WebVTT or SRT document (both parse the same way), sorted by start.

    Cues with bad timestamps, an end before the start, or no timing line are
    counted in ``skipped``; empty cues, WebVTT headers, NOTE, STYLE and REGION
    blocks are ignored; cues starting at or after ``max_time_s`` are dropped and
    the others end there at the latest.
    """
    cues: list[Cue] = []
    skipped = 0
    for block in _blocks(text):
        words = block[0].lstrip("\ufeff").split(maxsplit=1)
        if "-->" not in block[0] and words and words[0] in _SKIPPED_VTT_BLOCKS:
            continue
        try:
            cue = _parse_block(block, max_cue_chars)
        except ValueError:
            skipped += 1
            continue
        if cue is not None and cue.start_s < max_time_s:
            cues.append(Cue(cue.start_s, min(cue.end_s, max_time_s), cue.text))
    cues.sort(key=lambda c: (c.start_s, c.end_s))
    return ParsedCaptions(tuple(cues), skipped)


def texts_per_segment(cues: Sequence[Cue], bounds: Iterable[tuple[float, float]],
                      max_chars: int) -> Iterator[str | None]:
    """For each (start, end) of ``bounds`` (ascending), the texts of the cues that
    overlap it, in start order, joined by a space and cut to ``max_chars``; None
    where none does.

    A cue overlaps a segment when it starts before the segment's end and ends
    after its start, so a cue spanning a boundary belongs to both segments.
    The work per segment is bounded by ``max_chars`` (each cue holds at least one
    character), not by the number of cues that overlap it: many long cues cannot
    make this quadratic.
    """
    ordered = sorted(cues, key=lambda c: c.start_s)
    nxt = 0
    active: list[Cue] = []  # started cues in start order; some may have ended (dropped in batches)
    for start, end in bounds:
        while nxt < len(ordered) and ordered[nxt].start_s < end:
            active.append(ordered[nxt])
            nxt += 1
        parts: list[str] = []
        length = ended = 0
        for cue in active:
            if cue.end_s <= start:
                ended += 1
            elif length <= max_chars:
                parts.append(cue.text)
                length += len(cue.text) + 1
            else:
                break
        if ended > _COMPACT_AFTER or ended * 2 > len(active):
            active = [c for c in active if c.end_s > start]
        text = " ".join(parts)[:max_chars]
        yield text or None


# Ended cues are dropped from the active list once a scan has skipped this many
# (or half the list): each cue is dropped once, so the drops cost O(cues) in all.
_COMPACT_AFTER = 256
