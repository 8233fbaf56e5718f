"""`xmodal-index query` as a user runs it on the bundled sample archive (as `make demo` does)."""

import json
import shutil

import pytest
from click.testing import CliRunner

from tests.query_fixtures import ROOT, ground_truth, sample_work
from xmodal_index.jobs.query_cmd import query


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return sample_work(tmp_path_factory)


def _query(*args):
    return CliRunner().invoke(query, [str(a) for a in args], catch_exceptions=False)


def _answers(result):
    return [json.loads(line) for line in result.stdout.strip().splitlines()]


def test_empty_text_is_bad_input(sample):
    _, work = sample
    result = _query("--index", work, "--text", "  ", "--json")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "text must be a non-empty string" in result.stderr


def test_demo_image_query_shows_speech_and_captions_in_its_top_5(sample, tmp_path):
    """examples/sample_queries.jsonl as `make demo` runs it: its paths are relative to its own folder."""
    archive, work = sample
    examples = archive.parent / "examples"
    examples.mkdir(exist_ok=True)
    shutil.copy(ROOT / "examples" / "sample_queries.jsonl", examples / "sample_queries.jsonl")
    result = _query("--index", work, "--queries", examples / "sample_queries.jsonl", "-k", "5", "--json")
    assert result.exit_code == 0, result.output
    answers = {a["id"]: a["hits"] for a in _answers(result)}
    (image_query,) = [q for q in answers if q.startswith("handwritten 7")]
    top5 = answers[image_query]
    assert {h["modality"] for h in top5} == {"audio", "text"}
    gt = ground_truth(archive)
    top_audio = next(h for h in top5 if h["modality"] == "audio")
    assert gt[(top_audio["uri"], "audio", top_audio["start_s"])] == 7
    (clip_query,) = [q for q in answers if q.startswith("speech at 1-2 s")]
    spoken = gt[(str(archive / "videos" / "clip_00.mp4"), "audio", 1.0)]
    top_video = answers[clip_query][0]
    assert gt[(top_video["uri"], "video", top_video["start_s"])] == spoken


def test_raw_score_merge_is_what_swamped_the_list(sample):
    """The same query merged by raw score: one modality fills the top 5 (why rrf is the default)."""
    archive, work = sample
    result = _query("--index", work, "--image", archive / "images" / "img_01.png", "--modality", "audio,text",
                    "-k", "5", "--fusion", "score", "--json")
    assert result.exit_code == 0, result.output
    (answer,) = _answers(result)
    assert len({h["modality"] for h in answer["hits"]}) == 1


def test_per_modality_groups_the_best_k_of_each_stream(sample):
    _, work = sample
    result = _query("--index", work, "--text", "seven", "--per-modality", "2", "--modality", "video,audio",
                    "--json")
    assert result.exit_code == 0, result.output
    (answer,) = _answers(result)
    assert [h["modality"] for h in answer["hits"]] == ["video", "video", "audio", "audio"]
    for group in (answer["hits"][:2], answer["hits"][2:]):
        assert group[0]["score"] >= group[1]["score"]


@pytest.mark.parametrize("modality", ["audio", "video"])
def test_one_second_excerpt_finds_its_own_segment_first(sample, modality):
    archive, work = sample
    clip = archive / "videos" / "clip_02.mp4"
    result = _query("--index", work, f"--{modality}", clip, "--start", "3", "--end", "4",
                    "--modality", modality, "-k", "3", "--json")
    assert result.exit_code == 0, result.output
    (answer,) = _answers(result)
    top = answer["hits"][0]
    assert (top["uri"], top["start_s"], top["end_s"]) == (str(clip), 3.0, 4.0)
    assert top["score"] > 0.999


def test_segments_mode_matches_each_query_segment_to_its_moment(sample):
    archive, work = sample
    clip = archive / "videos" / "clip_01.mp4"
    result = _query("--index", work, "--audio", clip, "--start", "2", "--end", "5", "--segments", "per-segment",
                    "--modality", "audio", "-k", "1", "--json")
    assert result.exit_code == 0, result.output
    answers = _answers(result)
    assert [(a["query_start_s"], a["query_end_s"]) for a in answers] == [(2.0, 3.0), (3.0, 4.0), (4.0, 5.0)]
    for a in answers:
        (hit,) = a["hits"]
        assert (hit["uri"], hit["start_s"]) == (str(clip), a["query_start_s"])


def test_segments_fused_gives_one_list_of_the_best_moments(sample):
    archive, work = sample
    clip = archive / "videos" / "clip_01.mp4"
    result = _query("--index", work, "--audio", clip, "--segments", "fused", "--modality", "audio", "-k", "8",
                    "--json")
    assert result.exit_code == 0, result.output
    (answer,) = _answers(result)
    own = [h for h in answer["hits"] if h["uri"] == str(clip)]
    assert len(own) == 8 and all(h["score"] > 0.999 for h in own)


def test_start_after_end_is_refused(sample):
    archive, work = sample
    result = _query("--index", work, "--audio", archive / "videos" / "clip_01.mp4", "--start", "3", "--end", "2")
    assert result.exit_code == 1
    assert "end_s = 2.0 must be greater than start_s = 3.0" in result.stderr


def test_queries_file_resolves_paths_against_its_folder_and_names_bad_lines(sample, tmp_path):
    archive, work = sample
    folder = tmp_path / "batch"
    folder.mkdir()
    shutil.copy(archive / "audio" / "utt_08.wav", folder / "spoken.wav")
    lines = [
        json.dumps({"id": "ok-1", "audio": "spoken.wav", "modality": "audio"}),
        "{not json",
        json.dumps({"id": "missing", "image": "nope.png"}),
        json.dumps({"id": "empty", "text": ""}),
        json.dumps({"id": "ok-2", "text": "three"}),
    ]
    qf = folder / "q.jsonl"
    qf.write_text("\n".join(lines) + "\n")
    result = _query("--index", work, "--queries", qf, "-k", "1", "--json")
    assert result.exit_code == 1
    assert [a["id"] for a in _answers(result)] == ["ok-1", "ok-2"]
    errors = result.stderr.strip().splitlines()
    assert errors[0].startswith(f"xmodal-index query: error: {qf}:2: not a JSON object")
    assert f"{qf}:3: image file" in errors[1] and "does not exist" in errors[1]
    assert f"{qf}:4: text must be a non-empty string" in errors[2]
    assert "3 queries" in errors[3]


def test_on_error_stop_ends_the_batch_at_the_first_bad_line(sample, tmp_path):
    _, work = sample
    qf = tmp_path / "q.jsonl"
    qf.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"video": 3}) + "\n"
                  + json.dumps({"text": "two"}) + "\n")
    result = _query("--index", work, "--queries", qf, "--on-error", "stop", "--json")
    assert result.exit_code == 1
    assert [a["id"] for a in _answers(result)] == [1]
    assert f"{qf}:2: video must be a file path" in result.stderr


@pytest.mark.parametrize("value, message", [
    ("[1, 2, 3]", "this index needs 256 numbers"),
    (json.dumps([float("nan")] + [0.0] * 255).replace("NaN", "NaN"), "NaN or infinite"),
    ('"seven"', "must be a list of 256 numbers"),
])
def test_bad_embedding_is_refused_by_name(sample, value, message):
    _, work = sample
    result = _query("--index", work, "--embedding", value)
    assert result.exit_code != 0
    assert message in result.output
