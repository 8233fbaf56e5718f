"""Crash points of the `run` job, for the resume tests.

``XMODAL_CRASH_AT=<point>`` ends the process with ``os._exit(CRASH_EXIT_CODE)`` at
that point, as a kill would (no cleanup, lease left behind); unset, every hook is a
no-op. The points, in run order, are :data:`CRASH_POINTS`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator

from xmodal_index.pipeline import progress
from xmodal_index.sinks import storage
from xmodal_index.sinks.errors import ObjectNotFoundError

logger = logging.getLogger(__name__)

CRASH_ENV = "XMODAL_CRASH_AT"
CRASH_EXIT_CODE = 86
CRASH_POINTS = ("during_decode", "during_write", "after_dag", "after_ledger", "during_upload", "before_publish",
                "after_publish")


def crash_point(name: str) -> None:
    """End the process here when ``XMODAL_CRASH_AT`` names this point."""
    if os.environ.get(CRASH_ENV) == name:
        logger.error("%s=%s: ending the process here", CRASH_ENV, name)
        sys.stderr.flush()
        os._exit(CRASH_EXIT_CODE)


@contextlib.contextmanager
def dag_crash_points(embeddings_uri: str) -> Iterator[None]:
    """While the DAG runs: during_decode crashes once the first item is decoded,
    during_write once the first embeddings file (temporary or final) exists."""
    point = os.environ.get(CRASH_ENV)
    if point not in ("during_decode", "during_write"):
        yield
        return
    stop = threading.Event()

    def has_file() -> bool:
        try:
            return next(iter(storage.list_objects(embeddings_uri)), None) is not None
        except ObjectNotFoundError:
            return False

    def watch() -> None:
        while not stop.wait(0.01):
            s = progress.snapshot()
            decoded = s["items_done"] + s["items_failed"] > 0
            if (point == "during_decode" and decoded) or (point == "during_write" and has_file()):
                crash_point(point)

    thread = threading.Thread(target=watch, name="crash-point", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def upload_progress(stage: str, done: int, total: int) -> None:
    """An index-build progress callback holding the during_upload point."""
    if stage == "upload" and done == 1:
        crash_point("during_upload")
