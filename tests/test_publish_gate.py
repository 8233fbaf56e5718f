"""The publish gate: regressed versions stay unpublished unless forced."""

from __future__ import annotations

import dataclasses

import pytest

from tests.test_loader import Archive
from xmodal_index.sinks.errors import IndexVersionError
from xmodal_index.sinks.index import manifest as mf
from xmodal_index.sinks.index.build import IndexBuildConfig
from xmodal_index.sinks.index.publish import publish, read_state
from xmodal_index.sinks.index.publish_gate import (
    Deletion,
    GateConfig,
    gate,
    map_figures,
)


def _manifest(version: str, recall: float | None = 0.95, binary: float | None = 0.97, ntotal: int = 150,
              **extra) -> mf.Manifest:
    return mf.Manifest(
        version=version, created_at="2026-01-01T00:00:00Z", parent_version=None, model_id="m@1", dim=8, bits=16,
        metric="ip", index_factory={"float": "Flat", "binary": "BFlat"}, shards=(), id_maps=(), files=(),
        ntotal=ntotal, metrics={"recall_at_10": {"float": recall, "binary": binary}, **extra}, search_params={},
    )


def publish_gated(root, version, config=None, force=False, deletion=None):
    """The publish step with the gate; returns the gate's decision (published or not)."""
    result = publish(root, version, expected=read_state(root), gate_config=config or GateConfig(), force=force,
                     deletion=deletion)
    assert result.published == result.decision.published
    return result.decision



# ---------------------------------------------------------------- decisions


def test_the_first_version_passes():
    decision = gate(_manifest("v000001"), None)
    assert decision.ok and "first" in decision.reason


def test_a_drop_within_the_tolerance_passes():
    assert gate(_manifest("v000002", recall=0.935), _manifest("v000001", recall=0.95)).ok


def test_a_recall_drop_beyond_the_tolerance_fails_naming_the_metric():
    decision = gate(_manifest("v000002", recall=0.90), _manifest("v000001", recall=0.95))
    assert not decision.ok
    assert "recall_at_10/float 0.9000 vs 0.9500" in decision.reason
    assert [c.metric for c in decision.checks if not c.ok] == ["recall_at_10/float"]


def test_a_binary_recall_drop_fails_too():
    assert not gate(_manifest("v000002", binary=0.5), _manifest("v000001", binary=0.97)).ok


def test_the_tolerance_is_configurable():
    candidate, current = _manifest("v000002", recall=0.90), _manifest("v000001", recall=0.95)
    assert gate(candidate, current, GateConfig(tolerance_recall=0.06)).ok


def test_a_map_drop_fails_for_flat_and_nested_figures():
    current = _manifest("v000001", map_t2i_64=0.60, map={"audio->image": {"float": 0.70}})
    flat = _manifest("v000002", map_t2i_64=0.50, map={"audio->image": {"float": 0.70}})
    nested = _manifest("v000002", map_t2i_64=0.60, map={"audio->image": {"float": 0.65}})
    assert "map_t2i_64" in gate(flat, current).reason and not gate(flat, current).ok
    assert "map/audio->image/float" in gate(nested, current).reason and not gate(nested, current).ok


def test_map_figures_are_found_by_name_at_any_depth():
    metrics = {"map_i2t_16": 0.4, "mAP": {"a->b": {"float": 0.5, "64": 0.3}}, "recall_at_10": {"float": 1.0},
               "map_protocol": "text is not a figure"}
    assert map_figures(metrics) == {"map_i2t_16": 0.4, "mAP/a->b/64": 0.3, "mAP/a->b/float": 0.5}


def test_a_candidate_without_labels_is_not_compared_on_map():
    decision = gate(_manifest("v000002"), _manifest("v000001", map_t2i_64=0.6))
    assert decision.ok
    assert "not measured" in decision.reason


def test_a_candidate_lacking_recall_the_current_version_has_fails():
    decision = gate(_manifest("v000002", recall=None), _manifest("v000001"))
    assert not decision.ok
    assert "recall_at_10/float missing" in decision.reason


@pytest.mark.parametrize("field", ["tolerance_recall", "tolerance_map", "max_deleted_fraction",
                                   "max_ntotal_drop_fraction"])
@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_gate_config_rejects_fractions_outside_0_1(field, value):
    with pytest.raises(ValueError, match=field):
        GateConfig(**{field: value})


# ---------------------------------------------------------------- mass deletion


def test_deleting_more_than_a_fifth_of_the_live_items_is_refused_by_default():
    decision = gate(_manifest("v000002", ntotal=140), _manifest("v000001"), deletion=Deletion(31, 150))
    assert not decision.ok
    assert "deleted 31 of 150 live items (20.7%), over max_deleted_fraction 0.2" in decision.reason


