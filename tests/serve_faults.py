"""Decode functions that misbehave, for `serve`'s media tests (``QueryServer(decode_fn=...)``).

They run inside the isolated decode workers, so this module imports only numpy and
the pipeline's types: a worker has a small address space. Each takes (item, config)
and yields segments like ``decode_item``; the upload's extension picks the fault.
"""

from __future__ import annotations

import time

import numpy as np

from xmodal_index.pipeline.decode import decode_item
from xmodal_index.pipeline.types import Segment


def _second(item, start_s: float) -> Segment:
    return Segment(item.uri, item.etag, "audio", start_s, start_s + 1.0, np.zeros(16000, np.float32))


def misbehave(item, config):
    """``.hang``: never answers; ``.slow``: one second of audio after 2 s; ``.endless``: audio
    without end; ``.hog``: allocates until the worker's memory limit; anything else: decode_item."""
    ext = item.uri.rsplit(".", 1)[-1]
    if ext == "hang":
        time.sleep(3600)
    elif ext == "slow":
        time.sleep(2.0)
        yield _second(item, 0.0)
    elif ext == "endless":
        t = 0.0
        while True:
            yield _second(item, t)
            t += 1.0
    elif ext == "hog":
        hoard = []
        while True:
            hoard.append(np.ones(64 << 20, np.uint8))
    else:
        yield from decode_item(item, config)
