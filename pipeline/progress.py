"""Process-local progress counters read by the local progress display.

Beam metrics are the progress record for every runner; these counters add a live
view for in-process runs (DirectRunner in-memory / multi-threaded), where the DoFns
and the job share one process.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_counts = {"items_done": 0, "items_failed": 0, "segments": 0}


def add(name: str, n: int = 1) -> None:
    with _lock:
        _counts[name] = _counts.get(name, 0) + n


def snapshot() -> dict[str, int]:
    with _lock:
        return dict(_counts)


def reset() -> None:
    with _lock:
        for k in _counts:
            _counts[k] = 0
