"""Index benchmarks: build, memory and recall against autofaiss; shards; two-stage search.

    python bench/index_bench.py [--sizes 100000,1000000] [--with-autofaiss] [--report bench/INDEX_RESULTS.md]

What it measures, on seeded synthetic embeddings (dimension 256, L2-normalised,
a decaying spectrum plus 1000 cluster centres, so that neighbours are not trivially
separable; LSH sign codes of 64 bits as the hash codes):

1. per size: ``build_version`` (this project) and, with ``--with-autofaiss``,
   autofaiss ``build_index`` on the same vectors under the same memory budget;
   each build runs in its own process, which reports its wall time and peak RSS.
   Then recall@10 of the built index against exact search on held-out queries and
   single-query latency p50/p99 (k=10): for this project both the raw FAISS shard
   search and ``IndexVersion.search`` (id-map lookups included). autofaiss gets a
   query-time budget equal to this project's measured mean single-query latency
   (override with ``--autofaiss-query-ms``), so both are tuned to the same speed.
2. query latency p50/p99 and recall for 1, 4 and 16 shards of one data set;
3. two-stage search (Hamming top-C per shard, exact float16 re-rank) against
   float-only search on the largest version, for several C.

``--with-autofaiss`` creates a separate virtualenv (``--autofaiss-venv``, default
/tmp/xmodal-autofaiss-venv) with autofaiss 2.18.0, faiss-cpu 1.13.2 (newer faiss
breaks its quantized indexes), numpy<2 and pyarrow<26; nothing is installed into
this project's environment. Child processes run this same file with a private
sub-command; the autofaiss child imports only numpy and faiss from here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
CLUSTERS = 1000
SPECTRUM_DECAY = 0.5
PART_ROWS = 100_000
AUTOFAISS_PINS = ("autofaiss==2.18.0", "faiss-cpu==1.13.2", "numpy>=1.26,<2", "pyarrow<26")
RESULT_TAG = "RESULT "


# ---------------------------------------------------------------- data


def _generator(dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    spectrum = (np.arange(dim) + 1.0) ** -SPECTRUM_DECAY
    spectrum /= np.sqrt((spectrum ** 2).sum())
    rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
    centres = (rng.standard_normal((CLUSTERS, dim)) * spectrum).astype(np.float32)
    return spectrum.astype(np.float32), rotation, centres


def vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """n seeded, L2-normalised vectors: a cluster centre plus spectrum-shaped noise, rotated."""
    spectrum, rotation, centres = _generator(dim)
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, CLUSTERS, n)] + (rng.standard_normal((n, dim)) * spectrum).astype(np.float32)
    x = x @ rotation
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def lsh_codes(x: np.ndarray, bits: int) -> np.ndarray:
    planes = np.random.default_rng(1).standard_normal((x.shape[1], bits)).astype(np.float32)
    return np.packbits((x @ planes > 0).astype(np.uint8), axis=1)


def make_data(directory: str, n: int, dim: int, bits: int, nqueries: int) -> dict:
    """Parquet parts (this project's row schema), .npy parts (autofaiss), queries and exact top-10."""
    import faiss
    import pyarrow as pa
    import pyarrow.parquet as pq

    from xmodal_index.sinks.embeddings_io import rows_batch

    done = os.path.join(directory, "done.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    os.makedirs(os.path.join(directory, "parquet"), exist_ok=True)
    os.makedirs(os.path.join(directory, "npy"), exist_ok=True)
    queries = vectors(nqueries, dim, seed=10_000_000 + n)
    heap = faiss.ResultHeap(nqueries, 10, keep_max=True)
    started = time.monotonic()
    parts = -(-n // PART_ROWS)
    for part in range(parts):
        lo, hi = part * PART_ROWS, min(n, (part + 1) * PART_ROWS)
        x = vectors(hi - lo, dim, seed=part + 1)
        ids = np.arange(lo, hi, dtype=np.int64)  # segment id = row number: autofaiss answers row numbers
        codes = lsh_codes(x, bits)
        batch = rows_batch(ids, [f"bench://{i}" for i in ids], ["e"] * len(ids), ["image"] * len(ids),
                           np.zeros(len(ids)), np.zeros(len(ids)), x, codes, model_id="bench@0", run_id="bench")
        pq.write_table(pa.Table.from_batches([batch]),
                       os.path.join(directory, "parquet", f"part-{part:05d}-of-{parts:05d}.parquet"))
        np.save(os.path.join(directory, "npy", f"part-{part:05d}.npy"), x)
        dist, pos = faiss.knn(queries, x, 10, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(dist, ids[pos])
    heap.finalize()
    np.save(os.path.join(directory, "queries.npy"), queries)
    np.save(os.path.join(directory, "query_codes.npy"), lsh_codes(queries, bits))
    np.save(os.path.join(directory, "exact_top10.npy"), heap.I)
    info = {"n": n, "dim": dim, "bits": bits, "queries": nqueries, "generate_s": round(time.monotonic() - started, 1)}
    with open(done, "w") as f:
        json.dump(info, f)
    return info


def recall_at_10(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f[:10].tolist()) & set(e.tolist())) / 10 for f, e in zip(found, exact)]))


