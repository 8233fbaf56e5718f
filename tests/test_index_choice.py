"""The budget chooser: which float and binary index a shard gets, and the tuning of its search parameters."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from tests.test_loader import Archive, exact_top10, recall_at_10
from xmodal_index.sinks.index.build import IndexBuildConfig
from xmodal_index.sinks.index.choice import (
    IndexChoiceError,
    choose_factories,
    choose_index,
    float_bytes,
    nlist_for,
    tune_search_params,
    uses_product_quantizer,
)
from xmodal_index.sinks.serving.loader import IndexVersion

GiB, MiB = 1 << 30, 1 << 20


def choose(n: int, budget: int, *, dim: int = 256, bits: int = 64, recall: float = 0.95, total: int | None = None,
           shards: int = 1, train_rows: int = 100_000):
    return choose_index(n, dim, bits, memory_budget_bytes=budget, recall_target=recall, train_rows=train_rows,
                        total_vectors=total, shards=shards)



# ---------------------------------------------------------------- decisions


def test_small_shards_get_exact_indexes():
    choice = choose(10_000, 4 * GiB)
    assert (choice.float_factory, choice.binary_factory) == ("Flat", "BFlat")


def test_a_loose_budget_gives_ivf_flat_for_a_million_vectors():
    choice = choose(1_000_000, 4 * GiB)
    assert choice.float_factory == f"IVF{nlist_for(1_000_000, 100_000)},Flat"
    assert choice.binary_factory.startswith("BIVF")


def test_a_loose_budget_gives_hnsw_for_very_large_shards():
    assert choose(3_000_000, 16 * GiB, recall=0.9).float_factory == "HNSW32"


def test_a_recall_target_above_hnsws_sweet_spot_keeps_ivf_flat():
    assert choose(3_000_000, 16 * GiB, recall=0.99).float_factory.endswith(",Flat")


def test_a_budget_too_small_for_exact_codes_gives_sq8():
    # 1M x 256 floats are 1 GiB: half a GiB holds one byte per dimension
    assert choose(1_000_000, GiB // 2).float_factory.endswith(",SQ8")


def test_a_tight_budget_gives_product_quantization():
    choice = choose(1_000_000, 120 * MiB)
    assert uses_product_quantizer(choice.float_factory)
    assert ",PQ64np" in choice.float_factory
    assert not choice.float_factory.startswith("OPQ")


def test_the_tightest_budgets_put_opq_in_front_of_coarse_codes():
    choice = choose(1_000_000, 48 * MiB)
    assert choice.float_factory.startswith("OPQ")
    assert ",PQ16np" in choice.float_factory or ",PQ8np" in choice.float_factory or ",PQ32np" in choice.float_factory
    m = int(choice.float_factory.split(",")[-1][2:-2])
    assert 256 // m >= 8


def test_small_shards_are_compressed_when_the_version_is_large():
    # each shard is small, but the budget covers the 2M vectors of the whole version
    choice = choose(20_000, 600 * MiB, total=2_000_000, shards=100)
    assert choice.float_factory != "Flat"
    assert choice.estimated_bytes <= 600 * MiB


@pytest.mark.parametrize("n, budget", [(5_000, 64 * MiB), (200_000, 2 * GiB), (200_000, 100 * MiB),
                                       (1_000_000, 300 * MiB), (1_000_000, 40 * MiB), (3_000_000, 64 * GiB)])
def test_the_chosen_index_fits_the_budget(n, budget):
    choice = choose(n, budget)
    assert choice.estimated_bytes <= budget
    per_vector, fixed = float_bytes(choice.float_factory, 256)
    assert choice.bytes_per_vector >= per_vector
    assert choice.reason.startswith(f"float {choice.float_factory}")


def test_no_index_fits_a_budget_below_the_codes_and_ids():
    with pytest.raises(IndexChoiceError, match="memory_budget_bytes = 1000000"):
        choose(1_000_000, 1_000_000)


def test_short_codes_on_many_rows_get_a_hash_index():
    assert choose(500_000, 4 * GiB, bits=16).binary_factory == "BHash16"
    assert choose(500_000, 4 * GiB, bits=64).binary_factory.startswith("BIVF")


def test_nlist_is_capped_by_the_training_rows():
    assert nlist_for(1_000_000, 10**9) == 4000
    assert nlist_for(1_000_000, 3_200) == 100


def test_explicit_factories_win_and_are_sized_when_known():
    config = IndexBuildConfig(float_factory="IVF100,SQ8", binary_factory="BIVF16", memory_budget_bytes=MiB)
    assert choose_factories(10_000, 32, 64, config) == ("IVF100,SQ8", "BIVF16")
    choice = choose_index(10_000, 32, 64, memory_budget_bytes=MiB, recall_target=0.9, train_rows=1000,
                          float_factory="IVF100,SQ8", binary_factory="BIVF16")
    assert choice.bytes_per_vector == (32 + 8) + (8 + 8)
    unknown = choose_index(10, 32, 64, memory_budget_bytes=MiB, recall_target=0.9, train_rows=1000,
                           float_factory="LSH", binary_factory="BFlat")
    assert unknown.estimated_bytes is None


# ---------------------------------------------------------------- tuning


def test_tuning_stops_at_the_smallest_nprobe_reaching_the_target():
    index = faiss.index_factory(8, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    tried = []

    def measure(params):
        tried.append(params["nprobe"])
        return {1: 0.5, 2: 0.8, 4: 0.96}.get(params["nprobe"], 1.0)

    params, recall = tune_search_params(index, binary=False, recall_target=0.95, fixed={}, measure=measure)
    assert (params, recall, tried) == ({"nprobe": 4}, 0.96, [1, 2, 4])
    assert faiss.extract_index_ivf(index).nprobe == 4


def test_tuning_raises_rerank_when_nprobe_alone_cannot_reach_the_target():
    index = faiss.index_factory(8, "IVF4,PQ2np", faiss.METRIC_INNER_PRODUCT)

    def measure(params):
        return 0.5 if params["rerank"] == 4 else 0.97

    params, recall = tune_search_params(index, binary=False, recall_target=0.95, fixed={}, measure=measure,
                                        rerank=True)
    assert params == {"nprobe": 1, "rerank": 16}
    assert recall == 0.97


def test_a_configured_value_is_used_without_search():
    index = faiss.index_factory(8, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    params, _ = tune_search_params(index, binary=False, recall_target=0.95, fixed={"nprobe": 3},
                                   measure=lambda p: 0.1)
    assert params == {"nprobe": 3}


# ---------------------------------------------------------------- builds under a budget


def test_a_tight_budget_builds_product_quantized_shards_that_still_reach_the_target(tmp_path):
    archive = Archive({"video": 3000}, seed=7)
    config = IndexBuildConfig(memory_budget_bytes=170_000, recall_sample=100, train_sample=2000,
                              recall_target=0.9)
    manifest = archive.build(tmp_path / "idx", config)
    floats = [s for s in manifest.shards if s.kind == "float"]
    assert all(uses_product_quantizer(s.factory) for s in floats)
    assert all(s.search_params.get("rerank", 0) > 1 for s in floats)
    assert manifest.metrics["recall_at_10"]["float"] >= 0.9
    assert manifest.index_choice["video"]["estimated_bytes"] <= 170_000
    queries = archive.sample(200)
    with IndexVersion.open(str(tmp_path / "idx")) as index:
        hits = index.search(queries, 10)
    assert recall_at_10(hits, exact_top10(archive, queries)) >= 0.85


def test_a_hash_binary_index_gets_a_tuned_nflip(tmp_path):
    archive = Archive({"image": 3000}, seed=8)
    config = IndexBuildConfig(binary_factory="BHash16", recall_sample=100, recall_target=0.9)
    bits16 = Archive.__new__(Archive)
    bits16.__dict__.update(archive.__dict__)
    bits16.codes = archive.codes[:, :2].copy()
    from xmodal_index.sinks.index.build import build_version

    manifest = build_version(bits16.batches(), str(tmp_path / "idx"), model_id="tiny@feedbeef", dim=32, bits=16,
                             config=config)
    binary = [s for s in manifest.shards if s.kind == "binary"]
    assert [s.factory for s in binary] == ["BHash16"]
    assert "nflip" in binary[0].search_params
    assert binary[0].recall_at_10 >= 0.9
    assert np.isfinite(manifest.metrics["recall_at_10"]["binary"])
