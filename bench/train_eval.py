"""Reproduce bench/RESULTS.md: the bundled checkpoint, the benchmark table, the archive check.

    python bench/train_eval.py checkpoint   # train encoders/checkpoints/builtin-digits.safetensors
    python bench/train_eval.py eval         # 5-fold speaker-held-out table -> bench/results.json
    python bench/train_eval.py archive      # bundled checkpoint on a freshly built sample archive
    python bench/train_eval.py robustness --checkpoint FILE --speaker NAME
                                            # held-out voice under other rates, loudness, noise

Data paths default to ../shared/data beside the checkout (override with --data DIR).
The archive check builds a sample archive with `xmodal_index.pipeline.sample_archive`
(H.264/AAC mp4: digit frames upscaled to 112x112, FSDD speech resampled to the track
rate at a random offset in each 1 s slot, WebVTT captions), decodes it with the
pipeline's decoder, encodes every segment with the bundled checkpoint and reports
retrieval mAP between the streams of the archive against its ground truth.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "encoders" / "checkpoints" / "builtin-digits.safetensors"

CHECKPOINT_ARGS = ["--objective", "contrastive", "--dim", "256", "--bits", "16,32,64,128", "--epochs", "30",
                   "--seed", "0", "--name", "builtin-digits", "--threads", "1"]
EVAL_ARGS = ["--methods", "cca,contrastive", "--folds", "all", "--epochs", "16", "--bits", "16,32,64", "--threads", "1"]


def _data(args: argparse.Namespace) -> tuple[str, str]:
    data = Path(args.data)
    return str(data / "fsdd"), str(data / "digits" / "digits.csv.gz")


def run_checkpoint(args: argparse.Namespace) -> None:
    fsdd, digits = _data(args)
    cmd = ["xmodal-index", "train", "--fsdd", fsdd, "--digits", digits, *CHECKPOINT_ARGS, "--out", str(CHECKPOINT)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def run_eval(args: argparse.Namespace) -> None:
    fsdd, digits = _data(args)
    out = ROOT / "bench" / "results.json"
    cmd = ["xmodal-index", "eval", "--fsdd", fsdd, "--digits", digits, *EVAL_ARGS, "--out", str(out)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def run_archive(args: argparse.Namespace) -> None:
    from xmodal_index.encoders.config import EncoderConfig
    from xmodal_index.encoders.evaluation import map_float, map_hamming
    from xmodal_index.encoders.loading import load_encoder
    from xmodal_index.pipeline.decode import DecodeConfig, decode_item
    from xmodal_index.pipeline.listing import list_items
    from xmodal_index.pipeline.sample_archive import SampleArchiveConfig, write_sample_archive

    encoder = load_encoder(EncoderConfig(checkpoint=args.checkpoint or "bundled"))
    with tempfile.TemporaryDirectory() as tmp:
        config = SampleArchiveConfig(seed=args.seed, videos=args.videos, segments_per_video=args.slots,
                                     audio_files=100, image_files=100, text_files=100)
        write_sample_archive(tmp, config)
        truth: dict[tuple[str, str, float], int] = {}
        for line in (Path(tmp) / "ground_truth.jsonl").read_text().splitlines():
            row = json.loads(line)
            if args.speaker and row["modality"] == "audio" and row.get("speaker") != args.speaker:
                continue  # audio of the other speakers is left out of the check
            truth[(row["path"], row["modality"], round(row["start_s"], 2))] = row["digit"]
        payloads: dict[str, list] = defaultdict(list)
        labels: dict[str, list] = defaultdict(list)
        started = time.perf_counter()
        for item in list_items(tmp):
            rel = str(Path(item.uri.removeprefix("file://")).resolve().relative_to(Path(tmp).resolve()))
            for seg in decode_item(item, DecodeConfig(segment_s=config.slot_s)):
                digit = truth.get((rel, seg.modality, round(seg.start_s, 2)))
                if digit is None:
                    continue
                kind = seg.modality if item.kind == "video" else f"{seg.modality} file"
                payloads[kind].append(seg.payload)
                labels[kind].append(digit)
        decode_s = time.perf_counter() - started
    emb = {k: encoder.embed(k.split()[0], v) for k, v in payloads.items()}
    labels_np = {k: np.asarray(v) for k, v in labels.items()}
    print(f"archive: {config.videos} videos x {config.segments_per_video} slots (seed {config.seed}); "
          f"segments: {', '.join(f'{k} {len(v)}' for k, v in payloads.items())}; decode {decode_s:.0f} s")
    print(f"model {encoder.model_id}" + (f"; audio of speaker {args.speaker} only" if args.speaker else ""))
    print(f"{'query -> database':<28}{'float':>8}{'64 bits':>9}{'top-1':>8}")
    pairs = [("audio", "video"), ("video", "audio"), ("text", "video"), ("text", "audio"), ("audio", "text"),
             ("audio file", "video"), ("image file", "audio"), ("text file", "video"), ("audio file", "image file")]
    for q, d in pairs:
        if q not in emb or d not in emb:
            continue
        ql, dl = labels_np[q], labels_np[d]
        scores = emb[q] @ emb[d].T
        top1 = float(np.mean(dl[np.argmax(scores, axis=1)] == ql))
        m64 = map_hamming(encoder.codes(emb[q], 64), encoder.codes(emb[d], 64), ql, dl)
        print(f"{q + ' -> ' + d:<28}{map_float(emb[q], emb[d], ql, dl):>8.3f}{m64:>9.3f}{top1:>8.3f}")


def run_robustness(args: argparse.Namespace) -> None:
    """audio->image mAP of a held-out speaker's clips under recording conditions never trained on."""
    from xmodal_index.encoders.config import EncoderConfig
    from xmodal_index.encoders.evaluation import fold_sets, map_float, map_hamming
    from xmodal_index.encoders.loading import load_encoder
    from xmodal_index.encoders.tri_modal import load_digit_images, load_fsdd, resample

    if not args.checkpoint or not args.speaker:
        raise SystemExit("robustness needs --checkpoint (trained without --speaker) and --speaker")
    fsdd, digits = _data(args)
    _, sets = fold_sets(load_fsdd(fsdd), load_digit_images(digits), args.speaker)
    encoder = load_encoder(EncoderConfig(checkpoint=args.checkpoint))
    images = encoder.embed("image", list(sets["image"].payloads))
    rng = np.random.default_rng(0)
    sr = 16000

    def via(rate: int):
        return lambda x: resample(resample(x, sr, rate), rate, sr)

    def noisy(snr_db: float):
        return lambda x: (x + rng.standard_normal(x.size).astype(np.float32)
                          * np.sqrt(np.mean(x**2)) / 10 ** (snr_db / 20))

    def in_window(x):  # 2 s of silence-padded audio at a random offset, 30 dB quieter
        out = np.zeros(2 * sr, np.float32)
        start = int(rng.integers(0, max(1, out.size - x.size)))
        out[start : start + x.size] = x[: out.size] * 10 ** (-30 / 20)
        return out

    def wideband(x):  # what a 44.1 kHz microphone adds above the 4 kHz an 8 kHz recording keeps
        spec = np.fft.rfft(rng.standard_normal(x.size))
        spec[: int(spec.size * 4000 / 8000)] = 0
        envelope = np.convolve(np.abs(x), np.hanning(641), mode="same")  # smooth (40 ms): adds no low frequencies
        hiss = np.fft.irfft(spec, n=x.size) * envelope / (envelope.max() + 1e-9)
        return x + hiss.astype(np.float32) * np.sqrt(np.mean(x**2)) / (np.sqrt(np.mean(hiss**2)) + 1e-9)

    conditions = {
        "as recorded (8 kHz source)": lambda x: x,
        "quiet (-30 dB)": lambda x: x * 10 ** (-30 / 20),
        "loud, clipped (+12 dB)": lambda x: np.clip(x * 4.0, -1, 1),
        "via 22.05 kHz": via(22050),
        "via 44.1 kHz": via(44100),
        "energy added at 4-8 kHz (0 dB)": wideband,
        "white noise, 20 dB SNR": noisy(20.0),
        "white noise, 10 dB SNR": noisy(10.0),
        "2 s window, random offset, -30 dB": in_window,
        "faster (x1.1)": lambda x: resample(x, sr, int(sr / 1.1)),
        "slower (x0.9)": lambda x: resample(x, sr, int(sr / 0.9)),
    }
    labels = sets["audio"].labels
    print(f"model {encoder.model_id}; held-out speaker {args.speaker}; {len(labels)} clips vs {len(images)} images")
    print(f"{'condition':<36}{'float':>8}{'64 bits':>9}")
    for name, fn in conditions.items():
        audio = encoder.embed("audio", [fn(np.asarray(x, np.float32)).astype(np.float32)
                                        for x in sets["audio"].payloads])
        m64 = map_hamming(encoder.codes(audio, 64), encoder.codes(images, 64), labels, sets["image"].labels)
        print(f"{name:<36}{map_float(audio, images, labels, sets['image'].labels):>8.3f}{m64:>9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["checkpoint", "eval", "archive", "robustness"])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="directory with fsdd/ and digits/")
    parser.add_argument("--checkpoint", default=None, help="archive/robustness: checkpoint to test (default: bundled)")
    parser.add_argument("--videos", type=int, default=30, help="archive step: videos in the test archive")
    parser.add_argument("--slots", type=int, default=10, help="archive step: digit slots per video")
    parser.add_argument("--seed", type=int, default=123, help="archive step: seed of the test archive")
    parser.add_argument("--speaker", default=None, help="archive/robustness: the held-out FSDD speaker")
    args = parser.parse_args()
    steps = {"checkpoint": run_checkpoint, "eval": run_eval, "archive": run_archive, "robustness": run_robustness}
    steps[args.step](args)


if __name__ == "__main__":
    sys.exit(main())
