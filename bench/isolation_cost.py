"""What decoding in isolated worker processes costs, against decoding in-process.

    python bench/isolation_cost.py [--clips 24] [--duration-s 10] [--size 128] [--repeat 3]
    python bench/isolation_cost.py --media-dir ../shared/data/real_media

Generates H.264+AAC clips (or takes every media file under --media-dir), then
decodes the same items, alternating the variants in each round:
  in-process    decode_item in this process
  isolated x1   IsolatedDecoder, one warm worker (segments pickled back through a pipe)
  isolated x2   IsolatedDecoder.decode_many, two warm workers decoding ahead
Workers are started before timing (start-up is printed separately): the figure is
the steady-state cost per item. Prints the best wall time of each variant, media
seconds decoded per wall second, and the ratio to in-process (lower is better),
then the same for the median round (shared machines are noisy: compare both).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests import media_factory  # noqa: E402
from xmodal_index.pipeline.decode import DecodeConfig, DecodeError, decode_item, probe  # noqa: E402
from xmodal_index.pipeline.isolation import IsolatedDecoder  # noqa: E402
from xmodal_index.pipeline.types import MediaItem, kind_of  # noqa: E402


def make_items(args, workdir: str) -> list[MediaItem]:
    paths = []
    if args.media_dir:
        for dirpath, _, names in os.walk(args.media_dir):
            paths += [os.path.join(dirpath, n) for n in sorted(names) if kind_of(n) in ("video", "audio")]
    else:
        for i in range(args.clips):
            paths.append(str(media_factory.make_video(os.path.join(workdir, f"clip-{i:03d}.mp4"),
                                                      duration_s=args.duration_s, fps=25, size=args.size)))
    return [MediaItem(uri=p, kind=kind_of(p), size=os.path.getsize(p), mtime=0.0, etag="bench") for p in sorted(paths)]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=24, help="generated clips (default 24)")
    parser.add_argument("--duration-s", type=float, default=10.0, help="length of each generated clip, s (default 10)")
    parser.add_argument("--size", type=int, default=128, help="width and height of generated clips, px (default 128)")
    parser.add_argument("--media-dir", help="decode the video and audio files under this folder instead")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the best of each variant is kept (default 3)")
    args = parser.parse_args()

    config = DecodeConfig()
    with tempfile.TemporaryDirectory() as workdir:
        items = make_items(args, workdir)
        media_s = sum(probe(i.uri, i.uri, config).duration_s for i in items)
        print(f"{len(items)} items, {media_s:.0f} media-seconds; {os.cpu_count()} CPUs, "
              f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")

        one = IsolatedDecoder(config)
        two = IsolatedDecoder(DecodeConfig(workers=2))
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

    if len(set(counts.values())) != 1:
        raise SystemExit(f"variants produced different segment counts: {counts}")
    best = {name: min(w) for name, w in walls.items()}
    median = {name: statistics.median(w) for name, w in walls.items()}
    print(f"{'variant':<12} {'best s':>8} {'media-s/s':>10} {'ratio':>6} {'median s':>9} {'ratio':>6}"
          f"   ({counts['in-process']} segments each, {args.repeat} rounds)")
    for name in walls:
        print(f"{name:<12} {best[name]:8.3f} {media_s / best[name]:10.0f} {best[name] / best['in-process']:6.2f}"
              f" {median[name]:9.3f} {median[name] / median['in-process']:6.2f}")


if __name__ == "__main__":
    main()
