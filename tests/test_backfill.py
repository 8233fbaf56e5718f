"""Backfill ranges: --prefix and --since/--until select what a run looks at, and
nothing outside the selection is reprocessed or marked deleted."""

import datetime
import os
import shutil

import pytest

from tests.media_factory import make_png
from tests.run_helpers import (
    CONFIG_TOML,
    assert_same_index,
    index_contents,
    invoke,
    make_archive,
    run_args,
    summaries,
    write_config,
)
from xmodal_index.jobs.run_cmd import parse_time
from xmodal_index.sinks.index import manifest as mf
from xmodal_index.sinks.ledger import read_ledger

UTC = datetime.timezone.utc
OLD = datetime.datetime(2024, 1, 10, tzinfo=UTC).timestamp()
NEW = datetime.datetime(2024, 6, 10, tzinfo=UTC).timestamp()


@pytest.fixture
def config(tmp_path):
    return write_config(tmp_path)


@pytest.fixture
def archive(tmp_path):
    root = tmp_path / "archive"
    make_archive(root)
    return root


def _last(work):
    return summaries(str(work))[-1]


def _uris(work):
    return {row[0] for row in index_contents(str(work / "indexes" / "main")).values()}


def test_prefix_processes_only_objects_under_it(archive, config, tmp_path):
    work = tmp_path / "work"
    assert invoke(*run_args(archive, work, config)).exit_code == 0
    changed = archive / "images" / "img0.png"
    make_png(changed, color=(1, 2, 3))
    gone = archive / "audio" / "tone0.wav"
    gone.unlink()
    result = invoke(*run_args(archive, work, config, "--prefix", "images/"))
    assert result.exit_code == 0, result.output
    s = _last(work)
    assert (s["inputs_total"], s["indexed"], s["unchanged"], s["deleted"]) == (3, 1, 2, 0)
    assert s["prefix"] == "images/" and s["index_version"] == "v000002"
    # outside the prefix nothing was looked at: the removed audio file is still indexed
    assert read_ledger(str(work))[str(gone)].state == "indexed" and str(gone) in _uris(work)
    assert invoke(*run_args(archive, work, config)).exit_code == 0
    assert _last(work)["deleted"] == 1 and str(gone) not in _uris(work)


def test_prefix_need_not_end_at_a_folder(archive, config, tmp_path):
    work = tmp_path / "work"
    result = invoke(*run_args(archive, work, config, "--prefix", "images/img1"))
    assert result.exit_code == 0, result.output
    assert _uris(work) == {str(archive / "images" / "img1.png")}


def test_a_date_range_backfill_in_two_halves_gives_the_full_run_s_index(archive, config, tmp_path):
    recent = [archive / "images" / "img2.png", archive / "texts" / "note1.txt"]
    for path in archive.rglob("*"):
        if path.is_file():
            stamp = NEW if path in recent else OLD
            os.utime(path, (stamp, stamp))
    work = tmp_path / "work"
    result = invoke(*run_args(archive, work, config, "--since", "2024-05-01"))
    assert result.exit_code == 0, result.output
    s = _last(work)
    assert (s["inputs_total"], s["indexed"], s["skipped_by_range"], s["deleted"]) == (2, 2, 6, 0)
    assert _uris(work) == {str(p) for p in recent}

    result = invoke(*run_args(archive, work, config, "--until", "2024-05-01T00:00:00Z"))
    assert result.exit_code == 0, result.output
    s = _last(work)
    assert (s["inputs_total"], s["indexed"], s["skipped_by_range"]) == (6, 6, 2)

    reference = tmp_path / "reference"
    assert invoke(*run_args(archive, reference, config)).exit_code == 0
    assert_same_index(index_contents(str(work / "indexes" / "main")),
                      index_contents(str(reference / "indexes" / "main")))


def test_a_caption_change_puts_its_video_in_range(archive, config, tmp_path):
    for path in archive.rglob("*"):
        if path.is_file():
            os.utime(path, (OLD, OLD))
    work = tmp_path / "work"
    assert invoke(*run_args(archive, work, config)).exit_code == 0
    (archive / "videos" / "clip.vtt").write_text("WEBVTT\n\n00:00.000 --> 00:01.000\nthree\n")
    assert invoke(*run_args(archive, work, config, "--since", "1d")).exit_code == 0
    s = _last(work)
    assert (s["inputs_total"], s["indexed"]) == (1, 1)


def test_a_new_model_over_a_prefix_is_held_back_until_the_whole_archive_is_re_embedded(archive, config, tmp_path):
    work = tmp_path / "work"
    assert invoke(*run_args(archive, work, config)).exit_code == 0
    new_model = tmp_path / "new_model.toml"
    new_model.write_text(CONFIG_TOML.replace('checkpoint = ""', 'checkpoint = ""\nseed = 1'))
    result = invoke(*run_args(archive, work, new_model, "--prefix", "images/"))
    assert result.exit_code == 0, result.output
    s = _last(work)
    assert s["indexed"] == 3 and not s["index_published"] and "another model" in s["index_note"]
    assert mf.read_latest(str(work / "indexes" / "main")) == "v000001"  # never a mix of two models

    assert invoke(*run_args(archive, work, new_model)).exit_code == 0
    s = _last(work)
    assert (s["indexed"], s["unchanged"], s["index_version"]) == (5, 3, "v000002")
    manifest = mf.read_manifest(str(work / "indexes" / "main"), "v000002")
    assert manifest.model_id == s["model_id"] and manifest.ntotal == 13


def test_a_prefix_with_nothing_under_it_is_an_error(archive, config, tmp_path):
    result = invoke(*run_args(archive, tmp_path / "work", config, "--prefix", "imagez/"))
    assert result.exit_code == 1
    assert "imagez" in result.output


@pytest.mark.parametrize("args, message", [
    (("--prefix", "../elsewhere"), "relative path prefix"),
    (("--since", "2024-06-01", "--until", "2024-05-01"), "must be before"),
    (("--since", "last tuesday"), "neither an ISO 8601"),
])
def test_bad_ranges_are_refused_by_name(archive, config, tmp_path, args, message):
    result = invoke(*run_args(archive, tmp_path / "work", config, *args))
    assert result.exit_code == 2
    assert message in result.output


def test_times_are_iso_dates_or_ages():
    now = datetime.datetime(2024, 6, 10, 12, 0, tzinfo=UTC)
    assert parse_time("2024-05-01", now) == datetime.datetime(2024, 5, 1, tzinfo=UTC)
    assert parse_time("2024-05-01T06:30:00Z", now) == datetime.datetime(2024, 5, 1, 6, 30, tzinfo=UTC)
    assert parse_time("2024-05-01T08:30:00+02:00", now) == datetime.datetime(2024, 5, 1, 6, 30, tzinfo=UTC)
    assert parse_time("36h", now) == datetime.datetime(2024, 6, 9, 0, 0, tzinfo=UTC)
    assert parse_time("2w", now) == datetime.datetime(2024, 5, 27, 12, 0, tzinfo=UTC)


def test_unchanged_objects_outside_the_prefix_keep_their_rows(archive, config, tmp_path):
    work = tmp_path / "work"
    assert invoke(*run_args(archive, work, config)).exit_code == 0
    before = index_contents(str(work / "indexes" / "main"))
    shutil.copy(archive / "images" / "img0.png", archive / "images" / "extra.png")
    assert invoke(*run_args(archive, work, config, "--prefix", "images/")).exit_code == 0
    after = index_contents(str(work / "indexes" / "main"))
    assert set(before) < set(after) and len(after) == len(before) + 1
