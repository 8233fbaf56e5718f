"""The progress of a run's DAG on stderr: a tqdm bar on a terminal, plain lines otherwise.

Fed by pipeline/progress.py's recorder, so it moves under every DirectRunner mode
(in_memory, multi_threading, multi_processing): items done and failed out of the
work list, media-seconds decoded and media-seconds per second of wall time,
elapsed time, and an ETA once one item has finished (blank before: no rate yet).
When stderr is not a terminal (nightly logs) a line is written every ``every_s``
seconds and once at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import sys
import threading
import time
from collections.abc import Iterator
from typing import IO

from xmodal_index.pipeline import progress

DEFAULT_EVERY_S = 30.0  # seconds between two plain progress lines
BAR_REFRESH_S = 0.5


@dataclasses.dataclass(frozen=True)
class ProgressSettings:
    """How `run` shows progress: ``enabled`` (False: nothing), ``every_s`` between plain lines."""

    enabled: bool = True
    every_s: float = DEFAULT_EVERY_S


_settings = ProgressSettings()


def configure(settings: ProgressSettings) -> None:
    """Set by the `run` command from --progress/--no-progress and --progress-every-s."""
    global _settings
    _settings = settings


def clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@dataclasses.dataclass(frozen=True)
class Reading:
    """One look at a run's progress."""

    total: int
    done: int
    failed: int
    media_s: float
    elapsed_s: float

    @property
    def finished(self) -> int:
        return self.done + self.failed

    @property
    def media_rate(self) -> float:
        return self.media_s / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the item rate so far; None until an item has finished."""
        if self.finished <= 0 or self.elapsed_s <= 0:
            return None
        return max(self.total - self.finished, 0) * self.elapsed_s / self.finished

    def line(self) -> str:
        eta = self.eta_s
        return (f"items {self.finished}/{self.total} ({self.failed} failed)  "
                f"media {self.media_s:.1f} s ({self.media_rate:.1f} media-s/s)  "
                f"elapsed {clock(self.elapsed_s)}  ETA {clock(eta) if eta is not None else ''}").rstrip()


class _Display:
    def __init__(self, total: int, stream: IO[str], bar: bool, every_s: float) -> None:
        self._total, self._stream, self._every_s = total, stream, every_s
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._bar = None
        if bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="item", file=stream, dynamic_ncols=True, leave=True,
                             bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} items{postfix}")
        self._thread = threading.Thread(target=self._loop, name="run-progress", daemon=True)

    def reading(self) -> Reading:
        s = progress.snapshot()
        return Reading(self._total, int(s.get("items_done", 0)), int(s.get("items_failed", 0)),
                       float(s.get("media_s", 0.0)), time.monotonic() - self._t0)

    def _show(self, r: Reading) -> None:
        if self._bar is not None:
            eta = r.eta_s
            self._bar.n = min(r.finished, self._total)
            self._bar.set_postfix_str(f"{r.failed} failed, {r.media_s:.0f} media-s ({r.media_rate:.1f}/s), "
                                      f"elapsed {clock(r.elapsed_s)}, ETA {clock(eta) if eta is not None else ''}",
                                      refresh=False)
            self._bar.refresh()
        else:
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            self._stream.write(f"{stamp} progress: {r.line()}\n")
            self._stream.flush()

    def _loop(self) -> None:
        wait = BAR_REFRESH_S if self._bar is not None else self._every_s
        while not self._stop.wait(wait):
            self._show(self.reading())

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._show(self.reading())
        if self._bar is not None:
            self._bar.close()


@contextlib.contextmanager
def run_progress(total: int, enabled: bool = True, stream: IO[str] | None = None) -> Iterator[None]:
    """Record the progress of the DAG run inside the block and show it on ``stream``
    (stderr): a bar when it is a terminal, a line every ``every_s`` otherwise."""
    stream = stream if stream is not None else sys.stderr
    with progress.recording():
        if not (enabled and _settings.enabled) or total <= 0:
            yield
            return
        isatty = getattr(stream, "isatty", lambda: False)
        display = _Display(total, stream, bar=bool(isatty()), every_s=_settings.every_s)
        display.start()
        try:
            yield
        finally:
            display.stop()