def latency_ms(search, count: int, limit_s: float = 20.0) -> dict:
    """Single-query latency: ``search(i)`` runs query i alone; p50, p99, mean in milliseconds.

    FAISS runs on one OpenMP thread here (as the loader does for small batches): on a
    busy 2-core machine a two-thread barrier costs 10-20 ms per single query.
    """
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return _latency(search, count, limit_s)
    finally:
        faiss.omp_set_num_threads(before)


def _latency(search, count: int, limit_s: float) -> dict:
    times = []
    started = time.perf_counter()
    for i in range(count):
        t = time.perf_counter()
        search(i)
        times.append((time.perf_counter() - t) * 1e3)
        if time.perf_counter() - started > limit_s:
            break
    arr = np.array(times)
    return {"p50_ms": round(float(np.percentile(arr, 50)), 3), "p99_ms": round(float(np.percentile(arr, 99)), 3),
            "mean_ms": round(float(arr.mean()), 3), "queries": len(arr)}


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _emit(result: dict) -> None:
    print(RESULT_TAG + json.dumps(result), flush=True)


# ---------------------------------------------------------------- children: this project


def child_build_ours(args: argparse.Namespace) -> None:
    from xmodal_index.sinks.embeddings_io import batch_reader
    from xmodal_index.sinks.index.build import IndexBuildConfig, build_version

    config = IndexBuildConfig(memory_budget_bytes=int(args.budget), recall_target=args.recall_target,
                              max_shard_vectors=args.max_shard_vectors, float_factory=args.float_factory)
    started = time.monotonic()
    manifest = build_version(batch_reader(os.path.join(args.data, "parquet")), args.root, model_id="bench@0",
                             dim=args.dim, bits=args.bits, config=config)
    wall = time.monotonic() - started
    floats = [s for s in manifest.shards if s.kind == "float"]
    _emit({"build_s": round(wall, 2), "peak_rss_bytes": _peak_rss(), "version": manifest.version,
           "float_factory": manifest.index_factory["float"], "binary_factory": manifest.index_factory["binary"],
           "shards": len(floats), "search_params": [dict(s.search_params) for s in floats],
           "build_recall_at_10": manifest.metrics["recall_at_10"], "build_stats": dict(manifest.build_stats),
           "index_bytes": sum(s.bytes for s in manifest.shards)})


