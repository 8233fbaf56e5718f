"""Items finished over a run's time, for the report's throughput plot.

Counts and media seconds go into time buckets that start ``BUCKET_S`` wide and
double in width whenever there would be more than ``MAX_BUCKETS`` of them, and
into totals per kind: what the report holds does not grow with the number of
items.
"""

from __future__ import annotations

import dataclasses

BUCKET_S = 0.05
MAX_BUCKETS = 2048


@dataclasses.dataclass
class KindTotals:
    items: int = 0
    media_s: float = 0.0
    decode_s: float = 0.0


class Timeline:
    """When items finished (seconds since the epoch), done or failed, with their media seconds."""

    def __init__(self, bucket_s: float = BUCKET_S, max_buckets: int = MAX_BUCKETS) -> None:
        self.width = bucket_s
        self._max = max_buckets
        self.done: dict[int, int] = {}
        self.failed: dict[int, int] = {}
        self.media: dict[int, float] = {}
        self.kinds: dict[str, KindTotals] = {}
        self.untimed = 0  # items the run recorded no finish time for

    def add(self, finished_at: float, ok: bool, kind: str = "?", media_s: float = 0.0, decode_s: float = 0.0) -> None:
        if ok:
            totals = self.kinds.setdefault(kind, KindTotals())
            totals.items += 1
            totals.media_s += media_s
            totals.decode_s += decode_s
        if finished_at <= 0:
            self.untimed += 1
            return
        key = int(finished_at // self.width)
        counts = self.done if ok else self.failed
        counts[key] = counts.get(key, 0) + 1
        if ok:
            self.media[key] = self.media.get(key, 0.0) + media_s
        if len(self.done) + len(self.failed) > self._max:
            self._coarsen()

    def _coarsen(self) -> None:
        self.width *= 2
        for name in ("done", "failed", "media"):
            merged: dict[int, float] = {}
            for key, value in getattr(self, name).items():
                merged[key // 2] = merged.get(key // 2, 0) + value
            setattr(self, name, merged)

    @property
    def timed(self) -> int:
        return sum(self.done.values()) + sum(self.failed.values())

    def end(self) -> float | None:
        keys = list(self.done) + list(self.failed)
        return (max(keys) + 1) * self.width if keys else None

    def throughput(self, start: float, bins: int) -> list[tuple[float, float]]:
        """(seconds after ``start``, media-seconds per second) in ``bins`` equal bins up to the last item."""
        end = self.end()
        if end is None or not self.media:
            return []
        width = max(end - start, 1e-3) / bins
        totals = [0.0] * bins
        for key, media_s in self.media.items():
            middle = (key + 0.5) * self.width - start
            totals[min(max(int(middle // width), 0), bins - 1)] += media_s
        return [((k + 0.5) * width, totals[k] / width) for k in range(bins)]

    def cumulative(self, start: float, ok: bool) -> list[tuple[float, int]]:
        """(seconds after ``start``, items finished so far), one point per bucket."""
        counts = self.done if ok else self.failed
        out, total = [], 0
        for key in sorted(counts):
            total += counts[key]
            out.append(((key + 1) * self.width - start, total))
        return out
