"""`xmodal-index eval`: speaker-held-out cross-modal retrieval mAP on the tri-modal digits benchmark."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import click

from xmodal_index.encoders.base import EncoderError
from xmodal_index.encoders.builtin import BuiltinEncoder, load_builtin
from xmodal_index.encoders.config import EncoderConfig
from xmodal_index.encoders.evaluation import (
    benchmark_protocol,
    evaluate_encoder,
    fold_sets,
    format_table,
    mean_over_folds,
    speaker_folds,
)
from xmodal_index.encoders.objectives import OBJECTIVES
from xmodal_index.encoders.training import TrainConfig, TrainingError, train_model
from xmodal_index.encoders.tri_modal import load_digit_images, load_fsdd

from .params import parse_bits
from .train_cmd import command_line

logger = logging.getLogger(__name__)

METHOD_LABELS = {
    "cca": "CCA (linear, fixed features)",
    "contrastive": "ours: contrastive + hash",
    "triplet": "ours: triplet + hash",
    "dcca": "ours: deep CCA + hash",
}
QUICK_EPOCHS = 6


def _parse_methods(value: str) -> tuple[str, ...]:
    methods = tuple(m.strip() for m in value.split(",") if m.strip())
    bad = [m for m in methods if m not in OBJECTIVES]
    if not methods or bad:
        raise click.BadParameter(f"{value!r}: methods must be a comma-separated subset of {', '.join(OBJECTIVES)}")
    return methods


@click.command("eval")
@click.option("--fsdd", required=True, type=click.Path(exists=True, file_okay=False),
              help="Free Spoken Digit Dataset directory ({digit}_{speaker}_{index}.wav, here or in recordings/).")
@click.option("--digits", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Digit images CSV (64 pixel columns 0..16, then the label; .gz allowed).")
@click.option("--checkpoint", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Evaluate this checkpoint on every fold instead of training per fold. Its numbers are "
                   "speaker-held-out only if it was trained without the fold's speaker. Default: train per fold.")
@click.option("--methods", default="cca,contrastive", show_default=True, callback=lambda c, p, v: _parse_methods(v),
              help=f"Objectives trained per fold (comma-separated, from {', '.join(OBJECTIVES)}); "
                   "cca is the linear baseline.")
@click.option("--folds", default="all", show_default=True,
              help="all: leave each speaker out in turn; NAME[,NAME]: only those held-out speakers.")
@click.option("--quick", is_flag=True, default=False,
              help=f"Smoke run: one fold (the first speaker) and {QUICK_EPOCHS} epochs. Default: off.")
@click.option("--epochs", type=click.IntRange(1), default=16, show_default=True,
              help="Training epochs per fold (passes over the training clips).")
@click.option("--bits", "bits", default="16,32,64", show_default=True, callback=lambda c, p, v: parse_bits(v),
              help="Hash code lengths (bits) to report, comma-separated.")
@click.option("--image-test-fraction", type=click.FloatRange(0.05, 0.95), default=0.5, show_default=True,
              help="Share of the digit images held out as the image database/queries (stratified split).")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True,
              help="Seed of the image split, database shuffles and training (integer).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto uses CUDA when torch sees a GPU, else the CPU.")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
              help="torch CPU threads (count); 0 keeps torch's default. 1 is fastest on a busy shared machine.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Results JSON to write (per fold and mean, with the protocol).")
def eval_cmd(fsdd, digits, checkpoint, methods, folds, quick, epochs, bits, image_test_fraction, seed, device, threads,
             out) -> None:
    """Cross-modal retrieval mAP (float and hash codes) with leave-one-speaker-out folds.

    Prints one table per direction (rows: methods; columns: float embeddings and
    each code length) with the protocol beside it, and writes the same as JSON.
    """
    started = time.perf_counter()
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        audio = load_fsdd(fsdd)
        images = load_digit_images(digits)
    except EncoderError as err:
        raise click.ClickException(str(err)) from err
    speakers = speaker_folds(audio.speakers)
    if quick:
        held_out, epochs = speakers[:1], min(epochs, QUICK_EPOCHS)
    elif folds == "all":
        held_out = speakers
    else:
        held_out = [f.strip() for f in folds.split(",") if f.strip()]
        unknown = [f for f in held_out if f not in speakers]
        if unknown:
            raise click.BadParameter(f"{', '.join(unknown)} not among the speakers {', '.join(speakers)}",
                                     param_hint="--folds")
    labels = ({"checkpoint": f"checkpoint {Path(checkpoint).name}"} if checkpoint
              else {m: METHOD_LABELS[m] for m in methods})
    per_fold: dict[str, dict[str, Any]] = {label: {} for label in labels.values()}
    train_seconds: dict[str, list[float]] = {label: [] for label in labels.values()}
    try:
        fixed = _load_checkpoint(checkpoint, device) if checkpoint else None
        for speaker in held_out:
            train, sets = fold_sets(audio, images, speaker, image_test_fraction, seed)
            for method, label in labels.items():
                t0 = time.perf_counter()
                if fixed is not None:
                    encoder = fixed
                else:
                    click.echo(f"fold {speaker}: training {method} ...", err=True)
                    config = TrainConfig(objective=method, epochs=epochs, seed=seed, device=device,
                                         bits=tuple(sorted(set(bits) | {16, 32, 64, 128})))
                    result = train_model(train, config)
                    encoder = BuiltinEncoder(result.net, f"{method}-fold-{speaker}@in-memory", bits=bits[0],
                                             device=device)
                train_seconds[label].append(time.perf_counter() - t0)
                per_fold[label][speaker] = evaluate_encoder(encoder, sets, bits)
                row = per_fold[label][speaker].get("audio->image", {})
                click.echo(f"fold {speaker}: {label}: audio->image "
                           + " ".join(f"{k}={v:.3f}" for k, v in row.items()), err=True)
    except (EncoderError, TrainingError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    columns = ["float"] + [str(b) for b in bits]
    means = {label: mean_over_folds(list(folds_.values())) for label, folds_ in per_fold.items()}
    protocol = benchmark_protocol(image_test_fraction, seed) + (
        f" Folds: {', '.join(held_out)}."
        + (f" Deep methods trained per fold for {epochs} epochs, CCA in closed form." if not checkpoint else
           " One fixed checkpoint for every fold: speaker-held-out only if it was "
           "trained without that speaker.")
    )
    click.echo(format_table(means, columns, protocol))
    report = {
        "protocol": protocol,
        "columns": columns,
        "folds": held_out,
        "results": {label: {"mean": means[label], "per_fold": per_fold[label],
                            "train_seconds": [round(s, 1) for s in train_seconds[label]]} for label in per_fold},
        "command": command_line(click.get_current_context()),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")
    click.echo(f"results written to {out} ({report['wall_s']:.0f} s)", err=True)


def _load_checkpoint(path: str, device: str) -> BuiltinEncoder:
    from xmodal_index.encoders.builtin import read_checkpoint

    ckpt = read_checkpoint(path)
    return load_builtin(EncoderConfig(checkpoint=path, dim=ckpt.model_config.dim, bits=ckpt.model_config.bits[0],
                                      device=device))
