"""The query core: open a published index version, embed a query, search, return typed hits.

Lives here: resolving a workdir or index root (resolve.py), the version's own query
encoder (encoder.py), query media decoding with clip ranges and segments
(media.py), fair merging of several modalities' rankings (fusion.py), batches of
queries from JSONL files (batch.py) and the searchable index object behind
``xmodal_index.open`` (core.py). The CLI (`jobs/query_cmd.py`) and the HTTP
service (`jobs/server.py`) are thin front ends over it.

May import encoders, sinks, numpy, torch and the Beam-free decoding functions of
``xmodal_index.pipeline.decode``; must not import apache_beam, click or
``xmodal_index.jobs`` (tests/test_layering.py keeps that true).
"""

from .errors import BadQueryError, QueryError
from .hits import Hit

__all__ = ["BadQueryError", "Hit", "QueryError"]
