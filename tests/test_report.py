"""The run report: what it gathers from a real run's workdir, how it escapes the
archive's names, the `report` command, and that a report never fails a run."""

from __future__ import annotations

import datetime
import html.parser
import json
import os
import shlex
import shutil
from pathlib import Path

import pytest

from tests.media_factory import make_video
from tests.run_helpers import (
    invoke,
    make_archive,
    run_args,
    summaries,
    upload_tree,
    write_config,
)
from xmodal_index.jobs import report as rp
from xmodal_index.jobs import report_failures as rf
from xmodal_index.jobs.report_html import esc, render
from xmodal_index.jobs.report_timeline import Timeline
from xmodal_index.sinks import storage

HOSTILE_DIR = "<script>alert(1)<"  # with the file below: videos/<script>alert(1)</script>.mp4
HOSTILE = "<script>alert(1)</script>.mp4"
QUOTED = 'bad" onmouseover="alert(2).mkv'


def _corrupt(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not a movie " * 40)


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    """A real run over the small archive plus two corrupt files with hostile names."""
    root = tmp_path_factory.mktemp("rep")
    archive = root / "archive"
    make_archive(archive)
    make_video(archive / "videos" / "long.mp4", duration_s=3.0, fps=4)
    _corrupt(archive / "videos" / HOSTILE_DIR / "script>.mp4")
    _corrupt(archive / "videos" / QUOTED)
    workdir = root / "work"
    result = invoke(*run_args(archive, workdir, write_config(root)))
    assert result.exit_code == 0, result.output
    (summary,) = summaries(str(workdir))
    return archive, workdir, summary


def test_every_run_writes_its_report(done_run):
    _, workdir, summary = done_run
    page = (workdir / "runs" / summary["run_id"] / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert summary["run_id"] in page


def test_counts_and_invariant_come_from_the_summary(done_run):
    _, workdir, summary = done_run
    data = rp.gather(str(workdir), summary["run_id"])
    assert (data.summary["inputs_total"], data.summary["indexed"], data.summary["failed"]) == (11, 9, 2)
    assert data.invariant == (True, "inputs 11 == indexed 9 + unchanged 0 + failed 2")
    assert data.dead_letters_cover_failures
    assert "invariant holds" in render(data)


def test_a_broken_invariant_is_shown_as_broken(done_run):
    _, workdir, summary = done_run
    data = rp.gather(str(workdir), summary["run_id"])
    data.summary["indexed"] -= 1
    assert data.invariant[0] is False
    page = render(data)
    assert "invariant broken" in page and "inputs 11 != indexed 8" in page


def test_failures_are_grouped_by_stage_error_class_and_container(done_run):
    archive, workdir, summary = done_run
    data = rp.gather(str(workdir), summary["run_id"])
    (group,) = data.failures
    assert (group.stage, group.error_type, group.count) == ("probe", "ProbeError", 2)
    assert [uri for uri, _ in group.examples] == sorted(
        [str(archive / "videos" / HOSTILE), str(archive / "videos" / QUOTED)]
    )
    assert data.failures_by_container == {"mkv": 1, "mp4": 1}


def test_group_failures_orders_groups_and_keeps_the_first_examples():
    rows = [
        {"uri": f"s3://b/{n}.mp4", "stage": "decode", "error_type": "DecodeError", "message": f"m{n}"}
        for n in (5, 1, 4, 2)
    ]
    rows.append({"uri": "s3://b/x.wav", "stage": "probe", "error_type": "ProbeError", "message": "bad"})
    groups = rf.group_failures(rows, examples=3)
    assert [(g.stage, g.count) for g in groups] == [("decode", 4), ("probe", 1)]
    assert groups[0].examples == (("s3://b/1.mp4", "m1"), ("s3://b/2.mp4", "m2"), ("s3://b/4.mp4", "m4"))


def test_codec_and_container_names():
    assert rf.codec_of("[h264 @ 0x55d0c0] Invalid NAL unit size") == "h264"
    assert rf.codec_of("not a readable media container") == "unknown"
    assert rf.container_of("s3://b/dir.v2/clip.MKV") == "mkv"
    assert rf.container_of("/a/README") == "(none)"


class _Elements(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(attrs)


def test_hostile_file_names_are_escaped_in_text_and_attributes(done_run):
    _, workdir, summary = done_run
    page = (workdir / "runs" / summary["run_id"] / "report.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.mp4" in page
    assert "<script" not in page.lower()
    parsed = _Elements()
    parsed.feed(page)
    assert "script" not in parsed.tags
    assert not any(name.startswith("on") for name, _ in parsed.attrs)
    assert "bad&quot; onmouseover=&quot;alert(2).mkv" in page


def test_esc_shows_control_characters_and_quotes_inert():
    assert esc("a\"b'<c>&\x1b[31m\u202e") == "a&quot;b&#x27;&lt;c&gt;&amp;\\x1b[31m\\u202e"


def test_the_page_loads_nothing_from_the_network(done_run):
    _, workdir, summary = done_run
    page = (workdir / "runs" / summary["run_id"] / "report.html").read_text()
    assert "default-src 'none'" in page
    parsed = _Elements()
    parsed.feed(page)
    sources = [value for name, value in parsed.attrs if name in ("src", "href")]
    assert sources and all(value.startswith("data:") for value in sources)


def test_outcomes_record_each_items_finish_time_media_and_decoder_seconds(done_run):
    _, workdir, summary = done_run
    parts = (workdir / "runs" / summary["run_id"] / "outcomes").glob("part-*.jsonl")
    outcomes = {os.path.basename(o["uri"]): o for part in parts for o in map(json.loads, part.read_text().splitlines())}
    assert len(outcomes) == summary["indexed"]
    started = datetime.datetime.fromisoformat(summary["started_at"]).timestamp()
    assert all(
        started < o["finished_at"] <= started + summary["wall_s"] and o["decode_s"] > 0 for o in outcomes.values()
    )
    assert outcomes["long.mp4"]["media_s"] == pytest.approx(3.0, abs=0.3)
    assert outcomes["tone0.wav"]["media_s"] > 0 and outcomes["img0.png"]["media_s"] == 0.0


def test_throughput_per_kind_and_phases_come_from_the_outcomes(done_run):
    _, workdir, summary = done_run
    data = rp.gather(str(workdir), summary["run_id"])
    kinds = data.timeline.kinds
    assert {k: t.items for k, t in kinds.items()} == {"video": 2, "image": 3, "audio": 2, "text": 2}
    assert kinds["image"].media_s == 0.0 and kinds["video"].media_s == pytest.approx(5.0, abs=0.5)
    series = data.throughput()
    assert len(series) == rp.THROUGHPUT_BINS
    width = series[1][0] - series[0][0]
    media = sum(t.media_s for t in kinds.values())
    assert sum(rate for _, rate in series) * width == pytest.approx(media, rel=1e-6)
    names = [p.name for p in data.phases]
    assert names[:2] == ["list + plan", "decode + encode + write (Beam)"] and "index build + upload" in names
    assert sum(p.seconds for p in data.phases) <= summary["wall_s"] + 0.01


def test_the_timeline_stays_small_however_many_items():
    timeline = Timeline(bucket_s=0.05, max_buckets=64)
    for n in range(10_000):
        timeline.add(1_000.0 + n * 0.37, ok=n % 10 != 0, kind="video", media_s=2.0)
    assert len(timeline.done) + len(timeline.failed) <= 64
    assert sum(timeline.done.values()) == 9_000 and sum(timeline.failed.values()) == 1_000
    series = timeline.throughput(start=1_000.0, bins=30)
    assert sum(rate for _, rate in series) * (series[1][0] - series[0][0]) == pytest.approx(18_000.0)
    assert timeline.cumulative(1_000.0, ok=True)[-1][1] == 9_000


def test_outcomes_written_before_item_times_still_report(done_run, tmp_path):
    _, workdir, summary = done_run
    copy = tmp_path / "work"
    shutil.copytree(workdir, copy)
    for part in (copy / "runs" / summary["run_id"] / "outcomes").iterdir():
        lines = [json.loads(line) for line in part.read_text().splitlines() if line.strip()]
        part.write_text(
            "".join(json.dumps({k: o[k] for k in ("uri", "etag", "size", "mtime", "segments")}) + "\n" for o in lines)
        )
    data = rp.gather(str(copy), summary["run_id"])
    assert data.throughput() == []
    assert any("record no finish time" in note for note in data.notes)
    assert "Throughput and timing" in render(data)


def test_segments_per_modality_match_the_rows_written(done_run):
    _, workdir, summary = done_run
    data = rp.gather(str(workdir), summary["run_id"])
    assert set(data.segments_by_modality) == {"video", "audio", "image", "text"}
    assert sum(data.segments_by_modality.values()) == summary["rows_written"]
    assert data.version.ntotal_by_modality == data.segments_by_modality


def test_the_new_version_with_recall_factory_size_and_gate(done_run):
    _, workdir, summary = done_run
    data = rp.gather(str(workdir), summary["run_id"])
    v = data.version
    assert (v.version, v.published) == ("v000001", True)
    assert v.recall_at_10["float"] == pytest.approx(1.0)
    assert v.index_factory == {"float": "Flat", "binary": "BFlat"}
    index_dir = workdir / "indexes" / "main" / "v000001"
    listed = json.loads((index_dir / "manifest.json").read_text())
    names = [e["file"] for key in ("shards", "id_maps", "vectors", "files") for e in listed.get(key, [])]
    assert v.bytes_total == sum((index_dir / name).stat().st_size for name in names) > 0
    page = render(data)
    assert "v000001 is the first version" in page and "float Flat, binary BFlat" in page


def test_sample_queries_show_thumbnails_and_audio(done_run):
    _, workdir, summary = done_run
    page = (workdir / "runs" / summary["run_id"] / "report.html").read_text()
    assert "Sample queries" in page
    assert "data:image/jpeg;base64," in page
    assert '<audio controls preload="none" src="data:audio/wav;base64,' in page


def test_samples_are_skipped_with_a_reason_when_the_encoder_cannot_load(done_run, monkeypatch):
    from xmodal_index.jobs import report_samples
    from xmodal_index.query import encoder

    def no_torch(version):
        raise ModuleNotFoundError("No module named 'torch'")

    monkeypatch.setattr(encoder, "load_query_encoder", no_torch)
    _, workdir, summary = done_run
    data = rp.gather(str(workdir), summary["run_id"])
    report_samples.add_samples(data)
    assert data.samples == []
    assert data.samples_note == "sample queries skipped: ModuleNotFoundError: No module named 'torch'"
    assert "No module named &#x27;torch&#x27;" in render(data)


def test_retry_command_is_runnable_as_printed(done_run):
    _, workdir, summary = done_run
    data = rp.gather(str(workdir), summary["run_id"])
    args = shlex.split(data.retry_command)
    assert args[:2] == ["xmodal-index", "run"] and args[-1] == "--retry-failed"
    result = invoke(*args[1:])
    assert result.exit_code == 3, result.output  # both fail again: over max_error_fraction, as in any run
    retry = summaries(str(workdir))[-1]
    assert (retry["unchanged"], retry["failed"]) == (9, 2)  # the two failed inputs were tried again


def test_report_command_rewrites_a_past_run_from_a_relative_workdir(done_run, tmp_path, monkeypatch):
    _, workdir, summary = done_run
    monkeypatch.chdir(workdir.parent)
    out = tmp_path / "again.html"
    result = invoke("report", "--workdir", workdir.name, "--run", summary["run_id"], "--out", out, "--no-samples")
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert summary["run_id"] in page and "data:image/jpeg" not in page


def test_report_command_refuses_an_unknown_run_in_one_line(done_run):
    _, workdir, _ = done_run
    result = invoke("report", "--workdir", workdir, "--run", "../../etc")
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and "no run '../../etc'" in result.output


def test_a_report_that_fails_never_fails_the_run(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("renderer exploded")

    monkeypatch.setattr(rp, "write_report", broken)
    make_archive(tmp_path / "a")
    result = invoke(*run_args(tmp_path / "a", tmp_path / "w", write_config(tmp_path)))
    assert result.exit_code == 0, result.output
    assert "could not write the run report: RuntimeError: renderer exploded" in result.output
    assert not list((tmp_path / "w" / "runs").glob("*/report.html"))


def test_retry_command_repeats_the_selection_runner_and_beam_flags():
    summary = {
        "failed": 2,
        "source": "s3://arch/it's here",
        "workdir": "/w d",
        "index_name": "films",
        "prefix": "2024/",
        "since": "2024-01-01T00:00:00+00:00",
        "until": None,
    }
    config = {"runner": "FlinkRunner", "beam_args": ["--parallelism=4", "--default_sdk_harness_log_level=WARNING"]}
    args = shlex.split(rf.retry_command(summary, config, "/w d/runs/R/job-config.json"))
    assert args == [
        "xmodal-index",
        "run",
        "--source",
        "s3://arch/it's here",
        "--workdir",
        "/w d",
        "--index-name",
        "films",
        "--config",
        "/w d/runs/R/job-config.json",
        "--prefix",
        "2024/",
        "--since",
        "2024-01-01T00:00:00+00:00",
        "--runner",
        "FlinkRunner",
        "--retry-failed",
        "--",
        "--parallelism=4",
    ]
    assert rf.retry_command({**summary, "failed": 0}, config, None) is None


def test_a_run_that_cannot_complete_still_gets_a_report_with_its_error(tmp_path):
    result = invoke(*run_args(tmp_path / "no-such-archive", tmp_path / "w", write_config(tmp_path)))
    assert result.exit_code == 1, result.output
    (page,) = (tmp_path / "w" / "runs").glob("*/report.html")
    text = page.read_text()
    assert "exit code 1" in text and "no-such-archive" in text and "<b>error:</b>" in text
    assert "this run built no index version" in text


def test_report_command_reads_a_workdir_on_object_storage(done_run, s3_bucket, tmp_path):
    _, workdir, summary = done_run
    upload_tree(workdir, s3_bucket + "/work")
    out = tmp_path / "r.html"
    result = invoke("report", "--workdir", s3_bucket + "/work", "--run", summary["run_id"], "--out", out)
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "inputs 11 == indexed 9 + unchanged 0 + failed 2" in page and "ProbeError" in page
    assert "v000001" in page and "data:image/jpeg;base64," in page


@pytest.mark.slow
def test_a_run_on_object_storage_writes_its_report_there(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "5")  # the job sets these for Beam's S3 client when unset
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    make_archive(tmp_path / "a")
    _corrupt(tmp_path / "a" / "videos" / "broken.mp4")
    upload_tree(tmp_path / "a", s3_bucket + "/archive")
    work = s3_bucket + "/work"
    result = invoke(*run_args(s3_bucket + "/archive", work, write_config(tmp_path)))
    assert result.exit_code == 0, result.output
    (summary,) = summaries(work)
    page = storage.read_bytes(f"{work}/runs/{summary['run_id']}/report.html").decode()
    assert "invariant holds" in page and "data:image/jpeg;base64," in page
    assert f"{work}/runs/{summary['run_id']}/job-config.json" in page
    assert storage.exists(f"{work}/runs/{summary['run_id']}/job-config.json")


def test_sample_hits_with_hostile_names_and_texts_stay_inert(done_run):
    from xmodal_index.jobs.report_samples import ProbeResult, SampleHit

    _, workdir, summary = done_run
    data = rp.gather(str(workdir), summary["run_id"])
    hit = SampleHit(
        uri='s3://b/x"><script>alert(1)</script>.png',
        modality="image",
        start_s=0.0,
        end_s=0.0,
        score=0.5,
        text="</div><img src=x onerror=alert(2)>",
        thumbnail='data:image/jpeg;base64,"onload=x',
    )
    data.samples = [ProbeResult(query="<b onclick=alert(3)>nine</b>", searched=("image",), hits=[hit])]
    parsed = _Elements()
    parsed.feed(render(data))
    assert "script" not in parsed.tags
    assert not any(name.startswith("on") for name, _ in parsed.attrs)
    assert ("title", 's3://b/x"><script>alert(1)</script>.png') in parsed.attrs  # one attribute value, as given


def test_report_open_shows_the_written_file_in_a_browser(done_run, tmp_path, monkeypatch):
    import webbrowser

    _, workdir, summary = done_run
    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", opened.append)
    out = tmp_path / "opened.html"
    result = invoke("report", "--workdir", workdir, "--out", out, "--no-samples", "--open")
    assert result.exit_code == 0, result.output
    assert opened == [out.resolve().as_uri()]


def test_a_run_with_nothing_to_do_reports_the_unchanged_inputs(tmp_path):
    make_archive(tmp_path / "a")
    config = write_config(tmp_path)
    for _ in range(2):
        assert invoke(*run_args(tmp_path / "a", tmp_path / "w", config)).exit_code == 0
    second = summaries(str(tmp_path / "w"))[-1]
    data = rp.gather(str(tmp_path / "w"))
    assert data.run_id == second["run_id"]
    assert data.invariant == (True, "inputs 8 == indexed 0 + unchanged 8 + failed 0")
    assert data.timeline.kinds == {} and data.failures == [] and data.retry_command is None
    assert "nothing changed: LATEST stays" in render(data)


def test_a_rerun_that_publishes_a_crashed_runs_version_says_so(tmp_path):
    from tests.run_helpers import invoke_subprocess
    from xmodal_index.jobs.run_job import CRASH_ENV, CRASH_EXIT_CODE

    make_archive(tmp_path / "a")
    args = run_args(tmp_path / "a", tmp_path / "w", write_config(tmp_path))
    crashed = invoke_subprocess(args, env={CRASH_ENV: "before_publish"})
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr
    assert invoke(*args).exit_code == 0
    data = rp.gather(str(tmp_path / "w"))
    assert data.version.version == "v000001" and data.version.published
    assert any("v000001 was built by run " in note and "this run did" in note for note in data.notes)


def test_previews_fetch_objects_from_s3_only_under_the_size_cap(s3_bucket, tmp_path, monkeypatch):
    from tests.media_factory import make_png
    from xmodal_index.jobs import report_samples
    from xmodal_index.jobs.report_samples import ProbeResult, SampleHit

    uri = s3_bucket + "/img.png"
    storage.put_file(str(make_png(tmp_path / "img.png")), uri)

    def probe() -> SampleHit:
        hit = SampleHit(uri=uri, modality="image", start_s=0.0, end_s=0.0, score=1.0, text=None)
        report_samples.add_media(ProbeResult(query="q", searched=("image",), hits=[hit]))
        return hit

    assert probe().thumbnail.startswith("data:image/jpeg;base64,")
    monkeypatch.setattr(report_samples, "MAX_FETCH_BYTES", 10)
    assert probe().thumbnail is None