def child_eval_ours(args: argparse.Namespace) -> None:
    from xmodal_index.sinks.serving.loader import IndexVersion

    queries = np.load(os.path.join(args.data, "queries.npy"))
    codes = np.load(os.path.join(args.data, "query_codes.npy"))
    exact = np.load(os.path.join(args.data, "exact_top10.npy"))
    out: dict = {}
    with IndexVersion.open(args.root) as index:
        hits = index.search(queries, 10)
        out["recall_at_10"] = recall_at_10(np.array([[h.segment_id for h in row] for row in hits]), exact)
        out["search_latency"] = latency_ms(lambda i: index.search(queries[i:i + 1], 10), len(queries))
        floats = [s.index for s in index._shards if s.entry.kind == "float"]
        if len(floats) == 1:
            out["faiss_latency"] = latency_ms(lambda i: floats[0].search(queries[i:i + 1], 10), len(queries))
        t = time.perf_counter()
        index.search(queries, 10)
        out["batch_ms_per_query"] = round((time.perf_counter() - t) * 1e3 / len(queries), 4)
        if args.two_stage:
            rows = []
            for c in args.two_stage:
                found = index.search(queries, 10, mode="two_stage", codes=codes, candidates=c)
                recall = recall_at_10(np.array([[h.segment_id for h in row] for row in found]), exact)
                lat = latency_ms(lambda i, c=c: index.search(queries[i:i + 1], 10, mode="two_stage",
                                                             codes=codes[i:i + 1], candidates=c), len(queries))
                rows.append({"candidates": c, "recall_at_10": recall, "search_latency": lat})
            out["two_stage"] = rows
    _emit(out)


# ---------------------------------------------------------------- child: autofaiss (its own virtualenv)


def child_autofaiss(args: argparse.Namespace) -> None:
    import faiss
    from autofaiss import build_index
    from autofaiss.external import optimize
    from autofaiss.indices import index_utils

    # autofaiss times single queries to tune efSearch / nprobe: give it the same one-thread
    # query path as this project's loader, or OpenMP stalls on the shared cores distort it.
    timed = index_utils.speed_test_ms_per_query

    def one_thread_speed_test(*a, **k):
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return timed(*a, **k)
        finally:
            faiss.omp_set_num_threads(before)

    index_utils.speed_test_ms_per_query = optimize.speed_test_ms_per_query = one_thread_speed_test

    started = time.monotonic()
    index, infos = build_index(
        embeddings=os.path.join(args.data, "npy"), index_path=os.path.join(args.root, "knn.index"),
        index_infos_path=os.path.join(args.root, "infos.json"), max_index_memory_usage=args.budget_str,
        current_memory_available="16G", max_index_query_time_ms=args.query_ms, metric_type="ip",
        nb_cores=os.cpu_count(), verbose=30,
    )
    wall = time.monotonic() - started
    peak = _peak_rss()
    queries = np.load(os.path.join(args.data, "queries.npy"))
    exact = np.load(os.path.join(args.data, "exact_top10.npy"))
    _, found = index.search(queries, 10)
    out = {"build_s": round(wall, 2), "peak_rss_bytes": peak, "index_key": infos.get("index_key"),
           "index_param": infos.get("index_param"), "recall_at_10": recall_at_10(found, exact),
           "faiss_latency": latency_ms(lambda i: index.search(queries[i:i + 1], 10), len(queries)),
           "index_bytes": os.path.getsize(os.path.join(args.root, "knn.index"))}
    sweep = []
    hnsw = None
    try:
        hnsw = faiss.downcast_index(index if not isinstance(index, faiss.IndexPreTransform) else index.index)
        hnsw = hnsw if isinstance(hnsw, faiss.IndexHNSW) else None
    except (AttributeError, RuntimeError):
        hnsw = None
    if hnsw is not None:
        chosen = hnsw.hnsw.efSearch
        for ef in (16, 32, 64, 128, 256):
            hnsw.hnsw.efSearch = ef
            _, found = index.search(queries, 10)
            sweep.append({"efSearch": ef, "recall_at_10": recall_at_10(found, exact),
                          "faiss_latency": latency_ms(lambda i: index.search(queries[i:i + 1], 10), 300, 5.0)})
        hnsw.hnsw.efSearch = chosen
    out["sweep"] = sweep
    _emit(out)


# ---------------------------------------------------------------- parent


