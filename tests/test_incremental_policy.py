"""The choice between an incremental version and a full build: one test per rule."""

from __future__ import annotations

import dataclasses

import pytest

from xmodal_index.sinks.index import manifest as mf
from xmodal_index.sinks.index.compaction import IncrementalConfig, decide_build

POLICY = IncrementalConfig(max_deltas=3, max_delta_fraction=0.2, max_tombstone_fraction=0.1)


def _shard(file: str, n: int, kind: str, modality: str = "video") -> mf.ShardEntry:
    return mf.ShardEntry(file=file, sha256="0" * 64, bytes=1, ntotal=n, modality=modality, kind=kind,
                         id_map=file + ".ids")


def parent(*, deltas: int = 0, delta_rows: int = 0, tombstones: int = 0, base_rows: int = 1000,
           delta_recall: float | None = None) -> mf.Manifest:
    shards = [_shard("shard-video-0", base_rows, "float"), _shard("shard-video-0", base_rows, "binary")]
    if delta_rows:
        shards += [dataclasses.replace(_shard("delta-v000002-video", delta_rows, "float"), recall_at_10=delta_recall),
                   _shard("delta-v000002-video", delta_rows, "binary")]
    extra = {"delta_count": deltas}
    if tombstones:
        extra["tombstones"] = {"file": "t.npy", "sha256": "0" * 64, "bytes": 8 * tombstones, "count": tombstones}
    return mf.Manifest(version="v000003", created_at="2026-01-01T00:00:00Z", parent_version="v000002",
                       model_id="m@1", dim=16, bits=32, metric="ip", index_factory={"float": "Flat", "binary": "BFlat"},
                       shards=tuple(shards), id_maps=(), files=(), ntotal=base_rows + delta_rows - tombstones,
                       metrics={}, search_params={}, build_config={"recall_target": 0.95}, extra=extra)


def decide(p=None, **changes):
    args = dict(model_id="m@1", dim=16, bits=32, metric="ip", modalities={"video"}, added_rows=10, deleted_rows=5,
                config=POLICY, rebuild=False)
    args.update(changes)
    return decide_build(parent() if p is None else p, **args)


def test_a_small_change_on_a_compatible_parent_is_incremental():
    assert decide().incremental


def test_rebuild_index_forces_a_full_build():
    assert "--rebuild-index" in decide(rebuild=True).reason and not decide(rebuild=True).incremental


def test_no_parent_means_a_full_build():
    assert not decide_build(None, model_id="m@1", dim=16, bits=32, metric="ip", modalities={"video"}, added_rows=1,
                            deleted_rows=0, config=POLICY).incremental


def test_incremental_versions_can_be_turned_off():
    assert not decide(config=dataclasses.replace(POLICY, enabled=False)).incremental


@pytest.mark.parametrize("change", [{"model_id": "m@2"}, {"dim": 32}, {"bits": 64}, {"metric": "l2"}])
def test_a_model_dim_bits_or_metric_change_retrains(change):
    decision = decide(**change)
    assert not decision.incremental and next(iter(change)) in decision.reason


def test_a_new_modality_needs_a_full_build():
    decision = decide(modalities={"video", "audio"})
    assert not decision.incremental and "audio" in decision.reason


def test_too_many_deltas_compacts():
    assert decide(parent(deltas=2)).incremental
    assert "max_deltas" in decide(parent(deltas=3)).reason
    assert decide(parent(deltas=3), added_rows=0).incremental  # deletions alone add no delta


def test_too_large_a_delta_share_compacts():
    assert decide(parent(delta_rows=150)).incremental
    assert "max_delta_fraction" in decide(parent(delta_rows=150), added_rows=100).reason


def test_too_many_tombstones_compacts():
    assert decide(parent(tombstones=90)).incremental
    assert "max_tombstone_fraction" in decide(parent(tombstones=90), deleted_rows=30).reason


def test_the_policy_refuses_bad_values_with_their_name():
    with pytest.raises(ValueError, match="max_delta_fraction"):
        IncrementalConfig(max_delta_fraction=1.5)
    with pytest.raises(ValueError, match="max_deltas"):
        IncrementalConfig(max_deltas=-1)


def test_the_job_config_takes_an_incremental_table():
    from xmodal_index.jobs.config import ConfigError, config_from_mapping

    assert config_from_mapping({"incremental": {"max_deltas": 4, "enabled": False}}).incremental == IncrementalConfig(
        max_deltas=4, enabled=False)
    with pytest.raises(ConfigError, match=r"\[incremental\] .*max_tombstone_fraction"):
        config_from_mapping({"incremental": {"max_tombstone_fraction": 2.0}})


def test_a_delta_whose_recall_fell_below_the_target_means_drift_and_retrains():
    assert decide(parent(delta_rows=50, delta_recall=0.91)).incremental  # within drift_recall_margin 0.05
    decision = decide(parent(delta_rows=50, delta_recall=0.85))
    assert not decision.incremental and "drift" in decision.reason
