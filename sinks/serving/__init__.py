"""Query-node code: load a published index version, verify it, search it, hot-swap it.

Lives here: the loader (loader.py), its verified, pruned local cache of versions
(cache.py) and the hot-swapping handle (hot_swap.py) that `serve` and the Python API
use. Nothing read from the index store is trusted before it is checked (docs/SECURITY.md).
Importable without Beam, torch or click (a query node installs only what loading and
searching needs; tests/test_layering.py checks it).
"""