def _run_child(cmd: list[str], label: str, env: dict | None = None) -> dict:
    print(f"  running {label} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
    if proc.returncode != 0 or result is None:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"{label} failed (exit {proc.returncode})")
    print(f"  {label}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return result


def ensure_autofaiss_venv(venv: str) -> str:
    """The venv's python, after creating it and installing the pinned autofaiss set when needed."""
    python = os.path.join(venv, "bin", "python")
    probe = [python, "-c", "import autofaiss, faiss; assert faiss.__version__ == '1.13.2'"]
    if os.path.exists(python) and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"  creating {venv} with {' '.join(AUTOFAISS_PINS)} ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", *AUTOFAISS_PINS], check=True)
    return python


def _machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(ln.split()[1] for ln in f if ln.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration):
        pass
    import faiss

    return {"cpu": model, "cores": os.cpu_count(), "memory_bytes": mem, "python": platform.python_version(),
            "faiss": faiss.__version__, "numpy": np.__version__, "platform": platform.platform(),
            "load_average_start": os.getloadavg()}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def report(results: dict) -> str:
    m = results["machine"]
    lines = ["# Index benchmark results", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {_gib(m['memory_bytes'])} RAM, Python {m['python']}, "
             f"faiss {m['faiss']} (autofaiss: faiss 1.13.2 in its own venv). Load average at start "
             f"{', '.join(f'{v:.1f}' for v in m['load_average_start'])}, at end "
             f"{', '.join(f'{v:.1f}' for v in results['load_average_end'])}: the machine was shared with other "
             f"work, so timings move by tens of percent between runs. One run; data: {results['data_note']}", ""]
    lines += ["## 1. Build time, peak memory, recall@10 against autofaiss", "",
              f"Same vectors, same memory budget ({_gib(results['budget_bytes'])}), recall target "
              f"{results['recall_target']} for this project; autofaiss gets this project's mean single-query "
              "latency as its query-time budget. Latency: raw FAISS search of the built index, one query per call, "
              "k=10, one OpenMP thread (the loader's setting for small batches).", "",
              "| vectors | builder | index | build s | peak RSS | index size | recall@10 | p50 ms | p99 ms |",
              "|---|---|---|---|---|---|---|---|---|"]
    for size in results["sizes"]:
        r = results["by_size"][str(size)]
        ours, ev = r["ours"], r["ours_eval"]
        lat = ev.get("faiss_latency", ev["search_latency"])
        params = ",".join(f"{k}={v}" for k, v in ours["search_params"][0].items())
        lines.append(f"| {size:,} | xmodal-index | {ours['float_factory']} {params} | {ours['build_s']:.1f} | "
                     f"{_gib(ours['peak_rss_bytes'])} | {_gib(ours['index_bytes'])} | {ev['recall_at_10']:.4f} | "
                     f"{lat['p50_ms']:.3f} | {lat['p99_ms']:.3f} |")
        if "autofaiss" in r:
            a = r["autofaiss"]
            lines.append(f"| {size:,} | autofaiss | {a['index_key']} {a['index_param']} | {a['build_s']:.1f} | "
                         f"{_gib(a['peak_rss_bytes'])} | {_gib(a['index_bytes'])} | {a['recall_at_10']:.4f} | "
                         f"{a['faiss_latency']['p50_ms']:.3f} | {a['faiss_latency']['p99_ms']:.3f} |")
    lines.append("")
    for size in results["sizes"]:
        r = results["by_size"][str(size)]
        if "autofaiss" in r:
            a, o = r["autofaiss"], r["ours"]
            rss = o["peak_rss_bytes"] / a["peak_rss_bytes"]
            lines.append(f"- {size:,} vectors, ratios xmodal-index / autofaiss: build time "
                         f"{o['build_s'] / a['build_s']:.2f}, peak RSS {rss:.2f}, "
                         f"recall@10 {r['ours_eval']['recall_at_10'] / a['recall_at_10']:.3f}.")
            if a.get("sweep"):
                pts = "; ".join(f"efSearch {s['efSearch']}: {s['recall_at_10']:.3f} at "
                                f"{s['faiss_latency']['p50_ms']:.2f} ms" for s in a["sweep"])
                lines.append(f"  autofaiss index at other efSearch values (recall@10, p50): {pts}.")
    lines += ["", "## 2. Query latency and recall by shard count", "",
              f"{results['shard_size']:,} vectors split into 1, 4 and 16 shards, each an IVF-Flat index with "
              "4 sqrt(n) lists tuned to the recall target; `IndexVersion.search`, one query per call (shards "
              "searched in parallel threads, merged, id maps looked up).", "",
              "| shards | index per shard | recall@10 | p50 ms | p99 ms | batch ms/query (all queries in one call) |",
              "|---|---|---|---|---|---|"]
    for row in results.get("shards", []):
        lat = row["eval"]["search_latency"]
        lines.append(f"| {row['shards']} | {row['build']['float_factory']} | {row['eval']['recall_at_10']:.4f} | "
                     f"{lat['p50_ms']:.3f} | {lat['p99_ms']:.3f} | {row['eval']['batch_ms_per_query']:.3f} |")
    ts = results.get("two_stage")
    if ts:
        lines += ["", "## 3. Two-stage search (Hamming prefilter + float16 re-rank) against float-only", "",
                  f"{ts['size']:,} vectors, {results['bits']}-bit LSH codes; `IndexVersion.search`, "
                  "one query per call.",
                  "", "| search | recall@10 | p50 ms | p99 ms |", "|---|---|---|---|",
                  f"| float-only ({ts['float_factory']}) | {ts['float']['recall_at_10']:.4f} | "
                  f"{ts['float']['search_latency']['p50_ms']:.3f} | {ts['float']['search_latency']['p99_ms']:.3f} |"]
        for row in ts["rows"]:
            lines.append(f"| two-stage, {row['candidates']} candidates | {row['recall_at_10']:.4f} | "
                         f"{row['search_latency']['p50_ms']:.3f} | {row['search_latency']['p99_ms']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000", help="vector counts to build, comma-separated")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries for recall and latency")
    parser.add_argument("--workdir", default="/tmp/xmodal-index-bench", help="data and indexes (several GiB at 1M)")
    parser.add_argument("--memory-budget-gib", type=float, default=4.0, help="memory budget given to both builders")
    parser.add_argument("--recall-target", type=float, default=0.95)
    parser.add_argument("--with-autofaiss", action="store_true", help="also build with autofaiss (own venv)")
    parser.add_argument("--autofaiss-venv", default="/tmp/xmodal-autofaiss-venv")
    parser.add_argument("--autofaiss-query-ms", type=float, default=None,
                        help="autofaiss max_index_query_time_ms (default: this project's mean latency)")
    parser.add_argument("--shard-size", type=int, default=100_000, help="vectors for the shard-count benchmark")
    parser.add_argument("--shard-counts", default="1,4,16")
    parser.add_argument("--two-stage-candidates", default="100,1000,10000")
    parser.add_argument("--report", default=os.path.join(ROOT, "bench", "INDEX_RESULTS.md"))
    parser.add_argument("--json", default=os.path.join(ROOT, "bench", "index_results.json"))
    parser.add_argument("--report-only", action="store_true", help="rewrite --report from --json, run nothing")
    args = parser.parse_args(argv)
    if args.report_only:
        with open(args.json) as f:
            text = report(json.load(f))
        with open(args.report, "w") as f:
            f.write(text)
        print(text)
        return

    sizes = [int(s) for s in args.sizes.split(",") if s]
    budget = int(args.memory_budget_gib * 2**30)
    results: dict = {"machine": _machine(), "sizes": sizes, "budget_bytes": budget, "bits": args.bits,
                     "recall_target": args.recall_target, "by_size": {}, "shard_size": args.shard_size,
                     "data_note": (f"{args.dim}-d vectors: {CLUSTERS} cluster centres plus noise with spectrum "
                                   f"i^-{SPECTRUM_DECAY}, rotated, L2-normalised, seeded; {args.queries} held-out "
                                   "queries from the same distribution; exact top-10 by brute force.")}
    python = ensure_autofaiss_venv(args.autofaiss_venv) if args.with_autofaiss else None
    me = [sys.executable, HERE]
    for size in sizes:
        data = os.path.join(args.workdir, f"data-{size}")
        print(f"{size} vectors:", file=sys.stderr, flush=True)
        info = make_data(data, size, args.dim, args.bits, args.queries)
        root = os.path.join(args.workdir, f"ours-{size}")
        subprocess.run(["rm", "-rf", root], check=True)
        common = ["--data", data, "--root", root, "--dim", str(args.dim), "--bits", str(args.bits)]
        ours = _run_child(me + ["_build-ours", *common, "--budget", str(budget), "--recall-target",
                                str(args.recall_target), "--max-shard-vectors", str(max(size, 1))], "build (ours)")
        two_stage = [int(c) for c in args.two_stage_candidates.split(",") if c] if size == max(sizes) else []
        ev = _run_child(me + ["_eval-ours", *common, "--two-stage", *map(str, two_stage)], "eval (ours)")
        entry = {"data": info, "ours": ours, "ours_eval": ev}
        if python:
            query_ms = args.autofaiss_query_ms or max(0.05, ev.get("faiss_latency", ev["search_latency"])["mean_ms"])
            af_root = os.path.join(args.workdir, f"autofaiss-{size}")
            subprocess.run(["rm", "-rf", af_root], check=True)
            os.makedirs(af_root)
            entry["autofaiss"] = _run_child(
                [python, HERE, "_autofaiss", *common, "--budget-str", f"{args.memory_budget_gib:g}G",
                 "--query-ms", str(query_ms)], "build + eval (autofaiss)")
            entry["autofaiss"]["query_ms_budget"] = query_ms
        results["by_size"][str(size)] = entry
        if two_stage:
            results["two_stage"] = {"size": size, "float_factory": ours["float_factory"], "rows": ev["two_stage"],
                                    "float": {"recall_at_10": ev["recall_at_10"],
                                              "search_latency": ev["search_latency"]}}
    if args.shard_counts:
        data = os.path.join(args.workdir, f"data-{args.shard_size}")
        make_data(data, args.shard_size, args.dim, args.bits, args.queries)
        results["shards"] = []
        for count in [int(c) for c in args.shard_counts.split(",") if c]:
            root = os.path.join(args.workdir, f"shards-{count}")
            subprocess.run(["rm", "-rf", root], check=True)
            common = ["--data", data, "--root", root, "--dim", str(args.dim), "--bits", str(args.bits)]
            per_shard = math.ceil(args.shard_size / count)
            factory = f"IVF{round(4 * math.sqrt(per_shard))},Flat"  # the same kind of index at every count
            build = _run_child(me + ["_build-ours", *common, "--budget", str(budget), "--recall-target",
                                     str(args.recall_target), "--max-shard-vectors", str(per_shard),
                                     "--float-factory", factory], f"build {count} shards")
            ev = _run_child(me + ["_eval-ours", *common], f"eval {count} shards")
            results["shards"].append({"shards": count, "build": build, "eval": ev})
    results["load_average_end"] = os.getloadavg()
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    text = report(results)
    with open(args.report, "w") as f:
        f.write(text)
    print(text)


def _child(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.add_argument("--data", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--budget", type=float, default=4 * 2**30)
    parser.add_argument("--budget-str", default="4G")
    parser.add_argument("--recall-target", type=float, default=0.95)
    parser.add_argument("--max-shard-vectors", type=int, default=1_000_000)
    parser.add_argument("--query-ms", type=float, default=10.0)
    parser.add_argument("--two-stage", type=int, nargs="*", default=[])
    parser.add_argument("--float-factory", default="auto")
    args = parser.parse_args(argv)
    {"_build-ours": child_build_ours, "_eval-ours": child_eval_ours, "_autofaiss": child_autofaiss}[args.command](args)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        _child(sys.argv[1:])
    else:
        main()
