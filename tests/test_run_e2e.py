"""The whole DAG through the CLI: sample archive -> run -> Parquet, dead letters, index -> query."""

import json
import os
import pathlib
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from tests.run_helpers import index_contents
from xmodal_index.jobs.cli import cli
from xmodal_index.pipeline.sample_archive import build_sample_archive

CONFIG = """
[decode]
segment_s = 1.0
frame_rate_hz = 2.0
[encoder]
checkpoint = "{checkpoint}"
batch_size = 32
[run]
max_error_fraction = 0.5
"""


def _invoke(*args):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    build_sample_archive(str(root), videos=3, segments_per_video=4)
    # a truncated mp4 and random bytes named .png: both must be dead-lettered
    clip = next((root / "videos").glob("*.mp4"))
    (root / "videos" / "truncated.mp4").write_bytes(clip.read_bytes()[:2500])
    (root / "images" / "noise.png").write_bytes(os.urandom(4000))
    return root


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    p = tmp_path_factory.mktemp("cfg") / "job.toml"
    p.write_text(CONFIG.format(checkpoint="bundled"))
    return p


@pytest.fixture(scope="module")
def first_run(archive, config, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    result = _invoke("run", "--source", str(archive), "--workdir", str(work), "--config", str(config))
    assert result.exit_code == 0, result.output
    (summary_path,) = work.glob("runs/*/summary.json")
    return work, json.loads(summary_path.read_text())


def _media_files(archive):
    return [p for p in archive.rglob("*") if p.suffix in {".mp4", ".webm", ".wav", ".png", ".txt"}
            or p.suffix in {".vtt", ".srt"} and not any(p.with_suffix(s).exists() for s in (".mp4", ".webm"))]


def test_summary_counts_add_up_and_corrupt_files_are_dead_lettered(archive, first_run):
    work, s = first_run
    assert s["inputs_total"] == len(_media_files(archive))
    assert s["inputs_total"] == s["indexed"] + s["unchanged"] + s["failed"]
    assert s["failed"] == 2
    dead = pa.concat_tables([pq.read_table(p) for p in work.glob("deadletter/*/*.parquet")]).to_pylist()
    assert sorted(pathlib.Path(d["uri"]).name for d in dead) == ["noise.png", "truncated.mp4"]
    assert all(d["stage"] and d["error_type"] and d["message"] for d in dead)
    assert s["index_version"] == "v000001" and s["rows_written"] == s["segments"] > 0


def test_embedding_rows_follow_the_contract(first_run):
    work, s = first_run
    table = pa.concat_tables([pq.read_table(p) for p in work.glob("embeddings/*/part-*-of-*.parquet")])
    assert table.num_rows == s["rows_written"]
    schema = table.schema
    assert schema.field("segment_id").type == pa.int64()
    assert pa.types.is_fixed_size_list(schema.field("embedding").type)
    assert schema.field("hash_code").type == pa.binary(8)
    assert set(table.column("modality").to_pylist()) == {"video", "audio", "image", "text"}
    rows = table.to_pylist()
    assert len({r["segment_id"] for r in rows}) == len(rows)
    assert all(r["end_s"] >= r["start_s"] >= 0 for r in rows)
    assert all(r["model_id"] == s["model_id"] and r["run_id"] == s["run_id"] for r in rows)
    video_rows = [r for r in rows if r["modality"] == "video"]
    assert {r["end_s"] - r["start_s"] for r in video_rows} == {1.0}


def test_manifest_and_latest_describe_the_published_version(first_run):
    work, s = first_run
    root = work / "indexes" / "main"
    assert (root / "LATEST").read_text().split()[0] == "v000001"
    manifest = json.loads((root / "v000001" / "manifest.json").read_text())
    for key in ("version", "created_at", "parent_version", "model_id", "dim", "bits", "metric", "index_factory",
                "shards", "ntotal", "metrics"):
        assert key in manifest
    assert manifest["ntotal"] == s["rows_written"]
    assert manifest["model_id"] == s["model_id"]


def test_text_query_returns_hits_with_timestamps(first_run):
    work, _ = first_run
    result = _invoke("query", "--index", str(work), "--text", "seven", "-k", "5", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    hits = out["hits"]
    assert len(hits) == 5
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    for h in hits:
        assert set(h) >= {"uri", "modality", "start_s", "end_s", "score", "segment_id"}


def test_queries_file_answers_each_line_and_modality_filter_holds(first_run, archive, tmp_path):
    work, _ = first_run
    wav = next((archive / "audio").glob("*.wav"))
    png = next((archive / "images").glob("*.png"))
    qf = tmp_path / "q.jsonl"
    qf.write_text(json.dumps({"id": "t", "text": "three"}) + "\n" + json.dumps({"id": "a", "audio": str(wav)})
                  + "\n" + json.dumps({"image": str(png)}) + "\n")
    result = _invoke("query", "--index", str(work), "--queries", str(qf), "--modality", "image,video", "--json")
    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in result.output.strip().splitlines()]
    assert [a["id"] for a in answers] == ["t", "a", 3]
    assert all(h["modality"] in ("image", "video") for a in answers for h in a["hits"])


def test_tampered_shard_is_refused(first_run, tmp_path):
    work, _ = first_run
    copy = tmp_path / "work"
    shutil.copytree(work / "indexes", copy / "indexes")
    shard = next((copy / "indexes" / "main" / "v000001").glob("*.float.faiss"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = _invoke("query", "--index", str(copy), "--text", "seven")
    assert result.exit_code == 1
    assert shard.name in result.output and "sha256" in result.output


def test_rerun_is_incremental_and_deletions_leave_the_index(archive, config, first_run, tmp_path):
    work, first = first_run
    inc = tmp_path / "work"
    shutil.copytree(work, inc)
    src = tmp_path / "archive"
    shutil.copytree(archive, src)
    # same archive at a new path is a new archive: index once, then rerun unchanged
    assert _invoke("run", "--source", str(src), "--workdir", str(inc), "--config", str(config)).exit_code == 0
    again = _invoke("run", "--source", str(src), "--workdir", str(inc), "--config", str(config))
    assert again.exit_code == 0
    summaries = sorted(inc.glob("runs/*/summary.json"))
    last = json.loads(summaries[-1].read_text())
    assert last["indexed"] == 0 and last["unchanged"] == last["inputs_total"]
    assert last["index_note"].startswith("nothing changed")
    gone = next(p for p in (src / "images").glob("*.png") if p.name != "noise.png")
    gone.unlink()
    third = _invoke("run", "--source", str(src), "--workdir", str(inc), "--config", str(config))
    assert third.exit_code == 0
    last = json.loads(sorted(inc.glob("runs/*/summary.json"))[-1].read_text())
    assert last["deleted"] == 1
    live = index_contents(str(inc / "indexes" / "main"))  # LATEST's rows (incremental: parent files, less tombstones)
    assert live and str(gone) not in {row[0] for row in live.values()}


def test_bad_config_key_is_refused_by_name(archive, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[decode]\nsegment_seconds = 1\n")
    result = _invoke("run", "--source", str(archive), "--workdir", str(tmp_path / "w"), "--config", str(bad))
    assert result.exit_code == 2
    assert "segment_seconds" in result.output


def test_missing_source_fails_with_one_line(tmp_path):
    result = _invoke("run", "--source", str(tmp_path / "nope"), "--workdir", str(tmp_path / "w"))
    assert result.exit_code == 1
    assert "nope" in result.output


def _ground_truth(archive):
    gt = {}
    for line in (archive / "ground_truth.jsonl").read_text().splitlines():
        d = json.loads(line)
        gt[(str(archive / d["path"]), d["modality"], d["start_s"])] = d["digit"]
    return gt


WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def test_bundled_encoder_finds_the_spoken_and_shown_digit(first_run, archive, tmp_path):
    """Text -> video frames and image -> audio hits carry the queried digit (sample ground truth)."""
    work, _ = first_run
    gt = _ground_truth(archive)
    digits = sorted({d for (_, m, _), d in gt.items() if m == "video"})
    qf = tmp_path / "q.jsonl"
    qf.write_text("".join(json.dumps({"id": d, "text": WORDS[d], "modality": "video"}) + "\n" for d in digits))
    result = _invoke("query", "--index", str(work), "--queries", str(qf), "-k", "1", "--json")
    assert result.exit_code == 0, result.output
    for line in result.output.strip().splitlines():
        answer = json.loads(line)
        (hit,) = answer["hits"]
        assert gt[(hit["uri"], "video", hit["start_s"])] == answer["id"]


def test_summary_out_is_written_even_when_the_run_fails(tmp_path):
    out = tmp_path / "state" / "last-summary.json"
    result = _invoke("run", "--source", str(tmp_path / "nope"), "--workdir", str(tmp_path / "w"),
                     "--summary-out", str(out))
    assert result.exit_code == 1
    summary = json.loads(out.read_text())
    assert summary["exit_code"] == 1 and "nope" in summary["error"]
    assert (tmp_path / "w" / "runs" / summary["run_id"] / "summary.json").exists()


def test_two_stage_query_reranks_to_the_float_answer(first_run, archive):
    """With candidates covering the whole shard, the Hamming prefilter keeps everything and the
    exact re-rank must give the float search's answer; the top hit shows the queried digit."""
    work, _ = first_run
    gt = _ground_truth(archive)
    args = ["query", "--index", str(work), "--text", "seven", "--modality", "video", "-k", "3", "--json"]
    float_hits = json.loads(_invoke(*args).output.strip().splitlines()[-1])["hits"]
    result = _invoke(*args, "--two-stage", "--candidates", "1000")
    assert result.exit_code == 0, result.output
    hits = json.loads(result.output.strip().splitlines()[-1])["hits"]
    assert [h["segment_id"] for h in hits] == [h["segment_id"] for h in float_hits]
    assert gt[(hits[0]["uri"], "video", hits[0]["start_s"])] == 7
