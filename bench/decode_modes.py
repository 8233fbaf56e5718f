"""Decode modes (uniform, fast, keyframes): cost, retrieval quality, cores busy and peak RSS.

    python bench/decode_modes.py [--clip-s 30] [--keep DIR] [--json bench/decode_modes.json]

One run, same machine, everything side by side:

1. Archives generated here from the CC0 clips in ``../shared/data/real_media``
   (or ``--media DIR``): 720p and 1080p H.264 (libx264 veryfast, B-frames, 25 fps,
   GOP 250 with scene cuts off, as cameras and broadcasters write) + AAC 44.1 kHz
   stereo. Each mode decodes them in this process with ``decode_item`` (one
   decoder thread, audio included): media-seconds per CPU-second and the ratio
   to uniform.
2. Retrieval quality on the bundled sample archive (``make-sample``): its videos
   are decoded in each mode and encoded with the bundled encoder; the ten digit
   words are the text queries; text -> video mAP and top-1 accuracy against the
   sample's ground truth (the digit shown in each segment).
3. ``xmodal-index run`` (default config, isolated decoding, DirectRunner) in a
   subprocess on 1x, 4x and 10x a small 720p archive: media-seconds per
   wall-second against 2x the bare decode rate of step 1, cores busy (CPU
   seconds of the whole process tree / wall / cores) and the tree's peak RSS.
"""

from __future__ import annotations

import argparse
import fractions
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import av
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MEDIA = os.path.join(ROOT, "..", "shared", "data", "real_media")
FPS = 25
GOP = 250
AUDIO_RATE = 44100
MODES = {"uniform": {}, "fast": {"fast": True}, "keyframes": {"frame_mode": "keyframes"}}
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def machine() -> str:
    cpu = "unknown CPU"
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu == "unknown CPU":
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = line.split()
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    bf16 = ", avx512_bf16" if "avx512_bf16" in flags else ""
    load = os.getloadavg()[0]
    return (f"{os.cpu_count()} vCPU {cpu}{bf16}, {mem:.0f} GiB, {platform.system()} {platform.machine()}, "
            f"Python {platform.python_version()}, PyAV {av.__version__}, load average {load:.1f} at start")


# ---------------------------------------------------------------- archive generation


def _source_clips(media: str) -> list[str]:
    names = ["cc0-videos/flower.mp4", "cc0-videos/friday.mp4", "examples/stream-of-water.mp4"]
    clips = [os.path.join(media, n) for n in names if os.path.exists(os.path.join(media, n))]
    if not clips:
        raise SystemExit(f"no source clips under {media} (expected {', '.join(names)})")
    return clips


def _load_clip(path: str, width: int, height: int) -> tuple[list[np.ndarray], np.ndarray]:
    """A clip's frames as yuv420p planes at width x height, and its audio as 44.1 kHz stereo float32."""
    frames, audio = [], []
    with av.open(path) as c:
        for f in c.decode(video=0):
            frames.append(f.reformat(width=width, height=height, format="yuv420p").to_ndarray())
    with av.open(path) as c:
        if c.streams.audio:
            resampler = av.AudioResampler(format="fltp", layout="stereo", rate=AUDIO_RATE)
            for f in c.decode(audio=0):
                for out in resampler.resample(f):
                    audio.append(out.to_ndarray())
    samples = np.concatenate(audio, axis=1) if audio else np.zeros((2, AUDIO_RATE), np.float32)
    return frames, samples


