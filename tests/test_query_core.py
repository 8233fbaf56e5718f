"""The query core (xmodal_index.query) and the Python API at the import root."""

import ast
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import xmodal_index
from tests.query_fixtures import ROOT, ground_truth, sample_work
from xmodal_index.query import fusion as fu
from xmodal_index.query.errors import BadQueryError, QueryError
from xmodal_index.query.hits import Hit
from xmodal_index.query.request import Query, check_embedding


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return sample_work(tmp_path_factory)


@pytest.fixture(scope="module")
def index(sample):
    _, work = sample
    with xmodal_index.open(str(work)) as opened:
        yield opened


# ---------------------------------------------------------------- rules that need no index


def test_query_package_imports_no_beam_click_or_jobs():
    forbidden = ("apache_beam", "click", "xmodal_index.jobs", "xmodal_index.pipeline.dag",
                 "xmodal_index.pipeline.decode_segments")
    offenders = []
    for path in sorted((ROOT / "query").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            offenders += [f"{path.name}: {n}" for n in names if any(n == b or n.startswith(b + ".") for b in forbidden)]
    assert offenders == []


def test_importing_the_package_loads_nothing_heavy():
    code = ("import sys, xmodal_index\n"
            "print(','.join(m for m in ('torch', 'faiss', 'numpy', 'apache_beam', 'click', 'av') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("kwargs, message", [
    ({}, "give exactly one of"),
    ({"text": "a", "image": "b.png"}, "got text, image"),
    ({"text": ""}, "text must be a non-empty string"),
    ({"text": " \n"}, "text must be a non-empty string"),
    ({"text": "seven", "start_s": 1.0}, "start_s/end_s apply to audio and video queries"),
    ({"image": "x.png", "end_s": 1.0}, "apply to audio and video queries, not image"),
    ({"audio": "x.wav", "start_s": -1.0}, "start_s = -1.0 must be a number of seconds >= 0"),
    ({"audio": "x.wav", "start_s": 2.0, "end_s": 2.0}, "must be greater than start_s"),
    ({"audio": "x.wav", "end_s": float("nan")}, "end_s = nan"),
])
def test_bad_queries_are_refused_with_one_line(kwargs, message):
    with pytest.raises(BadQueryError, match=None) as err:
        Query.of(**kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("value, message", [
    ([0.1] * 3, "needs 4 numbers"),
    ([0.1, float("inf"), 0.0, 0.0], "NaN or infinite"),
    ([0.0] * 4, "zero vector"),
    ("0.1,0.2", "must be a list"),
    ([[0.1, 0.2], [0.3, 0.4]], "needs 4 numbers"),
])
def test_bad_embeddings_are_refused(value, message):
    with pytest.raises(BadQueryError) as err:
        check_embedding(value, 4)
    assert message in str(err.value)


def test_embedding_is_normalised_to_one_float32_row():
    vec = check_embedding([3, 4, 0, 0], 4)
    assert vec.dtype == np.float32 and vec.shape == (1, 4)
    assert np.allclose(vec, [[0.6, 0.8, 0, 0]])


def _hit(modality, score, sid):
    return Hit(uri=f"{modality}-{sid}", modality=modality, start_s=0.0, end_s=1.0, score=score, segment_id=sid)


def _fuse(ranked, k, method):
    return fu.fuse(ranked, k, method, score=lambda h: h.score, tie=lambda h: h.segment_id,
                   rescore=lambda h, s: Hit(h.uri, h.modality, h.start_s, h.end_s, s, h.segment_id, h.text))


def test_rrf_interleaves_modalities_whose_scores_live_on_other_scales():
    ranked = {"text": [_hit("text", 0.9 - i / 100, i) for i in range(5)],
              "audio": [_hit("audio", 0.3 - i / 100, 10 + i) for i in range(5)]}
    assert [h.modality for h in _fuse(ranked, 4, "score")] == ["text"] * 4
    fused = _fuse(ranked, 4, "rrf")
    assert [h.modality for h in fused] == ["text", "audio", "text", "audio"]
    assert [h.score for h in fused] == sorted((h.score for h in fused), reverse=True)
    assert fused[0].score == pytest.approx(1 / (fu.RRF_K + 1))


def test_zscore_ranks_each_modality_against_its_own_scores():
    ranked = {"text": [_hit("text", s, i) for i, s in enumerate([0.95, 0.90, 0.89, 0.88])],
              "audio": [_hit("audio", s, 10 + i) for i, s in enumerate([0.40, 0.20, 0.19, 0.18])]}
    fused = _fuse(ranked, 2, "zscore")
    assert {h.modality for h in fused} == {"text", "audio"}


def test_one_modality_keeps_raw_scores_whatever_the_fusion():
    ranked = {"video": [_hit("video", 0.8, 1), _hit("video", 0.7, 2)]}
    for method in fu.FUSIONS:
        assert [h.score for h in _fuse(ranked, 2, method)] == [0.8, 0.7]


# ---------------------------------------------------------------- the API on the sample archive


def test_open_takes_a_workdir_or_an_index_root(sample, index):
    _, work = sample
    with xmodal_index.open(str(work / "indexes" / "main"), version=index.version) as other:
        assert other.version == index.version == "v000001"
        assert other.manifest.model_id == index.manifest.model_id


def test_open_names_what_is_missing(tmp_path):
    with pytest.raises(QueryError) as err:
        xmodal_index.open(str(tmp_path))
    assert "no published index version" in str(err.value) and str(tmp_path) in str(err.value)


def test_open_refuses_a_tampered_version(sample, tmp_path):
    _, work = sample
    copy = tmp_path / "work"
    shutil.copytree(work / "indexes", copy / "indexes")
    ids = next((copy / "indexes" / "main" / "v000001").glob("*.ids.parquet"))
    data = bytearray(ids.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ids.write_bytes(bytes(data))
    with pytest.raises(QueryError) as err:
        xmodal_index.open(str(copy))
    assert ids.name in str(err.value)


def test_search_returns_typed_hits_that_show_the_queried_digit(sample, index):
    archive, _ = sample
    hits = index.search(text="seven", k=3, modalities=["video"])
    assert len(hits) == 3 and all(isinstance(h, xmodal_index.Hit) for h in hits)
    gt = ground_truth(archive)
    assert gt[(hits[0].uri, "video", hits[0].start_s)] == 7
    assert hits[0].end_s > hits[0].start_s


def test_embedding_query_of_a_text_finds_what_the_text_finds(index):
    vec, _ = index.embed(Query("text", "four"))
    by_text = index.search(text="four", k=5, modalities="image,video")
    by_vec = index.search(embedding=vec[0].tolist(), k=5, modalities="image,video")
    assert [h.segment_id for h in by_vec] == [h.segment_id for h in by_text]


def test_per_modality_returns_k_of_each_stream_in_the_asked_order(index):
    hits = index.search(text="two", per_modality=3, modalities=["text", "image"])
    assert [h.modality for h in hits] == ["text"] * 3 + ["image"] * 3


def test_audio_range_of_an_indexed_clip_finds_that_moment(sample, index):
    archive, _ = sample
    clip = archive / "videos" / "clip_03.mp4"
    (top, *_) = index.search(audio=str(clip), start_s=5.0, end_s=6.0, modalities="audio", k=2)
    assert (top.uri, top.start_s, top.end_s) == (str(clip), 5.0, 6.0)


def test_to_arrow_holds_every_live_row_of_the_version(index):
    table = index.to_arrow()
    assert table.num_rows == index.manifest.ntotal
    assert set(table.column_names) >= {"segment_id", "uri", "modality", "start_s", "end_s", "text"}
    assert "vector_row" not in table.column_names
    counts = {m: c for m, c in zip(*np.unique(table.column("modality").to_numpy(zero_copy_only=False),
                                              return_counts=True))}
    assert counts == {s: n for s, n in index.manifest.metrics["ntotal"].items()}


def test_to_pandas_is_the_same_rows(index):
    pytest.importorskip("pandas")
    frame = index.to_pandas()
    assert len(frame) == index.manifest.ntotal


def test_hit_json_has_the_contract_fields(index):
    (hit,) = index.search(text="nine", k=1)
    assert set(hit.to_json()) == {"uri", "modality", "start_s", "end_s", "score", "segment_id", "text"}
    json.dumps(hit.to_json())


def test_query_core_and_its_decoding_load_no_beam_or_click():
    code = ("import sys\n"
            "import xmodal_index.query.core, xmodal_index.query.batch, xmodal_index.pipeline.decode\n"
            "print(','.join(m for m in ('apache_beam', 'click', 'xmodal_index.jobs') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
