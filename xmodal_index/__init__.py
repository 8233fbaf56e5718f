"""xmodal-index: offline batch indexing of media archives into one cross-modal space.

Python API (importing this package is cheap: torch and faiss load on ``open``)::

    import xmodal_index
    index = xmodal_index.open("sample-work")          # a workdir or an index root
    hits = index.search(text="seven", k=5)              # list[xmodal_index.Hit], best first
    rows = index.to_arrow()                             # the live rows of the version

Subpackages (each says what it may import):
  xmodal_index.encoders  embedding models, hash heads, training objectives (torch, numpy)
  xmodal_index.sinks     Arrow schema, Parquet, FAISS shards, index versions, storage (no beam/torch)
  xmodal_index.pipeline  Beam composites, decoding, segmenting, dead letters
  xmodal_index.query     the query core: open a version, embed a query, search (no beam/click)
  xmodal_index.jobs      click commands, configs, runner wiring, exit codes
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
# open() is public too, but not star-exported: it would shadow the builtin.
__all__ = ["Hit", "QueryError", "QueryIndex", "__version__"]

if TYPE_CHECKING:
    from xmodal_index.query.core import QueryIndex
    from xmodal_index.query.errors import QueryError
    from xmodal_index.query.hits import Hit


def open(uri: str, index: str = "main", version: str | None = None,
         cache_dir: str | None = None) -> QueryIndex:
    """Open a published index version for search.

    ``uri``: a workdir (its index ``index`` is used) or an index root (WORKDIR/indexes/NAME);
    a local path, file:// or s3://. ``version``: e.g. "v000003" (default: the one LATEST
    names). Every file of the version is verified before use; raises
    ``xmodal_index.QueryError`` when nothing is published or a file does not match.
    """
    from xmodal_index.query.core import QueryIndex

    return QueryIndex.open(uri, index=index, version=version, cache_dir=cache_dir)


def __getattr__(name: str) -> Any:
    if name == "QueryIndex":
        from xmodal_index.query.core import QueryIndex

        return QueryIndex
    if name == "Hit":
        from xmodal_index.query.hits import Hit

        return Hit
    if name == "QueryError":
        from xmodal_index.query.errors import QueryError

        return QueryError
    raise AttributeError(f"module 'xmodal_index' has no attribute {name!r}")