def test_deleting_up_to_the_limit_passes_and_is_named_in_the_reason():
    decision = gate(_manifest("v000002", ntotal=140), _manifest("v000001"), deletion=Deletion(30, 150))
    assert decision.ok
    assert "deleted 30 of 150 live items (20.0%), within max_deleted_fraction 0.2" in decision.reason
    assert "ntotal 140 vs 150" in decision.reason


def test_an_index_shrinking_from_150_to_14_vectors_is_refused_even_without_deletion_counts():
    decision = gate(_manifest("v000002", ntotal=14), _manifest("v000001", ntotal=150))
    assert not decision.ok
    assert "ntotal 14 vs 150 (90.7% fewer vectors), over max_ntotal_drop_fraction 0.5" in decision.reason


def test_the_deletion_limits_are_configurable():
    config = GateConfig(max_deleted_fraction=0.95, max_ntotal_drop_fraction=0.95)
    assert gate(_manifest("v000002", ntotal=14), _manifest("v000001"), config, Deletion(136, 150)).ok


def test_growth_is_never_a_drop():
    assert gate(_manifest("v000002", ntotal=1000), _manifest("v000001", ntotal=150), deletion=Deletion(0, 150)).ok


def test_a_deletion_count_above_the_live_items_is_rejected():
    with pytest.raises(ValueError, match="deleted"):
        Deletion(5, 4)


# ---------------------------------------------------------------- publishing built versions


def _good(root) -> mf.Manifest:
    return Archive({"video": 3000}, seed=11).build(root, IndexBuildConfig(float_factory="Flat", recall_sample=100))


def _regressed(root) -> mf.Manifest:
    # 4-byte PQ codes without re-ranking: recall@10 far below the exact index's 1.0
    config = IndexBuildConfig(float_factory="IVF16,PQ4np", store_vectors=False, recall_sample=100)
    return Archive({"video": 3000}, seed=11).build(root, config, publish=False)


def test_a_regressed_version_is_not_promoted(tmp_path):
    root = str(tmp_path / "idx")
    _good(root)
    candidate = _regressed(root)
    assert candidate.metrics["recall_at_10"]["float"] < 0.9
    decision = publish_gated(root, candidate.version, GateConfig())
    assert (decision.ok, decision.published) == (False, False)
    assert mf.read_latest(root) == "v000001"
    assert "regressed" in decision.reason and "recall_at_10/float" in decision.reason


def test_force_publishes_a_regressed_version_and_says_so(tmp_path):
    root = str(tmp_path / "idx")
    _good(root)
    candidate = _regressed(root)
    decision = publish_gated(root, candidate.version, GateConfig(), force=True)
    assert (decision.ok, decision.published, decision.forced) == (False, True, True)
    assert decision.reason.startswith("forced: ")
    assert mf.read_latest(root) == candidate.version


def test_a_version_that_does_not_regress_becomes_latest(tmp_path):
    root = str(tmp_path / "idx")
    _good(root)
    again = Archive({"video": 3000}, seed=11).build(root, IndexBuildConfig(float_factory="Flat", recall_sample=100),
                                                    publish=False)
    assert mf.read_latest(root) == "v000001"
    decision = publish_gated(root, again.version)
    assert decision.published and mf.read_latest(root) == again.version


def test_the_first_built_version_is_published(tmp_path):
    root = str(tmp_path / "idx")
    candidate = _regressed(root)
    assert publish_gated(root, candidate.version).published
    assert mf.read_latest(root) == candidate.version


def test_an_unreadable_current_version_does_not_block_publishing(tmp_path):
    root = str(tmp_path / "idx")
    first = _good(root)
    (tmp_path / "idx" / first.version / mf.MANIFEST_NAME).write_text("{broken")
    candidate = _regressed(root)
    decision = publish_gated(root, candidate.version)
    assert decision.published and "unreadable" in decision.reason


def test_a_shrunken_version_is_refused_until_forced(tmp_path):
    root = str(tmp_path / "idx")
    _good(root)
    small = Archive({"video": 300}, seed=11).build(root, IndexBuildConfig(float_factory="Flat", recall_sample=100),
                                                   publish=False)
    refused = publish_gated(root, small.version, deletion=Deletion(2700, 3000))
    assert not refused.published and mf.read_latest(root) == "v000001"
    assert "max_deleted_fraction" in refused.reason and "max_ntotal_drop_fraction" in refused.reason
    forced = publish_gated(root, small.version, deletion=Deletion(2700, 3000), force=True)
    assert forced.published and forced.forced and mf.read_latest(root) == small.version


def test_publishing_a_version_without_manifest_is_an_error(tmp_path):
    with pytest.raises(IndexVersionError, match="v000004"):
        publish_gated(str(tmp_path / "idx"), "v000004")


def test_the_decision_serialises_for_the_run_summary():
    decision = gate(_manifest("v000002", recall=0.5), _manifest("v000001"))
    data = decision.to_dict()
    assert data["ok"] is False
    assert [c["metric"] for c in data["checks"] if not c["ok"]] == ["recall_at_10/float"]
    assert dataclasses.asdict(decision) == data
