"""Progress of a local index build: the caller's callback plus done/total, rate and ETA logs."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]


class Progress:
    """Calls the user's callback and logs done/total, rate and ETA every few seconds."""

    def __init__(self, callback: ProgressFn | None, log_every_s: float = 10.0) -> None:
        self._callback = callback
        self._log_every_s = log_every_s
        self._started: dict[str, float] = {}
        self._last_log: dict[str, float] = {}
        self._last_call = time.monotonic()

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if stage not in self._started:  # a stage starts where the previous report left off
            self._started[stage] = self._last_log[stage] = self._last_call
        self._last_call = now
        if now - self._last_log[stage] >= self._log_every_s or (total and done >= total):
            self._last_log[stage] = now
            elapsed = now - self._started[stage]
            speed = ""
            if elapsed >= 1.0 and done:
                rate = done / elapsed
                speed = f", {rate:.0f}/s" + (f", ETA {(total - done) / rate:.0f} s" if total else "")
            logger.info("index build %s: %d/%s%s", stage, done, total or "?", speed)
        if self._callback is not None:
            self._callback(stage, done, total)
