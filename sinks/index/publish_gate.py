"""The publish gate: a new index version becomes LATEST only if it does not regress.

``gate`` compares a candidate manifest with the current one (the version LATEST
names), metric by metric:

- ``recall_at_10`` ("float" and "binary": recall@10 of the ANN indexes against
  exact search on held-out rows, the minimum over shards): the candidate fails when
  it is below the current value minus ``tolerance_recall``, or when it lacks a
  value the current version has (nothing shows it did not regress).
- cross-modal mAP, when labels exist: every number under a metrics key starting
  with "map" (flat, e.g. ``map_t2i_64``, or nested dicts, e.g. ``{"map": {"audio->
  image": {"float": 0.71}}}``), compared name by name where both versions have it;
  it fails below the current value minus ``tolerance_map``. A candidate built
  without labels has no mAP: those figures are listed as not compared.

The first version (no LATEST) always passes. ``publish_gated`` applies the decision:
LATEST moves only when the gate passes, or when forced (the reason says so).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Iterator, Mapping

from xmodal_index.sinks.index import manifest as mf
from xmodal_index.sinks.errors import IndexVersionError

logger = logging.getLogger(__name__)

RECALL_KEY = "recall_at_10"
RECALL_KINDS = ("float", "binary")


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """How far a new version may fall below the current one and still publish.

    tolerance_recall: allowed drop of recall@10 (absolute, 0..1).
    tolerance_map: allowed drop of each cross-modal mAP figure (absolute, 0..1).
    """

    tolerance_recall: float = 0.02
    tolerance_map: float = 0.02

    def __post_init__(self) -> None:
        if not 0.0 <= self.tolerance_recall <= 1.0:
            raise ValueError(f"{self.tolerance_recall = } must be within [0, 1]")
        if not 0.0 <= self.tolerance_map <= 1.0:
            raise ValueError(f"{self.tolerance_map = } must be within [0, 1]")


@dataclasses.dataclass(frozen=True)
class GateCheck:
    """One metric compared: candidate against current, with the allowed drop."""

    metric: str
    candidate: float | None
    current: float | None
    tolerance: float
    ok: bool

    def describe(self) -> str:
        if self.candidate is None:
            return f"{self.metric} missing (current {self.current:.4f})"
        return f"{self.metric} {self.candidate:.4f} vs {self.current:.4f} (tolerance {self.tolerance:g})"


@dataclasses.dataclass(frozen=True)
class GateDecision:
    """ok: the candidate does not regress. published: LATEST now names it.
    reason: one line for the run summary. checks: every comparison made."""

    ok: bool
    reason: str
    published: bool = False
    forced: bool = False
    candidate_version: str | None = None
    current_version: str | None = None
    checks: tuple[GateCheck, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _flatten(prefix: str, value: Any) -> Iterator[tuple[str, float]]:
    if isinstance(value, Mapping):
        for key in sorted(value, key=str):
            yield from _flatten(f"{prefix}/{key}", value[key])
        return
    number = _number(value)
    if number is not None:
        yield prefix, number


def map_figures(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Every mAP number in a manifest's metrics, by its path (``map/audio->image/float``)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if str(key).lower().startswith("map"):
            out.update(_flatten(str(key), value))
    return out


def recall_figures(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """``{"recall_at_10/float": ..., "recall_at_10/binary": ...}`` (None where not measured)."""
    recall = metrics.get(RECALL_KEY)
    recall = recall if isinstance(recall, Mapping) else {}
    return {f"{RECALL_KEY}/{kind}": _number(recall.get(kind)) for kind in RECALL_KINDS}


def gate(candidate: mf.Manifest, current: mf.Manifest | None, config: GateConfig = GateConfig()) -> GateDecision:
    """Whether ``candidate`` may replace ``current`` (None: nothing published yet)."""
    if current is None:
        return GateDecision(True, f"{candidate.version} is the first version", candidate_version=candidate.version)
    if current.version == candidate.version:
        return GateDecision(True, f"{candidate.version} is already the current version",
                            candidate_version=candidate.version, current_version=current.version)
    checks: list[GateCheck] = []
    new_recall, old_recall = recall_figures(candidate.metrics), recall_figures(current.metrics)
    for name, old in old_recall.items():
        if old is None:
            continue
        new = new_recall[name]
        ok = new is not None and new >= old - config.tolerance_recall - 1e-12
        checks.append(GateCheck(name, new, old, config.tolerance_recall, ok))
    new_map, old_map = map_figures(candidate.metrics), map_figures(current.metrics)
    for name in sorted(set(new_map) & set(old_map)):
        ok = new_map[name] >= old_map[name] - config.tolerance_map - 1e-12
        checks.append(GateCheck(name, new_map[name], old_map[name], config.tolerance_map, ok))
    not_compared = sorted(set(old_map) - set(new_map))
    failed = [c for c in checks if not c.ok]
    head = f"{candidate.version} vs {current.version}"
    if failed:
        reason = f"{head}: regressed: " + "; ".join(c.describe() for c in failed)
    else:
        reason = f"{head}: no regression in {len(checks)} metrics"
        if not checks:
            reason = f"{head}: no metrics in common to compare"
    if not_compared:
        reason += f" ({len(not_compared)} mAP figures of {current.version} not measured in {candidate.version})"
    return GateDecision(not failed, reason, candidate_version=candidate.version, current_version=current.version,
                        checks=tuple(checks))


def publish_gated(index_root: str, version: str, config: GateConfig = GateConfig(),
                  force: bool = False) -> GateDecision:
    """Point LATEST at ``version`` if it passes the gate against the current LATEST, or
    when ``force``; otherwise leave LATEST as it is. The decision says which and why.

    Raises IndexVersionError when ``version`` has no readable manifest.
    """
    candidate = mf.read_manifest(index_root, version)
    latest = mf.read_latest(index_root)
    current = None
    unreadable = ""
    if latest is not None and latest != version:
        try:
            current = mf.read_manifest(index_root, latest)
        except IndexVersionError as err:
            unreadable = f" (LATEST {latest} is unreadable, not compared: {err})"
            logger.warning("publish gate: %s", unreadable.strip(" ()"))
    decision = gate(candidate, current, config)
    if unreadable:
        decision = dataclasses.replace(decision, reason=decision.reason + unreadable, current_version=latest)
    if decision.ok or force:
        if latest != version:
            mf.write_latest(index_root, version)
        reason = decision.reason if decision.ok else f"forced: {decision.reason}"
        decision = dataclasses.replace(decision, published=True, forced=not decision.ok, reason=reason)
        logger.info("published %s of %s: %s", version, index_root, decision.reason)
    else:
        logger.warning("not published: %s of %s: %s", version, index_root, decision.reason)
    return decision
