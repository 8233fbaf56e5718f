"""`xmodal-index train`: learn the built-in towers and hash heads, write a checkpoint."""

from __future__ import annotations

import json
import logging
import shlex
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import click
import numpy as np

from xmodal_index.encoders.base import EncoderError
from xmodal_index.encoders.builtin import file_sha256
from xmodal_index.encoders.evaluation import image_split
from xmodal_index.encoders.objectives import OBJECTIVES
from xmodal_index.encoders.training import (
    TrainConfig,
    TrainingError,
    TrainingSet,
    data_fingerprint,
    train_model,
    write_checkpoint,
)
from xmodal_index.encoders.tri_modal import load_digit_images, load_fsdd

from .params import parse_bits

logger = logging.getLogger(__name__)


def archive_tuples(archive: str, max_items: int) -> list[dict[str, Any]]:
    """Co-occurring (audio, frame, caption) tuples of the time segments of a media archive."""
    from xmodal_index.pipeline.decode import DecodeConfig, DecodeError, decode_item
    from xmodal_index.pipeline.listing import list_items

    groups: dict[tuple[str, float], dict[str, Any]] = defaultdict(dict)
    items = [i for i in list_items(archive) if i.kind == "video"][:max_items]
    for item in items:
        try:
            for seg in decode_item(item, DecodeConfig()):
                key = (seg.uri, round(seg.start_s, 3))
                if seg.modality == "video":
                    frames = np.asarray(seg.payload)
                    groups[key]["image"] = frames[len(frames) // 2]
                elif seg.modality == "audio":
                    groups[key]["audio"] = np.asarray(seg.payload, dtype=np.float32)
                elif seg.modality == "text" and isinstance(seg.payload, str) and seg.payload.strip():
                    groups[key]["text"] = seg.payload
        except DecodeError as err:
            logger.warning("skipping %s: %s", item.uri, err)
    return [g for g in groups.values() if len(g) >= 2]


def command_line(ctx: click.Context) -> str:
    """The shell command that reproduces a click invocation, every option spelled out."""
    parts = ["xmodal-index", ctx.command.name or ""]
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        if not isinstance(param, click.Option) or value is None or value is False:
            continue
        flag = max(param.opts, key=len)
        if param.is_flag:
            parts.append(flag)
        else:
            parts += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return shlex.join(parts)


@click.command("train")
@click.option("--fsdd", type=click.Path(exists=True, file_okay=False), default=None,
              help="Free Spoken Digit Dataset directory ({digit}_{speaker}_{index}.wav, here or in recordings/). "
                   "Default: none (no labelled audio).")
@click.option("--digits", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Digit images CSV (64 pixel columns 0..16, then the label; .gz allowed). Default: none.")
@click.option("--archive", type=click.Path(exists=True, file_okay=False), default=None,
              help="Media archive directory: audio, frames and captions of the same time segment of its videos "
                   "are trained as co-occurring pairs (no labels needed). Default: none.")
@click.option("--archive-items", type=click.IntRange(1), default=200, show_default=True,
              help="At most this many videos (count) are decoded from --archive.")
@click.option("--objective", type=click.Choice(OBJECTIVES), default="contrastive", show_default=True,
              help="contrastive: InfoNCE with every same-label item a positive; triplet: batch-hard triplets; "
                   "dcca: deep CCA correlation; cca: linear (generalised) CCA on fixed features, closed form. "
                   "All but cca add the hashing loss (similarity, quantisation, bit balance).")
@click.option("--bits", "bits", default="16,32,64,128", show_default=True, callback=lambda c, p, v: parse_bits(v),
              help="Hash code lengths in bits (comma-separated, from 16,32,64,128): one hash head each.")
@click.option("--dim", type=click.IntRange(8, 4096), default=256, show_default=True,
              help="Dimension of the common embedding space.")
@click.option("--epochs", type=click.IntRange(0), default=30, show_default=True,
              help="Passes over the labelled audio clips (ignored by cca).")
@click.option("--batch-size", type=click.IntRange(2), default=128, show_default=True,
              help="Items per modality per training step (count).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=3e-3, show_default=True,
              help="Peak learning rate of the one-cycle AdamW schedule (per step).")
@click.option("--hash-weight", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Weight of the hashing loss relative to the embedding objective (0 disables it).")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True,
              help="Seed of initialisation, sampling and augmentation (integer).")
@click.option("--holdout-speaker", default=None,
              help="Leave this FSDD speaker out of training (for speaker-held-out evaluation). Default: none.")
@click.option("--images", "image_subset", type=click.Choice(["all", "train"]), default="all", show_default=True,
              help="all: every digit image; train: only the training part of the seeded split used by "
                   "`xmodal-index eval` (so that eval --checkpoint stays out-of-sample on images).")
@click.option("--no-augment", is_flag=True, default=False,
              help="Train on clean inputs (no speed/noise/gain/shift/rendering augmentation). Default: augment.")
@click.option("--name", default=None, help="Model name, the part of model_id before '@'. Default: builtin-<objective>.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto uses CUDA when torch sees a GPU, else the CPU.")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
              help="torch CPU threads (count); 0 keeps torch's default.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Checkpoint file to write (.safetensors; weights + config + data fingerprint).")
@click.pass_context
def train(ctx: click.Context, fsdd, digits, archive, archive_items, objective, bits, dim, epochs, batch_size, lr,
          hash_weight, seed, holdout_speaker, image_subset, no_augment, name, device, threads, out) -> None:
    """Learn the built-in encoder's towers and hash heads; write a safetensors checkpoint.

    Labelled data (--fsdd, --digits; the digit words come with them) link modalities
    through their labels; --archive adds co-occurring segments without labels. The
    checkpoint's sha256 becomes the model_id: name@sha256. Load it with
    EncoderConfig(checkpoint=PATH) or `xmodal-index run --config` (encoder.checkpoint).
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    try:
        config = TrainConfig(objective=objective, dim=dim, bits=bits, epochs=epochs, batch_size=batch_size, lr=lr,
                             hash_weight=hash_weight, seed=seed, augment=not no_augment, device=device)
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    try:
        audio = load_fsdd(fsdd) if fsdd else None
        if audio is not None and holdout_speaker:
            if holdout_speaker not in set(audio.speakers.tolist()):
                raise click.UsageError(
                    f"--holdout-speaker {holdout_speaker!r} is not one of {sorted(set(audio.speakers.tolist()))}")
            audio = audio.subset(audio.speakers != holdout_speaker)
        images = load_digit_images(digits) if digits else None
        if images is not None and image_subset == "train":
            images = images.subset(image_split(images.labels)[0])
        cooccur = tuple(archive_tuples(archive, archive_items)) if archive else ()
        data = TrainingSet(audio=audio, images=images, texts=bool(fsdd or digits), cooccur=cooccur)
        fingerprint = data_fingerprint(data)
        click.echo(
            f"training {objective}: {len(audio.waves) if audio else 0} clips, "
            f"{len(images.labels) if images else 0} images, "
            f"{len(cooccur)} co-occurring segments; data fingerprint {fingerprint[:16]}", err=True
        )
        started = time.perf_counter()

        def progress(epoch: int, total: int, loss: float) -> None:
            elapsed = time.perf_counter() - started
            eta_s = elapsed / epoch * (total - epoch)
            click.echo(f"  epoch {epoch}/{total} loss {loss:.4f}  {elapsed:.0f} s, ETA {eta_s:.0f} s", err=True)

        result = train_model(data, config, progress=progress)
        path = write_checkpoint(
            result.net, out, name=name or f"builtin-{objective}", objective=objective, data_fingerprint=fingerprint,
            command=command_line(ctx),
            extra={"train_config": json.dumps(_config_dict(config), sort_keys=True),
                   "final_loss": f"{result.losses[-1]:.6f}" if result.losses else "closed-form"},
        )
    except (EncoderError, TrainingError, OSError) as err:
        raise click.ClickException(str(err)) from err
    model_id = f"{name or f'builtin-{objective}'}@{file_sha256(Path(path))}"
    click.echo(json.dumps({"checkpoint": str(path), "model_id": model_id, "data_fingerprint": fingerprint,
                           "objective": objective, "seconds": round(result.seconds, 1),
                           "losses": [round(x, 4) for x in result.losses]}))


def _config_dict(config: TrainConfig) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(config)
