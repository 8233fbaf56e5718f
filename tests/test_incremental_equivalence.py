"""Incremental and full builds of the same live rows answer alike: 20k clustered
64-d vectors, three increments of adds and deletes, exact search parameters (IVF with
nprobe = nlist); the same top-10 ids for >= 99% of the queries."""

from __future__ import annotations

import numpy as np

from xmodal_index.sinks.embeddings_io import rows_batch
from xmodal_index.sinks.index.build import IndexBuildConfig, build_version
from xmodal_index.sinks.index.incremental import build_increment
from xmodal_index.sinks.serving.loader import IndexVersion

DIM, BITS, MODEL = 64, 64, "tiny@feedbeef"
EXACT = IndexBuildConfig(float_factory="IVF64,Flat", binary_factory="BIVF16", nprobe=64, recall_sample=50)


def clustered(ids: np.ndarray, rng: np.random.Generator, centers: np.ndarray):
    x = centers[rng.integers(0, len(centers), len(ids))] + 0.35 * rng.standard_normal((len(ids), DIM))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    codes = np.packbits((x @ np.random.default_rng(5).standard_normal((DIM, BITS)) > 0).astype(np.uint8), axis=1)
    n = len(ids)
    return rows_batch(ids, [f"s3://a/{i}.mp4" for i in ids], ["e"] * n, ["video"] * n, [0.0] * n, [1.0] * n, x,
                      codes, model_id=MODEL, run_id="r"), x


def test_incremental_and_full_builds_return_the_same_top_10(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((50, DIM))
    batch, x = clustered(np.arange(20_000, dtype=np.int64), rng, centers)
    live = {0: batch}
    inc_root, full_root = str(tmp_path / "inc"), str(tmp_path / "full")
    build_version(lambda: iter([batch]), inc_root, model_id=MODEL, dim=DIM, bits=BITS, config=EXACT, publish=False)
    parent, next_id = "v000001", 20_000
    for step in range(3):
        added, _ = clustered(np.arange(next_id, next_id + 400, dtype=np.int64), rng, centers)
        next_id += 400
        all_ids = np.concatenate([b.column("segment_id").to_numpy() for b in live.values()])
        deleted = rng.choice(all_ids, 200, replace=False)
        live = {k: b.filter(~np.isin(b.column("segment_id").to_numpy(), deleted)) for k, b in live.items()}
        live[step + 1] = added
        parent = build_increment(inc_root, parent, [added], deleted).version
    rebuilt = build_version(lambda: iter(live.values()), full_root, model_id=MODEL, dim=DIM, bits=BITS,
                            config=EXACT, publish=False)
    queries = x[rng.choice(len(x), 300, replace=False)] + 0.05 * rng.standard_normal((300, DIM)).astype(np.float32)
    with IndexVersion.open(inc_root, parent) as inc, IndexVersion.open(full_root, rebuilt.version) as ref:
        assert inc.manifest.ntotal == ref.manifest.ntotal == 20_000 + 3 * 400 - 3 * 200
        got = [[h.segment_id for h in hits] for hits in inc.search(queries, 10)]
        want = [[h.segment_id for h in hits] for hits in ref.search(queries, 10)]
    same = np.mean([g == w for g, w in zip(got, want)])
    assert all(len(g) == 10 for g in got)
    assert same >= 0.99, same
