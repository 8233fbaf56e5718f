"""What decoding in isolated worker processes costs, against decoding in-process.

    python bench/isolation_cost.py [--clips 24] [--duration-s 10] [--size 128] [--repeat 3]
    python bench/isolation_cost.py --sample [--config examples/sample.toml]
    python bench/isolation_cost.py --media-dir ../shared/data/real_media

Generates H.264+AAC clips, or the bundled sample archive (--sample: videos with
caption sidecars, spoken digits, images, texts), or takes every item under
--media-dir, then decodes the same items, alternating the variants in each round:
  in-process    decode_item in this process
  isolated x1   IsolatedDecoder, one warm worker (segments pickled back through a pipe)
  isolated x2   IsolatedDecoder.decode_many, two warm workers decoding ahead
Workers are started before timing (start-up is printed separately): the figure is
the steady-state cost per item.

With --runs N (and --sample or --media-dir), it also times N rounds of the whole
`xmodal-index run` over the same archive with [run] isolate_decoding on and off
(fresh workdir each time, the `xmodal-index` console script; wall_s from the run's
summary.json), which adds the workers' start-up to the per-item cost. Prints the best wall time of each variant, media
seconds decoded per wall second, and the ratio to in-process (lower is better),
then the same for the median round (shared machines are noisy: compare both).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests import media_factory  # noqa: E402 - after sys.path names the repo root
from xmodal_index.jobs.config import load_config  # noqa: E402 - after sys.path names the repo root
from xmodal_index.pipeline.decode import DecodeConfig, DecodeError, decode_item, probe  # noqa: E402 - after sys.path names the repo root
from xmodal_index.pipeline.isolation import IsolatedDecoder  # noqa: E402 - after sys.path names the repo root
from xmodal_index.pipeline.listing import list_items  # noqa: E402 - after sys.path names the repo root
from xmodal_index.pipeline.sample_archive import build_sample_archive  # noqa: E402 - after sys.path names the repo root
from xmodal_index.pipeline.types import MediaItem, kind_of  # noqa: E402 - after sys.path names the repo root


def make_items(args, workdir: str) -> list[MediaItem]:
    if args.sample:
        build_sample_archive(os.path.join(workdir, "sample"))
        return list_items(os.path.join(workdir, "sample"))
    if args.media_dir:
        return list_items(args.media_dir)
    paths = [str(media_factory.make_video(os.path.join(workdir, f"clip-{i:03d}.mp4"), duration_s=args.duration_s,
                                          fps=25, size=args.size)) for i in range(args.clips)]
    return [MediaItem(uri=p, kind=kind_of(p), size=os.path.getsize(p), mtime=0.0, etag="bench") for p in sorted(paths)]


def media_seconds(item: MediaItem, config: DecodeConfig) -> float:
    """Seconds of media an item holds (0 for images and texts, or where it does not probe)."""
    if kind_of(item.uri) not in ("video", "audio"):
        return 0.0
    try:
        return probe(item.uri, item.uri, config).duration_s
    except DecodeError:
        return 0.0


def consume(segments) -> int:
    n = 0
    for _ in segments:
        n += 1
    return n


def in_process(items, config) -> int:
    total = 0
    for item in items:
        try:
            total += consume(decode_item(item, config))
        except DecodeError:
            pass
    return total


def isolated(decoder: IsolatedDecoder, items) -> int:
    total = 0
    for _, segments in decoder.decode_many(items):
        try:
            total += consume(segments)
        except DecodeError:
            pass
    return total


# The console script users run (its decode workers must not re-run it: see isolation.py).
CLI = os.path.join(os.path.dirname(sys.executable), "xmodal-index")


def time_runs(source: str, config_path: str | None, rounds: int, workdir: str) -> None:
    """Median wall of whole runs over ``source``, decoding isolated and in the Beam worker."""
    base = tomllib.loads(open(config_path).read()) if config_path else {}
    walls: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds):
        for isolate in (True, False):
            conf = {**base, "run": {**base.get("run", {}), "isolate_decoding": isolate}}
            conf_path = os.path.join(workdir, f"run-{r}-{isolate}.json")
            with open(conf_path, "w") as f:
                json.dump(conf, f)
            work = os.path.join(workdir, f"work-{r}-{isolate}")
            done = subprocess.run([CLI, "run", "--source", source, "--workdir", work, "--config", conf_path],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"run failed ({done.returncode}): {done.stderr[-2000:]}")
            (summary,) = glob.glob(os.path.join(work, "runs", "*", "summary.json"))
            with open(summary) as f:
                walls[isolate].append(json.load(f)["wall_s"])
    iso, inproc = statistics.median(walls[True]), statistics.median(walls[False])
    print(f"whole runs, median of {rounds}: isolated {iso:.1f} s, in the Beam worker {inproc:.1f} s, "
          f"ratio {iso / inproc:.2f} (all: isolated {walls[True]}, in-process {walls[False]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=24, help="generated clips (default 24)")
    parser.add_argument("--duration-s", type=float, default=10.0, help="length of each generated clip, s (default 10)")
    parser.add_argument("--size", type=int, default=128, help="width and height of generated clips, px (default 128)")
    parser.add_argument("--media-dir", help="decode the items under this folder instead (every kind, with sidecars)")
    parser.add_argument("--sample", action="store_true", help="decode the bundled sample archive instead")
    parser.add_argument("--config", help="job config whose [decode] table to use (default: DecodeConfig defaults)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the best of each variant is kept (default 3)")
    parser.add_argument("--runs", type=int, default=0,
                        help="also time this many rounds of `xmodal-index run` with and without isolation (default 0)")
    args = parser.parse_args()

    config = load_config(args.config).decode if args.config else DecodeConfig()
    with tempfile.TemporaryDirectory() as workdir:
        items = make_items(args, workdir)
        media_s = sum(media_seconds(i, config) for i in items)
        print(f"{len(items)} items, {media_s:.0f} media-seconds; {os.cpu_count()} CPUs, "
              f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")

        one = IsolatedDecoder(config)
        two = IsolatedDecoder(dataclasses.replace(config, workers=2))
        started = time.perf_counter()
        for decoder in (one, two):
            for _, segments in decoder.decode_many(items[:len(decoder.pids)]):
                consume(segments)
        print(f"worker start-up (3 workers, overlapping): {time.perf_counter() - started:.2f} s")

        variants = {"in-process": lambda: in_process(items, config),
                    "isolated x1": lambda: isolated(one, items),
                    "isolated x2": lambda: isolated(two, items)}
        walls: dict[str, list[float]] = {name: [] for name in variants}
        counts = {}
        try:
            for _ in range(args.repeat):
                for name, run in variants.items():
                    t0 = time.perf_counter()
                    counts[name] = run()
                    walls[name].append(time.perf_counter() - t0)
        finally:
            one.close()
            two.close()
        print_table(walls, counts, media_s, args.repeat)
        if args.runs and (args.sample or args.media_dir):
            source = os.path.join(workdir, "sample") if args.sample else args.media_dir
            time_runs(source, args.config, args.runs, workdir)


def print_table(walls: dict[str, list[float]], counts: dict[str, int], media_s: float, repeat: int) -> None:
    if len(set(counts.values())) != 1:
        raise SystemExit(f"variants produced different segment counts: {counts}")
    best = {name: min(w) for name, w in walls.items()}
    median = {name: statistics.median(w) for name, w in walls.items()}
    print(f"{'variant':<12} {'best s':>8} {'media-s/s':>10} {'ratio':>6} {'median s':>9} {'ratio':>6}"
          f"   ({counts['in-process']} segments each, {repeat} rounds)")
    for name in walls:
        print(f"{name:<12} {best[name]:8.3f} {media_s / best[name]:10.0f} {best[name] / best['in-process']:6.2f}"
              f" {median[name]:9.3f} {median[name] / median['in-process']:6.2f}")


if __name__ == "__main__":
    main()
