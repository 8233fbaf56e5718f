"""Live progress counters of a run, readable from the job whatever the runner mode.

DoFns call :func:`add` (items done or failed, segments, media-seconds decoded).
Beam metrics stay the record of a finished run; these counters are the live view.
While a run's :class:`ProgressRecorder` is active, every :func:`add` also appends
one line (``name value``) to a file of its own process in the recorder's folder,
named by the ``XMODAL_PROGRESS_DIR`` environment variable. Beam's DirectRunner
starts its ``multi_processing`` workers with the job's environment, so counts made
in worker threads and in worker processes reach the same folder; the recorder
sums the files. Without a recorder, :func:`add` keeps process-local counts only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator

ENV_DIR = "XMODAL_PROGRESS_DIR"
COUNTERS = ("items_done", "items_failed", "segments", "media_s")

_lock = threading.Lock()
_counts: dict[str, float] = dict.fromkeys(COUNTERS, 0)
_active: ProgressRecorder | None = None


def add(name: str, n: float = 1) -> None:
    """Count ``n`` more of ``name`` (in this process, and in the run's folder when one is set)."""
    with _lock:
        _counts[name] = _counts.get(name, 0) + n
    folder = os.environ.get(ENV_DIR)
    if folder:
        _append(folder, f"{name} {n!r}\n")


def _append(folder: str, line: str) -> None:
    try:
        fd = os.open(os.path.join(folder, f"{os.getpid()}.counts"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError:
        return  # the run ended and took its folder along: nobody is reading any more
    try:
        os.write(fd, line.encode())  # one small O_APPEND write: whole lines, even from several threads
    finally:
        os.close(fd)


def snapshot() -> dict[str, float]:
    """The run's counts while a recorder is active (all workers), else this process's."""
    recorder = _active
    if recorder is not None:
        return recorder.totals()
    with _lock:
        return dict(_counts)


def reset() -> None:
    with _lock:
        for k in list(_counts):
            _counts[k] = 0


class ProgressRecorder:
    """The counts of every worker of one run, summed from the per-process files of its folder."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        self._offsets: dict[str, int] = {}
        self._partial: dict[str, bytes] = {}
        self._totals: dict[str, float] = dict.fromkeys(COUNTERS, 0)

    def totals(self) -> dict[str, float]:
        """Read what the workers appended since the last call; the totals so far."""
        with self._lock:
            try:
                names = sorted(os.listdir(self.folder))
            except OSError:
                return dict(self._totals)
            for name in names:
                self._read(name)
            return dict(self._totals)

    def _read(self, name: str) -> None:
        try:
            with open(os.path.join(self.folder, name), "rb") as f:
                f.seek(self._offsets.get(name, 0))
                data = f.read()
        except OSError:
            return
        self._offsets[name] = self._offsets.get(name, 0) + len(data)
        data = self._partial.pop(name, b"") + data
        lines = data.split(b"\n")
        if lines[-1]:
            self._partial[name] = lines[-1]  # a line still being written
        for line in lines[:-1]:
            key, _, value = line.decode(errors="replace").partition(" ")
            try:
                self._totals[key] = self._totals.get(key, 0) + float(value)
            except ValueError:
                continue


@contextlib.contextmanager
def recording() -> Iterator[ProgressRecorder]:
    """Count the run started inside the block, in every worker thread and process it starts."""
    global _active
    folder = tempfile.mkdtemp(prefix="xmodal-progress-")
    previous = os.environ.get(ENV_DIR)
    os.environ[ENV_DIR] = folder
    recorder = ProgressRecorder(folder)
    reset()
    _active = recorder
    try:
        yield recorder
    finally:
        _active = None
        if previous is None:
            os.environ.pop(ENV_DIR, None)
        else:
            os.environ[ENV_DIR] = previous
        shutil.rmtree(folder, ignore_errors=True)
