"""Beam DAG vs a hand-written decode+encode loop over the same archive, same machine, same run.

    python bench/pipeline_vs_loop.py [--archive DIR] [--repeat N] [--config examples/sample.toml]

Builds the bundled sample archive when --archive is not given. Prints wall seconds of
each variant and the ratio to the plain loop (lower is better; 1.0 = as fast as the loop).
Both variants decode with the same DecodeConfig, encode with the same encoder and
batch size, and write Parquet rows; the Beam variants are the product's IndexArchive.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} vCPU {cpu}, {mem:.0f} GiB, {platform.system()} {platform.machine()}, "
            f"Python {platform.python_version()}")


def plain_loop(items, cfg, encoder, out_path: str) -> int:
    from xmodal_index.pipeline.decode import DecodeError, decode_item
    from xmodal_index.pipeline.encode import encode_segments
    from xmodal_index.sinks.schema import embedding_schema

    schema = embedding_schema(encoder.dim, encoder.bits)
    writer = pq.ParquetWriter(out_path, schema, compression="zstd")
    batch, rows = [], 0

    def flush():
        nonlocal batch, rows
        if batch:
            out = encode_segments(encoder, batch, "bench")
            writer.write_table(pa.Table.from_pylist(out, schema=schema))
            rows += len(out)
            batch = []

    for item in items:
        try:
            for seg in decode_item(item, cfg.decode):
                batch.append(seg)
                if len(batch) >= cfg.encoder.batch_size:
                    flush()
        except DecodeError:
            pass
    flush()
    writer.close()
    return rows


def beam_run(items, cfg, workdir: str, isolate: bool, extra_args: list[str]) -> int:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from xmodal_index.encoders.loading import load_encoder
    from xmodal_index.pipeline.dag import IndexArchive, embeddings_prefix

    enc = load_encoder(cfg.encoder)
    opts = PipelineOptions(["--runner=DirectRunner", *extra_args])
    with beam.Pipeline(options=opts) as p:
        (p | beam.Create(items) | beam.Reshuffle()
         | IndexArchive(workdir, "bench", cfg.decode, cfg.encoder, enc.dim, enc.bits, isolate_decoding=isolate))
    prefix = embeddings_prefix(workdir, "bench")
    return sum(pq.ParquetFile(os.path.join(prefix, f)).metadata.num_rows
               for f in os.listdir(prefix) if f.endswith(".parquet"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archive", help="archive directory (default: build the bundled sample in a temp dir)")
    ap.add_argument("--config", default=os.path.join(ROOT, "examples", "sample.toml"))
    ap.add_argument("--repeat", type=int, default=1,
                    help="copies of the archive's item list to process (scales the work)")
    ap.add_argument("--json", dest="json_out", help="also write the results here")
    args = ap.parse_args()

    from xmodal_index.encoders.loading import load_encoder
    from xmodal_index.jobs.config import load_config
    from xmodal_index.pipeline.listing import list_items

    cfg = load_config(args.config)
    with tempfile.TemporaryDirectory(prefix="xmodal-bench-") as tmp:
        archive = args.archive
        if archive is None:
            archive = os.path.join(tmp, "archive")
            subprocess.run([sys.executable, "-m", "xmodal_index", "make-sample", "--out", archive], check=True,
                           stdout=subprocess.DEVNULL)
        items = list_items(archive, cfg.source) * args.repeat
        encoder = load_encoder(cfg.encoder)
        plain_loop(items[:2], cfg, encoder, os.path.join(tmp, "warm.parquet"))  # warm caches and torch

        results = {}
        t = time.perf_counter()
        rows = plain_loop(items, cfg, encoder, os.path.join(tmp, "loop.parquet"))
        results["plain loop (in-process decode, 1 thread of Python)"] = (time.perf_counter() - t, rows)
        from xmodal_index.jobs import loopback

        loopback.install()  # as `xmodal-index run` does: the runner's gRPC servers on loopback only
        variants = [
            ("beam DirectRunner, isolated decode workers x2 (product default)", True,
             ["--direct_num_workers=2", "--direct_running_mode=multi_threading"]),
            ("beam DirectRunner in_memory (no gRPC servers), isolated decode", True,
             ["--direct_num_workers=1", "--direct_running_mode=in_memory"]),
            ("beam DirectRunner, in-process decode x2", False,
             ["--direct_num_workers=2", "--direct_running_mode=multi_threading"]),
            ("beam DirectRunner, isolated decode, 1 worker", True, ["--direct_num_workers=1"]),
        ]
        for i, (name, isolate, extra) in enumerate(variants):
            t = time.perf_counter()
            rows = beam_run(items, cfg, os.path.join(tmp, f"w{i}"), isolate, extra)
            results[name] = (time.perf_counter() - t, rows)

    base = results["plain loop (in-process decode, 1 thread of Python)"][0]
    print(f"machine: {machine()}")
    print(f"items: {len(items)}  config: {os.path.relpath(args.config, ROOT)}")
    print(f"{'variant':<66} {'wall s':>8} {'rows':>6} {'ratio':>6}")
    for name, (sec, rows) in results.items():
        print(f"{name:<66} {sec:8.2f} {rows:6d} {sec / base:6.2f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"machine": machine(), "items": len(items),
                       "results": {k: {"wall_s": v[0], "rows": v[1], "ratio": v[0] / base}
                                   for k, v in results.items()}},
                      f, indent=2)


if __name__ == "__main__":
    main()
