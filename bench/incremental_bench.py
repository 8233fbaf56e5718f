"""Nightly increments against full builds: time, recall@10, bytes a query node downloads, memory.

    python bench/incremental_bench.py [--n 200000] [--increments 3] [--report bench/INCREMENTAL_RESULTS.md]

(``--n 10000000`` is the size the incremental design aims at.) On seeded synthetic
embeddings (bench/index_bench.py's generator: dimension 256, 1000 clusters,
L2-normalised; 64-bit LSH codes), streamed to Parquet part files:

1. full build of ``n`` rows (``build_version`` + publish) under a 2 GiB memory budget;
2. ``--increments`` nightly increments on it, each adding ``--add-fraction`` new
   rows and deleting ``--delete-fraction`` of the live ones (``build_increment`` +
   publish);
3. the baseline, measured in the same run: a full build of the final live rows;
4. recall@10 of the last increment and of the baseline against exact top-10 of the
   live rows (brute force, chunk by chunk) on held-out queries, single-query
   latency p50/p99 through ``IndexVersion.search``, and the bytes a query node
   with the previous version cached downloads for the last increment, against
   the size of the files the increment adds.

Each build runs in its own process (this file with a private sub-command), which
reports its wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))
from index_bench import _machine, latency_ms, lsh_codes, recall_at_10, vectors  # noqa: E402 - bench/ sibling

PART_ROWS = 100_000
RESULT_TAG = "RESULT "
MODEL = "bench@0"


def _batches(parts: list[str], dead_file: str | None):
    import pyarrow.parquet as pq

    dead = np.load(dead_file) if dead_file else np.zeros(0, np.int64)

    def batches():
        for path in parts:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=16_384):
                if len(dead):
                    batch = batch.filter(~np.isin(batch.column("segment_id").to_numpy(), dead))
                yield batch
    return batches


def _write_part(path: str, lo: int, hi: int, dim: int, bits: int, seed: int) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from xmodal_index.sinks.embeddings_io import rows_batch

    x = vectors(hi - lo, dim, seed=seed)
    ids = np.arange(lo, hi, dtype=np.int64)
    n = len(ids)
    batch = rows_batch(ids, [f"bench://{i}" for i in ids], ["e"] * n, ["image"] * n, np.zeros(n), np.zeros(n), x,
                       lsh_codes(x, bits), model_id=MODEL, run_id="bench")
    pq.write_table(pa.Table.from_batches([batch]), path)
    return ids


def _peak_rss() -> int:
    """This process's peak RSS since its exec (VmHWM; ru_maxrss would carry the parent's over)."""
    try:
        with open("/proc/self/status") as f:
            return int(next(ln.split()[1] for ln in f if ln.startswith("VmHWM:"))) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("command")
    p.add_argument("--root")
    p.add_argument("--parts", nargs="*")
    p.add_argument("--dead")
    p.add_argument("--parent")
    p.add_argument("--dim", type=int)
    p.add_argument("--bits", type=int)
    p.add_argument("--budget", type=int)
    a = p.parse_args(argv)
    from xmodal_index.sinks.index.build import IndexBuildConfig, build_version
    from xmodal_index.sinks.index.incremental import build_increment
    from xmodal_index.sinks.index.publish import publish_unfenced

    started = time.monotonic()
    if a.command == "full":
        config = IndexBuildConfig(memory_budget_bytes=a.budget)
        manifest = build_version(_batches(a.parts, a.dead), a.root, model_id=MODEL, dim=a.dim, bits=a.bits,
                                 config=config, publish=False)
        out = {"factory": manifest.index_factory["float"], "recall_at_10_build": manifest.metrics.get("recall_at_10")}
    else:
        deleted = np.load(a.dead)
        manifest = build_increment(a.root, a.parent, _batches(a.parts, None)(), deleted)
        out = {"new_bytes": manifest.build_stats["incremental"]["new_bytes"]}
    publish_unfenced(a.root, manifest.version)
    out.update(version=manifest.version, ntotal=manifest.ntotal, wall_s=round(time.monotonic() - started, 2),
               peak_rss_bytes=_peak_rss())
    print(RESULT_TAG + json.dumps(out), flush=True)


def _run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, HERE, "_child", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    if proc.returncode != 0:
        raise SystemExit(f"child {args[0]} failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG))
    return json.loads(line[len(RESULT_TAG):])


def _exact_top10(parts: list[str], dead: np.ndarray, queries: np.ndarray) -> np.ndarray:
    import faiss
    import pyarrow.parquet as pq

    from xmodal_index.sinks.embeddings_io import embedding_matrix

    heap = faiss.ResultHeap(len(queries), 10, keep_max=True)
    for path in parts:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=65_536):
            ids = batch.column("segment_id").to_numpy()
            keep = ~np.isin(ids, dead)
            x = embedding_matrix(batch.column("embedding"))[keep]
            dist, pos = faiss.knn(queries, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(dist, ids[keep][pos])
    heap.finalize()
    return heap.I


def _evaluate(root: str, queries: np.ndarray, exact: np.ndarray) -> dict:
    from xmodal_index.sinks.serving.loader import IndexVersion

    with IndexVersion.open(root) as version:
        found = np.array([[h.segment_id for h in hits] + [-1] * (10 - len(hits))
                          for hits in version.search(queries, 10)])
        lat = latency_ms(lambda i: version.search(queries[i:i + 1], 10), len(queries))
        return {"version": version.version, "recall_at_10": round(recall_at_10(found, exact), 4), **lat}


def _node_download(root: str, cached: str, target: str, cache_dir: str) -> int:
    """Bytes a node holding ``cached`` downloads to open ``target``."""
    from xmodal_index.sinks.serving import cache
    from xmodal_index.sinks.serving.loader import IndexVersion

    fetched = []
    real = cache.fetch_verified

    def counting(uri, dest, entry, version):
        fetched.append(entry.bytes)
        return real(uri, dest, entry, version)

    IndexVersion.open(root, cached, cache_dir=cache_dir).close()
    cache.fetch_verified = counting
    try:
        IndexVersion.open(root, target, cache_dir=cache_dir).close()
    finally:
        cache.fetch_verified = real
    return sum(fetched)


def _plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(0, results["base"].get("eval"))] + [(i + 1, s.get("eval")) for i, s in enumerate(results["increments"])]
    points = [(i, e) for i, e in points if e]
    last = len(results["increments"])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    top.plot([i for i, _ in points], [e["recall_at_10"] for _, e in points], "o-", label="incremental")
    top.plot([last], [results["eval_full"]["recall_at_10"]], "s", color="C3", label="compaction (full build)")
    top.set_ylabel("recall@10")
    top.legend(loc="lower left")
    bottom.plot([i for i, _ in points], [e["p50_ms"] for _, e in points], "o-")
    bottom.plot([last], [results["eval_full"]["p50_ms"]], "s", color="C3")
    bottom.set_ylabel("single-query p50 (ms)")
    bottom.set_xlabel("increment (0 = the first full build)")
    fig.suptitle(f"{results['args']['n']:,} rows, +{results['args']['add_fraction']:.1%} "
                 f"-{results['args']['delete_fraction']:.1%} per increment")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200_000, help="rows of the full build")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--increments", type=int, default=3)
    p.add_argument("--add-fraction", type=float, default=0.01, help="new rows per increment, share of n")
    p.add_argument("--delete-fraction", type=float, default=0.005, help="deleted rows per increment, share of n")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=1,
                   help="measure recall@10 and p50 after every N-th increment (0: only the last)")
    p.add_argument("--plot", default=os.path.join(ROOT, "bench", "incremental_sequence.png"),
                   help="recall@10 and p50 over the increments and the compaction ('' for none)")
    p.add_argument("--memory-budget-gib", type=float, default=2.0)
    p.add_argument("--workdir", default="/tmp/xmodal-incremental-bench")
    p.add_argument("--json", default=os.path.join(ROOT, "bench", "incremental_results.json"))
    a = p.parse_args(argv)
    shutil.rmtree(a.workdir, ignore_errors=True)
    data = os.path.join(a.workdir, "data")
    os.makedirs(data)
    budget = int(a.memory_budget_gib * 2**30)
    rng = np.random.default_rng(7)
    started = time.monotonic()
    base_parts, live = [], []
    for part in range(-(-a.n // PART_ROWS)):
        lo, hi = part * PART_ROWS, min(a.n, (part + 1) * PART_ROWS)
        path = os.path.join(data, f"base-part-{part:05d}.parquet")
        live.append(_write_part(path, lo, hi, a.dim, a.bits, seed=part + 1))
        base_parts.append(path)
    live_ids = np.concatenate(live)
    generate_s = time.monotonic() - started
    common = ["--dim", str(a.dim), "--bits", str(a.bits), "--budget", str(budget)]
    inc_root = os.path.join(a.workdir, "incremental")
    results: dict = {"args": vars(a), "machine": _machine(), "generate_s": round(generate_s, 1)}
    print(f"full build of {a.n} rows ...", flush=True)
    results["base"] = _run_child(["full", "--root", inc_root, "--parts", *base_parts, *common])
    queries = vectors(a.queries, a.dim, seed=10_000_000 + a.n)
    if a.eval_every:
        results["base"]["eval"] = _evaluate(inc_root, queries, _exact_top10(base_parts, np.zeros(0, np.int64), queries))
    parts, dead, next_id, parent, steps = list(base_parts), np.zeros(0, np.int64), a.n, results["base"]["version"], []
    for step in range(a.increments):
        add = max(1, int(a.n * a.add_fraction))
        path = os.path.join(data, f"inc-{step:03d}.parquet")
        _write_part(path, next_id, next_id + add, a.dim, a.bits, seed=1_000_000 + step)
        live_ids = np.concatenate([live_ids, np.arange(next_id, next_id + add)])
        next_id += add
        gone = rng.choice(np.setdiff1d(live_ids, dead), max(1, int(a.n * a.delete_fraction)), replace=False)
        dead = np.union1d(dead, gone)
        dead_file = os.path.join(data, f"deleted-{step:03d}.npy")
        np.save(dead_file, gone.astype(np.int64))
        parts.append(path)
        print(f"increment {step + 1}: +{add} rows, -{len(gone)} rows ...", flush=True)
        out = _run_child(["increment", "--root", inc_root, "--parent", parent, "--parts", path, "--dead", dead_file,
                          *common])
        if a.eval_every and ((step + 1) % a.eval_every == 0 or step + 1 == a.increments):
            out["eval"] = _evaluate(inc_root, queries, _exact_top10(parts, dead, queries))
            print(f"  {out['wall_s']} s, recall@10 {out['eval']['recall_at_10']}, p50 {out['eval']['p50_ms']} ms",
                  flush=True)
        steps.append(out)
        previous, parent = parent, out["version"]
    results["increments"] = steps
    all_dead = os.path.join(data, "dead.npy")
    np.save(all_dead, dead)
    print("baseline: full build of the final live rows ...", flush=True)
    full_root = os.path.join(a.workdir, "full")
    results["full"] = _run_child(["full", "--root", full_root, "--parts", *parts, "--dead", all_dead, *common])
    exact = _exact_top10(parts, dead, queries)
    results["eval_incremental"] = _evaluate(inc_root, queries, exact)
    results["eval_full"] = _evaluate(full_root, queries, exact)
    if a.increments:
        results["node_download_bytes"] = _node_download(inc_root, previous, parent, os.path.join(a.workdir, "cache"))
        results["last_delta_bytes"] = steps[-1]["new_bytes"]
        results["version_bytes"] = sum(os.path.getsize(f) for f in glob.glob(os.path.join(full_root, "v*", "*")))
    mean_step_s = float(np.mean([s["wall_s"] for s in steps])) if steps else float("nan")
    results["increment_over_full_wall"] = round(mean_step_s / results["full"]["wall_s"], 4)
    if a.plot:
        _plot(results, a.plot)
    with open(a.json, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child(sys.argv[2:])
    else:
        main()
