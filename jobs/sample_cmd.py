"""`xmodal-index make-sample`: write the bundled sample archive with its ground truth."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from xmodal_index.pipeline.sample_archive import (
    OWN_PATHS,
    ArchiveExistsError,
    SampleArchiveConfig,
    SampleArchiveError,
    SampleManifest,
    write_sample_archive,
)

logger = logging.getLogger(__name__)

_KIND_LABELS = (
    ("video", "videos", "mp4 / webm, H.264+AAC / VP9+Opus"),
    ("caption", "captions", "WebVTT / SRT sidecars"),
    ("audio", "audio", "wav, spoken digits"),
    ("image", "images", "png, handwritten digits"),
    ("text", "texts", "txt"),
    ("other", "other", "ground truth, license"),
)


def _human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024**2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024**2:.1f} MiB"


def _summary(manifest: SampleManifest) -> str:
    root = Path(manifest.root)
    counts, bytes_by_kind = manifest.counts, manifest.bytes_by_kind
    config = manifest.config
    lines = [
        f"Sample archive written to {root}",
        f"  {config.videos} videos x {config.segments_per_video} slots of {config.slot_s:g} s, seed {config.seed}",
    ]
    for kind, label, what in _KIND_LABELS:
        lines.append(f"  {label:<9}{counts[kind]:>4} files  {_human_bytes(bytes_by_kind[kind]):>10}  ({what})")
    lines.append(f"  {'total':<9}{len(manifest.sha256):>4} files  {_human_bytes(manifest.total_bytes):>10}")
    lines.append(f"Ground truth: {root / manifest.ground_truth} "
                 f"({manifest.ground_truth_lines} lines, one per file, stream and time segment)")
    lines.append(f"License: {root / 'LICENSE.md'} (adapted from FSDD: CC BY-SA 4.0)")
    lines.append(f"Slots are {config.slot_s:g} s long: index with {config.slot_s:g} s segments "
                 f"to align segments with the ground truth.")
    return "\n".join(lines)


@click.command("make-sample")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Directory to write the archive into; created if missing, must be empty unless --force.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1),
              help="Random seed (integer) choosing digits, speakers, images and speech offsets; "
                   "the same seed gives byte-identical files.")
@click.option("--videos", default=6, show_default=True, type=click.IntRange(1, 100),
              help="Number of video clips (count); with 2 or more one has no caption sidecar, "
                   "with 3 or more one is a webm with an SRT sidecar.")
@click.option("--segments-per-video", default=8, show_default=True, type=click.IntRange(1, 100),
              help="Number of digit slots per video (count).")
@click.option("--slot-s", default=1.0, show_default=True, type=click.FloatRange(0.2, 10.0),
              help="Length of one slot in seconds; a whole number of frames at 10 fps (multiple of 0.1 s).")
@click.option("--force", is_flag=True, default=False, show_default=True,
              help=f"Replace an existing sample archive in --out (removes {', '.join(OWN_PATHS)} there first; "
                   "other files are kept). Default: off.")
def make_sample(out_dir: str, seed: int, videos: int, segments_per_video: int, slot_s: float, force: bool) -> None:
    """Write a small real media archive with known ground truth (spoken and handwritten digits).

    Videos show handwritten digits while a voice speaks the same digit; captions,
    stand-alone audio, images and texts name digits too. ground_truth.jsonl gives
    the digit of every file and time segment. Index it with `xmodal-index run`.
    """
    try:
        config = SampleArchiveConfig(seed=seed, videos=videos, segments_per_video=segments_per_video, slot_s=slot_s)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    try:
        manifest = write_sample_archive(out_dir, config, overwrite=force)
    except ArchiveExistsError as err:
        raise click.ClickException(f"{err}; pass --force to replace a sample archive there") from err
    except SampleArchiveError as err:
        raise click.ClickException(str(err)) from err
    click.echo(_summary(manifest))
