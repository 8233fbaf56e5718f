"""`xmodal-index train` and `xmodal-index eval` on tiny synthetic data, and the training loop."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from xmodal_index.encoders.base import CheckpointError
from xmodal_index.encoders.builtin import file_sha256, load_builtin, read_checkpoint
from xmodal_index.encoders.config import EncoderConfig
from xmodal_index.encoders.training import TrainConfig, TrainingSet, data_fingerprint, train_model
from xmodal_index.encoders.tri_modal import load_digit_images, load_fsdd
from xmodal_index.jobs.eval_cmd import eval_cmd
from xmodal_index.jobs.train_cmd import train

SPEAKERS = ("alice", "bob")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models train fastest on one thread (and do not stall when the machine is busy)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write_wav(path: Path, x: np.ndarray, rate: int = 8000) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    """Spoken 'digits' as tones (pitch per digit, timbre per speaker) and 8x8 bar images per digit."""
    root = tmp_path_factory.mktemp("tiny")
    fsdd = root / "fsdd"
    fsdd.mkdir()
    rng = np.random.default_rng(0)
    for digit in range(10):
        for s, speaker in enumerate(SPEAKERS):
            for k in range(3):
                t = np.arange(int(8000 * rng.uniform(0.3, 0.5))) / 8000
                f = 250 * 2 ** (digit / 5)
                x = np.sin(2 * np.pi * f * t) + (0.3 + 0.3 * s) * np.sin(2 * np.pi * 2 * f * t)
                x *= np.sin(np.pi * t / t[-1]) * 0.4
                _write_wav(fsdd / f"{digit}_{speaker}_{k}.wav", x + 0.01 * rng.standard_normal(t.size))
    rows = []
    for digit in range(10):
        for _ in range(6):
            img = np.zeros((8, 8))
            img[digit % 8, :] = 16
            img[:, (digit * 3 + 1) % 8] = 16 if digit >= 8 or digit % 2 else 0
            img = np.clip(img + rng.integers(0, 3, (8, 8)), 0, 16)
            rows.append(",".join(str(int(v)) for v in img.flatten()) + f",{digit}")
    csv = root / "digits.csv"
    csv.write_text("\n".join(rows) + "\n")
    return fsdd, csv


def _run_train(tmp_path: Path, data: tuple[Path, Path], *extra: str) -> tuple[Path, dict]:
    out = tmp_path / "model.safetensors"
    args = ["--fsdd", str(data[0]), "--digits", str(data[1]), "--dim", "32", "--bits", "16,32", "--epochs", "2",
            "--batch-size", "16", "--out", str(out), *extra]
    result = CliRunner().invoke(train, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout.strip().splitlines()[-1])


def test_train_writes_a_loadable_checkpoint_with_its_provenance(tmp_path, tiny_data):
    out, summary = _run_train(tmp_path, tiny_data, "--name", "tiny")
    assert summary["model_id"] == "tiny@" + file_sha256(out)
    enc = load_builtin(EncoderConfig(checkpoint=str(out), dim=32, bits=32))
    assert enc.model_id == summary["model_id"]
    assert enc.encode("text", ["seven"]).codes.shape == (1, 4)
    meta = read_checkpoint(out).metadata
    assert meta["objective"] == "contrastive" and meta["data_fingerprint"] == summary["data_fingerprint"]
    assert meta["command"].startswith("xmodal-index train --fsdd ")


def test_train_with_the_cca_objective(tmp_path, tiny_data):
    out, summary = _run_train(tmp_path, tiny_data, "--objective", "cca")
    enc = load_builtin(EncoderConfig(checkpoint=str(out), dim=32, bits=16))
    assert enc.model_id.startswith("builtin-cca@") and summary["losses"] == []


def test_train_refuses_an_unknown_holdout_speaker(tmp_path, tiny_data):
    result = CliRunner().invoke(train, ["--fsdd", str(tiny_data[0]), "--holdout-speaker", "carol",
                                        "--out", str(tmp_path / "m")])
    assert result.exit_code != 0 and "carol" in result.output


def test_train_refuses_bad_bit_lengths(tmp_path, tiny_data):
    result = CliRunner().invoke(train, ["--fsdd", str(tiny_data[0]), "--bits", "16,48", "--out", str(tmp_path / "m")])
    assert result.exit_code != 0 and "48" in result.output


def test_training_reduces_the_loss(tiny_data):
    data = TrainingSet(audio=load_fsdd(tiny_data[0]), images=load_digit_images(tiny_data[1]))
    result = train_model(data, TrainConfig(dim=32, bits=(16,), epochs=6, batch_size=20, width=8, device="cpu"))
    assert result.losses[-1] < result.losses[0]


def test_model_id_changes_with_the_weights(tmp_path, tiny_data):
    first, _ = _run_train(tmp_path / "a", tiny_data, "--seed", "1")
    second, _ = _run_train(tmp_path / "b", tiny_data, "--seed", "2")
    ids = {load_builtin(EncoderConfig(checkpoint=str(p), dim=32, bits=16)).model_id for p in (first, second)}
    assert len(ids) == 2


def test_data_fingerprint_follows_the_data(tiny_data):
    audio = load_fsdd(tiny_data[0])
    images = load_digit_images(tiny_data[1])
    full = data_fingerprint(TrainingSet(audio=audio, images=images))
    assert full == data_fingerprint(TrainingSet(audio=audio, images=images))
    assert full != data_fingerprint(TrainingSet(audio=audio.subset(audio.speakers != "bob"), images=images))


def test_checkpoint_with_mismatched_dim_is_refused(tmp_path, tiny_data):
    out, _ = _run_train(tmp_path, tiny_data)
    with pytest.raises(CheckpointError, match="dim 32"):
        load_builtin(EncoderConfig(checkpoint=str(out), dim=64, bits=16))


def test_eval_quick_prints_the_table_with_its_protocol_and_writes_json(tmp_path, tiny_data):
    out = tmp_path / "results.json"
    args = ["--fsdd", str(tiny_data[0]), "--digits", str(tiny_data[1]), "--quick", "--epochs", "1",
            "--methods", "cca,contrastive", "--out", str(out)]
    result = CliRunner().invoke(eval_cmd, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Protocol: mAP over the full ranking" in result.stdout
    assert "audio->image" in result.stdout and "16 bits" in result.stdout
    report = json.loads(out.read_text())
    assert report["folds"] == ["alice"]
    cca = report["results"]["CCA (linear, fixed features)"]["mean"]
    assert set(cca) >= {"audio->image", "image->audio", "text->audio", "audio->text", "text->image"}
    assert all(0.0 <= v <= 1.0 for row in cca.values() for v in row.values())
    assert set(cca["audio->image"]) == {"float", "16", "32", "64"}


def test_eval_of_a_given_checkpoint(tmp_path, tiny_data):
    ckpt, _ = _run_train(tmp_path, tiny_data, "--bits", "16,32,64,128")
    out = tmp_path / "r.json"
    args = ["--fsdd", str(tiny_data[0]), "--digits", str(tiny_data[1]), "--checkpoint", str(ckpt), "--folds", "bob",
            "--out", str(out)]
    result = CliRunner().invoke(eval_cmd, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["folds"] == ["bob"]


def test_eval_refuses_an_unknown_fold(tmp_path, tiny_data):
    args = ["--fsdd", str(tiny_data[0]), "--digits", str(tiny_data[1]), "--folds", "carol",
            "--out", str(tmp_path / "r.json")]
    result = CliRunner().invoke(eval_cmd, args)
    assert result.exit_code != 0 and "carol" in result.output


@pytest.mark.gpu
def test_training_on_cuda_with_mixed_precision(tmp_path, tiny_data):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    out, summary = _run_train(tmp_path, tiny_data, "--device", "cuda", "--epochs", "4")
    assert summary["losses"][-1] < summary["losses"][0]
    enc = load_builtin(EncoderConfig(checkpoint=str(out), dim=32, bits=16, device="cuda"))
    assert enc.encode("audio", [np.zeros(16000, np.float32)]).embeddings.shape == (1, 32)
