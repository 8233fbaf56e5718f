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

- mass deletion: the share of the current version's live items that the candidate
  no longer holds (``deletion``, counted by the caller from the ledgers) fails
  above ``max_deleted_fraction``; the candidate's ``ntotal`` fails when it is more
  than ``max_ntotal_drop_fraction`` below the current one. An emptied or
  half-missing source never replaces a full index silently.

The first version (no LATEST) always passes. The decision is applied by the one
publish step (``sinks/index/publish.py``): LATEST moves only when the gate passes,
or when forced (the reason says so).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any

from . import manifest as mf

logger = logging.getLogger(__name__)

RECALL_KEY = "recall_at_10"
RECALL_KINDS = ("float", "binary")


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """How far a new version may fall below the current one and still publish.

    tolerance_recall: allowed drop of recall@10 (absolute, 0..1).
    tolerance_map: allowed drop of each cross-modal mAP figure (absolute, 0..1).
    max_deleted_fraction: largest share of the current version's live items one
      new version may drop (0..1; 1 turns the check off).
    max_ntotal_drop_fraction: largest relative drop of ``ntotal`` (vectors) against
      the current version (0..1; 1 turns the check off).
    """

    tolerance_recall: float = 0.02
    tolerance_map: float = 0.02
    max_deleted_fraction: float = 0.2
    max_ntotal_drop_fraction: float = 0.5

    def __post_init__(self) -> None:
        for name in ("tolerance_recall", "tolerance_map", "max_deleted_fraction", "max_ntotal_drop_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} = {value!r} must be within [0, 1]")


@dataclasses.dataclass(frozen=True)
class Deletion:
    """Live items of the current version (``live_before``) and how many of them the
    candidate no longer holds (``deleted``: gone from the source, or now failing)."""

    deleted: int
    live_before: int

    def __post_init__(self) -> None:
        if not 0 <= self.deleted <= max(self.live_before, 0):
            raise ValueError(f"{self.deleted = } must be within [0, live_before = {self.live_before}]")

    @property
    def fraction(self) -> float:
        return self.deleted / self.live_before if self.live_before else 0.0


@dataclasses.dataclass(frozen=True)
class GateCheck:
    """One metric compared: candidate against current, with the allowed drop."""

    metric: str
    candidate: float | None
    current: float | None
    tolerance: float
    ok: bool
    detail: str = ""  # the comparison in words, where the figures alone do not say it

    def describe(self) -> str:
        if self.detail:
            return self.detail
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


def _deletion_check(deletion: Deletion, config: GateConfig) -> GateCheck:
    limit = config.max_deleted_fraction
    ok = deletion.fraction <= limit + 1e-12
    detail = (f"deleted {deletion.deleted} of {deletion.live_before} live items ({deletion.fraction:.1%}), "
              f"{'within' if ok else 'over'} max_deleted_fraction {limit:g}")
    return GateCheck("deleted_fraction", deletion.fraction, 0.0, limit, ok, detail)


def _ntotal_check(candidate: mf.Manifest, current: mf.Manifest, config: GateConfig) -> GateCheck:
    limit = config.max_ntotal_drop_fraction
    drop = max(0.0, 1.0 - candidate.ntotal / current.ntotal) if current.ntotal > 0 else 0.0
    ok = drop <= limit + 1e-12
    detail = (f"ntotal {candidate.ntotal} vs {current.ntotal} ({drop:.1%} fewer vectors), "
              f"{'within' if ok else 'over'} max_ntotal_drop_fraction {limit:g}")
    return GateCheck("ntotal_drop_fraction", float(candidate.ntotal), float(current.ntotal), limit, ok, detail)


def gate(candidate: mf.Manifest, current: mf.Manifest | None, config: GateConfig = GateConfig(),
         deletion: Deletion | None = None) -> GateDecision:
    """Whether ``candidate`` may replace ``current`` (None: nothing published yet).

    ``deletion``: how many of the current version's live items the candidate drops
    (the caller counts them; None when not known, e.g. a version built outside `run`).
    """
    if current is None:
        return GateDecision(True, f"{candidate.version} is the first version", candidate_version=candidate.version)
    if current.version == candidate.version:
        return GateDecision(True, f"{candidate.version} is already the current version",
                            candidate_version=candidate.version, current_version=current.version)
    checks: list[GateCheck] = []
    if deletion is not None:
        checks.append(_deletion_check(deletion, config))
    checks.append(_ntotal_check(candidate, current, config))
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
    guards = [c for c in checks if c.detail and c.ok]  # the mass-deletion guards are always named
    head = f"{candidate.version} vs {current.version}"
    if failed:
        reason = f"{head}: regressed: " + "; ".join(c.describe() for c in failed)
    else:
        compared = len(checks) - len(guards)
        reason = f"{head}: no regression in {compared} metrics" if compared else \
            f"{head}: no metrics in common to compare"
    if guards:
        reason += "; " + "; ".join(c.describe() for c in guards)
    if not_compared:
        reason += f" ({len(not_compared)} mAP figures of {current.version} not measured in {candidate.version})"
    return GateDecision(not failed, reason, candidate_version=candidate.version, current_version=current.version,
                        checks=tuple(checks))
