"""Encode throughput of the built-in encoder per device, in media-seconds per device-second.

    python bench/gpu_encode.py                   # every device this machine has (cpu, and cuda when present)
    python bench/gpu_encode.py --devices cpu --seconds 5

Segments as `run` makes them with the default [decode] config: 2-s segments, audio at
16 kHz (one 2-s clip per audio segment) and video at 1 frame per second resized to
112x112 (two frames per video segment). Each device encodes the same synthetic
segments in batches of --batch-size with the encoder's default precision for that
device ("auto": bf16 autocast on CUDA and on CPUs with native bf16, else fp32), and
the embeddings are compared with fp32 on the CPU (mean cosine). Needs only torch,
numpy and safetensors: it runs on a machine without Beam, FFmpeg or FAISS.
Results: bench/gpu_encode.json and bench/DECODE_RESULTS.md (GPU section).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SEGMENT_S = 2.0
SAMPLE_RATE = 16000
FRAMES_PER_SEGMENT = 2
FRAME_SIZE = 112


def _segments(modality: str, n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    if modality == "audio":
        t = np.arange(int(SEGMENT_S * SAMPLE_RATE)) / SAMPLE_RATE
        return [(0.3 * np.sin(2 * np.pi * (150 + 7 * (i % 50)) * t) + 0.01 * rng.standard_normal(len(t)))
                .astype(np.float32) for i in range(n)]
    return [rng.integers(0, 256, (FRAMES_PER_SEGMENT, FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8) for _ in range(n)]


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def measure(device: str, modality: str, n: int, batch_size: int, seconds: float) -> dict:
    from xmodal_index.encoders.builtin import load_builtin
    from xmodal_index.encoders.config import EncoderConfig

    enc = load_builtin(EncoderConfig(checkpoint="", seed=1, device=device, precision="auto", batch_size=batch_size))
    ref = load_builtin(EncoderConfig(checkpoint="", seed=1, device="cpu", precision="fp32", batch_size=batch_size))
    payloads = _segments(modality, n)
    a = ref.encode(modality, payloads[:64]).embeddings
    b = enc.encode(modality, payloads[:64]).embeddings
    cosine = float(np.mean(np.sum(a * b, axis=1)))
    enc.encode(modality, payloads[:batch_size])  # warm-up (kernels, autotuning)
    _sync(device)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        enc.encode(modality, payloads)
        _sync(device)
        done += n
    wall = time.perf_counter() - started
    return {"device": device, "modality": modality, "precision": str(getattr(enc, "autocast_dtype", None)),
            "segments_per_s": done / wall, "media_s_per_device_s": done * SEGMENT_S / wall,
            "cosine_vs_cpu_fp32": cosine, "batch_size": batch_size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="auto", help="comma-separated cpu,cuda; auto = cpu plus cuda if present")
    parser.add_argument("--segments", type=int, default=1024, help="segments encoded per pass")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=10.0, help="time spent per (device, modality)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "gpu_encode.json"))
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = (["cpu"] + (["cuda"] if torch.cuda.is_available() else [])) if args.devices == "auto" \
        else args.devices.split(",")
    rows = []
    for device in devices:
        for modality in ("audio", "video"):
            row = measure(device, modality, args.segments, args.batch_size, args.seconds)
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {
        "rows": rows,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "command": " ".join(["python", *sys.argv]),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