def make_archive(out_dir: str, media: str, width: int, height: int, files: int, clip_s: float) -> list[str]:
    """``files`` H.264 + AAC mp4 files of ``clip_s`` seconds, each looping a different source clip."""
    os.makedirs(out_dir, exist_ok=True)
    sources = [_load_clip(p, width, height) for p in _source_clips(media)]
    paths = []
    n_frames = round(clip_s * FPS)
    n_samples = round(clip_s * AUDIO_RATE)
    for k in range(files):
        frames, samples = sources[k % len(sources)]
        path = os.path.join(out_dir, f"clip_{width}x{height}_{k:02d}.mp4")
        with av.open(path, "w") as out:
            vs = out.add_stream("libx264", rate=FPS, options={
                "preset": "veryfast", "crf": "23", "g": str(GOP), "keyint_min": str(GOP), "sc_threshold": "0"})
            vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
            vs.codec_context.thread_count = 0
            aus = out.add_stream("aac", rate=AUDIO_RATE, layout="stereo")
            aus.bit_rate = 128_000
            for i in range(n_frames):
                frame = av.VideoFrame.from_ndarray(frames[(i + 7 * k) % len(frames)], format="yuv420p")
                frame.pts, frame.time_base = i, fractions.Fraction(1, FPS)
                out.mux(vs.encode(frame))
            out.mux(vs.encode(None))
            chunk = aus.codec_context.frame_size or 1024
            looped = np.tile(samples, (1, n_samples // samples.shape[1] + 1))[:, :n_samples]
            for start in range(0, n_samples, chunk):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(looped[:, start:start + chunk]),
                                                   format="fltp", layout="stereo")
                frame.sample_rate, frame.pts, frame.time_base = AUDIO_RATE, start, fractions.Fraction(1, AUDIO_RATE)
                out.mux(aus.encode(frame))
            out.mux(aus.encode(None))
        paths.append(path)
    return paths


# ---------------------------------------------------------------- 1. decode cost


def _item(path: str):
    from xmodal_index.pipeline.types import MediaItem

    return MediaItem(uri=path, kind="video", size=os.path.getsize(path), mtime=0.0, etag="bench")


def decode_cost(paths: list[str], mode: dict, repeat: int) -> dict:
    """Best of ``repeat`` passes: CPU seconds (this process, all threads) and wall seconds."""
    from xmodal_index.pipeline.decode import DecodeConfig, decode_item

    config = DecodeConfig(**mode)
    best = None
    for _ in range(repeat):
        media_s, rows, cpu, wall = 0.0, 0, time.process_time(), time.perf_counter()
        for path in paths:
            rows += sum(1 for _ in decode_item(_item(path), config))
            media_s += _duration(path)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        if best is None or cpu < best["cpu_s"]:
            best = {"media_s": media_s, "cpu_s": cpu, "wall_s": wall, "rows": rows}
    best["media_s_per_cpu_s"] = best["media_s"] / best["cpu_s"]
    return best


def audio_cost(paths: list[str]) -> float:
    """CPU seconds of the audio track alone (PyAV to 16 kHz mono), the floor of every mode."""
    from xmodal_index.pipeline.audio import open_audio, take_audio
    from xmodal_index.pipeline.decode import DecodeConfig, probe, segment_bounds

    config = DecodeConfig()
    cpu = time.process_time()
    for path in paths:
        info = probe(path, path, config)
        with open_audio(path, path, info.audio.index, info.start_s, config.audio_sample_rate, "pyav") as track:
            for start, end in segment_bounds(info.duration_s, config.segment_s):
                take_audio(track, start, end)
    return time.process_time() - cpu


def _duration(path: str) -> float:
    with av.open(path) as c:
        return c.duration / 1e6


# ---------------------------------------------------------------- 2. retrieval quality


def average_precision(relevant: np.ndarray) -> float:
    hits = np.cumsum(relevant)
    return float((hits[relevant] / (np.flatnonzero(relevant) + 1)).mean()) if relevant.any() else 0.0


def reencode_fixed_gop(sample_dir: str, gop: int) -> int:
    """Re-encode the H.264 videos of the sample with a fixed GOP and scene cuts off (audio copied);
    the frames' times, and so the ground truth, stay as they were. Returns how many were re-encoded."""
    n = 0
    for name in sorted(os.listdir(os.path.join(sample_dir, "videos"))):
        if not name.endswith(".mp4"):
            continue
        path = os.path.join(sample_dir, "videos", name)
        tmp = path + ".gop.mp4"
        with av.open(path) as src, av.open(tmp, "w") as out:
            vin = src.streams.video[0]
            vout = out.add_stream("libx264", rate=vin.average_rate, options={
                "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "crf": "23"})
            vout.width, vout.height, vout.pix_fmt = vin.width, vin.height, "yuv420p"
            ain = src.streams.audio[0] if src.streams.audio else None
            aout = out.add_stream_from_template(ain) if ain is not None else None
            for packet in src.demux(*[s for s in (vin, ain) if s is not None]):
                if packet.stream is ain:
                    if packet.dts is not None:
                        packet.stream = aout
                        out.mux(packet)
                    continue
                for frame in packet.decode():
                    frame.pict_type = av.video.frame.PictureType.NONE
                    out.mux(vout.encode(frame))
            out.mux(vout.encode(None))
        os.replace(tmp, path)
        n += 1
    return n


def retrieval_quality(sample_dir: str) -> dict:
    sample_dir = os.path.abspath(sample_dir)
    from xmodal_index.encoders.config import EncoderConfig
    from xmodal_index.encoders.loading import load_encoder
    from xmodal_index.pipeline.decode import DecodeConfig, decode_item
    from xmodal_index.pipeline.listing import list_items

    truth = {}
    with open(os.path.join(sample_dir, "ground_truth.jsonl")) as f:
        for line in f:
            d = json.loads(line)
            if d["modality"] == "video":
                truth[(os.path.join(sample_dir, d["path"]), round(d["start_s"], 3))] = d["digit"]
    encoder = load_encoder(EncoderConfig())
    queries = encoder.encode("text", list(WORDS)).embeddings
    items = [i for i in list_items(sample_dir) if i.kind == "video"]
    out = {}
    for name, mode in MODES.items():
        config = DecodeConfig(segment_s=1.0, frame_rate_hz=2.0, **mode)  # examples/sample.toml
        segs = [s for item in items for s in decode_item(item, config) if s.modality == "video"]
        segs = [s for s in segs if (s.uri, round(s.start_s, 3)) in truth]
        emb = encoder.encode("video", [s.payload for s in segs]).embeddings
        digits = np.array([truth[(s.uri, round(s.start_s, 3))] for s in segs])
        scores = queries @ emb.T
        aps, top1 = [], []
        for d in sorted(set(digits.tolist())):  # queries with at least one relevant segment
            order = np.argsort(-scores[d], kind="stable")
            aps.append(average_precision(digits[order] == d))
            top1.append(digits[order[0]] == d)
        sampling = {}
        for s in segs:
            sampling[s.sampling] = sampling.get(s.sampling, 0) + 1
        out[name] = {"map": float(np.mean(aps)), "top1": float(np.mean(top1)), "segments": len(segs),
                     "sampling": sampling}
    return out


# ---------------------------------------------------------------- 3. whole runs


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _proc_sample(pid: int) -> tuple[float, int]:
    """(CPU seconds, RSS bytes) of one process."""
    tick = os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    with open(f"/proc/{pid}/statm") as f:
        rss_pages = int(f.read().split()[1])
    return (int(fields[11]) + int(fields[12])) / tick, rss_pages * os.sysconf("SC_PAGE_SIZE")


def measure_run(source: str, workdir: str, config: str) -> dict:
    """``xmodal-index run`` in a subprocess; the process tree polled every 0.1 s."""
    cmd = [sys.executable, "-m", "xmodal_index", "run", "--source", source, "--workdir", workdir, "--config", config,
           "--no-progress"]
    before = os.times()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    cpu_by_pid: dict[int, float] = {}
    peak_rss = 0
    while proc.poll() is None:
        rss = 0
        for p in _tree(proc.pid):
            try:
                cpu, r = _proc_sample(p)
            except (OSError, IndexError, ValueError):
                continue
            cpu_by_pid[p] = max(cpu_by_pid.get(p, 0.0), cpu)
            rss += r
        peak_rss = max(peak_rss, rss)
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    err = proc.stderr.read()
    after = os.times()
    reaped = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    summary = {}
    for name in os.listdir(os.path.join(workdir, "runs")):
        path = os.path.join(workdir, "runs", name, "summary.json")
        if os.path.exists(path):
            with open(path) as f:
                summary = json.load(f)
    cpu = max(sum(cpu_by_pid.values()), reaped)
    return {"exit_code": proc.returncode, "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak_rss / 2**20,
            "rows": summary.get("rows_written"), "stderr_tail": err[-400:] if proc.returncode else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--media", default=DEFAULT_MEDIA, help="folder of the CC0 source clips")
    ap.add_argument("--clip-s", type=float, default=30.0, help="seconds of each generated file")
    ap.add_argument("--files", type=int, default=3, help="files per resolution")
    ap.add_argument("--repeat", type=int, default=2, help="decode passes per mode (best counts)")
    ap.add_argument("--scales", default="1,4,10", help="copies of the small archive for whole runs")
    ap.add_argument("--steps", default="decode,quality,runs", help="which steps to run (comma-separated)")
    ap.add_argument("--quality-gop", type=int, default=0,
                    help="also measure quality with the sample's videos re-encoded at this fixed GOP (0: no)")
    ap.add_argument("--keep", help="generate the archives into this folder and reuse them when there")
    ap.add_argument("--json", dest="json_out", help="also write the results here (after each step)")
    args = ap.parse_args()

    def save() -> None:
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(results, f, indent=2)

    results: dict = {"machine": machine(), "command": " ".join(["python", "bench/decode_modes.py", *sys.argv[1:]])}
    print(results["machine"], flush=True)
    with tempfile.TemporaryDirectory(prefix="xmodal-decode-bench-") as tmp:
        t = time.perf_counter()
        keep = args.keep or tmp
        archives = {}
        for res, (w, h) in (("720p", (1280, 720)), ("1080p", (1920, 1080))):
            folder = os.path.join(keep, f"a{h}-{args.files}x{args.clip_s:g}s")
            done = os.path.join(folder, "DONE")
            if not os.path.exists(done):
                make_archive(folder, args.media, w, h, args.files, args.clip_s)
                open(done, "w").close()
            archives[res] = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".mp4"))
        print(f"archives generated in {time.perf_counter() - t:.0f} s", flush=True)

        steps = set(args.steps.split(","))
        # 1. decode cost
        for res, paths in archives.items() if "decode" in steps else ():
            results.setdefault("decode", {})
            decode_cost(paths[:1], MODES["uniform"], 1)  # warm imports and caches
            row = {name: decode_cost(paths, mode, args.repeat) for name, mode in MODES.items()}
            base = row["uniform"]["media_s_per_cpu_s"]
            for name in row:
                row[name]["ratio_to_uniform"] = row[name]["media_s_per_cpu_s"] / base
            audio_cpu = audio_cost(paths)
            row["audio track alone"] = {"media_s": row["uniform"]["media_s"], "cpu_s": audio_cpu,
                                        "media_s_per_cpu_s": row["uniform"]["media_s"] / audio_cpu}
            results["decode"][res] = row
            for name, r in row.items():
                ratio = f"{r['ratio_to_uniform']:6.2f}x" if "ratio_to_uniform" in r else ""
                print(f"{res:6} {name:18} {r['media_s']:7.1f} media-s {r['cpu_s']:7.2f} CPU-s "
                      f"{r['media_s_per_cpu_s']:8.1f} media-s/CPU-s {ratio}", flush=True)
            save()

        # 2. retrieval quality on the bundled sample (as built; and re-encoded at a fixed GOP)
        sample = os.path.join(tmp, "sample")
        if "quality" in steps:
            subprocess.run([sys.executable, "-m", "xmodal_index", "make-sample", "--out", sample], check=True,
                           stdout=subprocess.DEVNULL)
            variants = [("quality", None)] + ([(f"quality_gop{args.quality_gop}", args.quality_gop)]
                                              if args.quality_gop else [])
            for key, gop in variants:
                if gop:
                    print(f"sample videos re-encoded at GOP {gop}: {reencode_fixed_gop(sample, gop)}", flush=True)
                results[key] = retrieval_quality(sample)
                for name, q in results[key].items():
                    print(f"{key} {name:10} text->video mAP {q['map']:.3f} top-1 {q['top1']:.2f} "
                          f"({q['segments']} segments, {q['sampling']})", flush=True)
                save()

        # 3. whole runs at 1x / 4x / 10x a small archive
        small = archives["720p"][:2]
        bare = results.get("decode", {}).get("720p", {}).get("uniform", {}).get("media_s_per_cpu_s", float("nan"))
        results["runs"] = {}
        runs = (("default", ""), ("keyframes", '[decode]\nframe_mode = "keyframes"\n')) if "runs" in steps else ()
        for variant, toml in runs:
            scales = [int(s) for s in args.scales.split(",")] if variant == "default" else [max(
                int(s) for s in args.scales.split(","))]
            config = os.path.join(tmp, f"{variant}.toml")
            with open(config, "w") as f:
                f.write(toml + "[run]\nmax_error_fraction = 0.0\n")
            for scale in scales:
                src = os.path.join(tmp, f"src-{variant}-{scale}")
                os.makedirs(src)
                media_s = 0.0
                for copy in range(scale):
                    for p in small:
                        os.link(p, os.path.join(src, f"c{copy:02d}_{os.path.basename(p)}"))
                        media_s += _duration(p)
                r = measure_run(src, os.path.join(tmp, f"work-{variant}-{scale}"), config)
                r["media_s"] = media_s
                r["media_s_per_wall_s"] = media_s / r["wall_s"]
                r["against_2x_bare_decode"] = r["media_s_per_wall_s"] / (2 * bare)
                r["cores_busy"] = r["cpu_s"] / r["wall_s"]
                r["cores_busy_share"] = r["cores_busy"] / (os.cpu_count() or 1)  # CPU / wall / cores
                r["load_average_after"] = os.getloadavg()[0]
                results["runs"][f"{variant} {scale}x"] = r
                save()
                print(f"run {variant:9} {scale:2d}x {media_s:6.0f} media-s wall {r['wall_s']:6.1f} s "
                      f"{r['media_s_per_wall_s']:6.1f} media-s/wall-s ({r['against_2x_bare_decode']:.2f} of 2x bare) "
                      f"cores busy {r['cores_busy']:.2f} of {os.cpu_count()} peak RSS {r['peak_rss_mb']:.0f} MB "
                      f"exit {r['exit_code']} "
                      f"{r['stderr_tail']}", flush=True)
                shutil.rmtree(src)
    save()


if __name__ == "__main__":
    main()
