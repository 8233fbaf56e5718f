"""Re-create the licensed data subset committed under xmodal_index/sample_data/.

The subset is what ``xmodal-index make-sample`` builds its archive from, so the
command works from a fresh clone with no access to the full data sets. It is
committed; this script documents exactly how it was made and reproduces it
byte for byte from the same inputs:

- FSDD (Free Spoken Digit Dataset, CC BY-SA 4.0): for each of the 5 speakers and
  each digit 0-9, the recordings with index 0 and 1 (part of the official test
  split, indices 0-4), copied unchanged -> ``fsdd/{digit}_{speaker}_{index}.wav``.
- UCI handwritten digits (as shipped in scikit-learn's ``digits.csv.gz``): the
  first 10 rows of each label, in file order -> ``digits/digits_subset.csv``
  with columns ``source_row,label,p00..p63`` (source_row is the 0-based row in
  ``digits.csv.gz``; pixels row-major, values 0..16).
- ``LICENSE.md``: source, license, attribution and changes per file group.

Usage (from the repository root)::

    python tools/build_sample_subset.py --data ../shared/data --out xmodal_index/sample_data
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import shutil
import sys
from pathlib import Path

SPEAKERS = ("george", "jackson", "nicolas", "theo", "yweweler")
FSDD_INDICES = (0, 1)
IMAGES_PER_DIGIT = 10

LICENSE_TEXT = """\
# Licenses of the bundled sample data

This directory holds a small subset of two public data sets. `xmodal-index
make-sample` turns it into a small media archive with known ground truth.
`tools/build_sample_subset.py` shows exactly how the subset was taken from the
full data sets.

## fsdd/ (spoken digits): CC BY-SA 4.0

- Source: Free Spoken Digit Dataset (FSDD), Zohar Jackson et al.,
  https://github.com/Jakobovski/free-spoken-digit-dataset
  (snapshot commit 26eb9aaf76e81b692f806f9140c2d2777410d7a1, release v1.0.9;
  Zenodo DOI badge https://zenodo.org/badge/latestdoi/61622039).
- License: Creative Commons Attribution-ShareAlike 4.0 International (CC BY-SA
  4.0), https://creativecommons.org/licenses/by-sa/4.0/
- Files: `fsdd/{digit}_{speaker}_{index}.wav` for digits 0-9, speakers george,
  jackson, nicolas, theo and yweweler, and recording indices 0 and 1 (100 files,
  part of the official test split). 8 kHz mono 16-bit PCM.
- Changes in this directory: none; the files are byte-identical copies of the
  upstream recordings.

## digits/digits_subset.csv (handwritten digits)

- Source: "Optical Recognition of Handwritten Digits", E. Alpaydin and C.
  Kaynak (1998), UCI Machine Learning Repository,
  https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits
  (the 1797-image test portion, taken from the copy that scikit-learn ships as
  `sklearn/datasets/data/digits.csv.gz`).
- License: Creative Commons Attribution 4.0 International (CC BY 4.0), as the
  UCI Machine Learning Repository lists for its data sets
  (https://creativecommons.org/licenses/by/4.0/). scikit-learn's packaging of the file is BSD 3-Clause, Copyright (c)
  2007-2026 The scikit-learn developers.
- Files: the first 10 images of each digit 0-9 in file order (100 images).
- Changes: rows selected and rewritten as CSV with a header; the column
  `source_row` gives each image's 0-based row in `digits.csv.gz`. Pixel values
  (8x8, 0..16) and labels are unchanged.

## The generated sample archive: CC BY-SA 4.0

An archive written by `xmodal-index make-sample` is an adapted work of FSDD and
is shared under CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/),
with the attributions above. Changes made by the generator:

- `videos/*`: FSDD recordings are resampled from 8 kHz to the audio track's rate
  (16 kHz by default), trimmed when longer than a slot, placed at an offset
  inside a slot padded with silence, and AAC- (mp4) or Opus- (webm) encoded in a
  video whose frames show handwritten digit images scaled up (nearest neighbour,
  white on black) and H.264- or VP9-encoded; the caption sidecars name the
  spoken digit.
- `audio/*.wav`: unchanged copies of FSDD recordings, renamed.
- `images/*.png`: handwritten digit images scaled up (nearest neighbour, white
  on black).
- `text/*.txt`, `ground_truth.jsonl`: written by the generator.
"""


def copy_fsdd(recordings: Path, out: Path) -> list[Path]:
    """Copy the selected FSDD recordings unchanged; returns the written paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for digit in range(10):
        for speaker in SPEAKERS:
            for index in FSDD_INDICES:
                name = f"{digit}_{speaker}_{index}.wav"
                src = recordings / name
                if not src.is_file():
                    raise FileNotFoundError(f"FSDD recording {src} is missing")
                shutil.copyfile(src, out / name)
                written.append(out / name)
    return written


def select_digits(digits_csv_gz: Path) -> list[tuple[int, int, list[int]]]:
    """First IMAGES_PER_DIGIT rows of each label: (source_row, label, 64 pixels), by label then row."""
    taken: dict[int, list[tuple[int, int, list[int]]]] = {d: [] for d in range(10)}
    with gzip.open(digits_csv_gz, "rt", newline="") as f:
        for row_index, row in enumerate(csv.reader(f)):
            values = [int(float(v)) for v in row]
            if len(values) != 65:
                raise ValueError(f"{digits_csv_gz} row {row_index}: expected 65 columns, got {len(values)}")
            label = values[64]
            if len(taken[label]) < IMAGES_PER_DIGIT:
                taken[label].append((row_index, label, values[:64]))
    for label, rows in taken.items():
        if len(rows) < IMAGES_PER_DIGIT:
            raise ValueError(f"{digits_csv_gz}: only {len(rows)} images of digit {label}")
    return [r for label in range(10) for r in taken[label]]


def write_digits(rows: list[tuple[int, int, list[int]]], out_csv: Path) -> None:
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["source_row", "label"] + [f"p{i:02d}" for i in range(64)])
    for source_row, label, pixels in rows:
        writer.writerow([source_row, label, *pixels])
    out_csv.write_text(buf.getvalue(), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"),
                        help="folder holding fsdd/recordings and digits/digits.csv.gz (default: ../shared/data)")
    parser.add_argument("--out", type=Path, default=Path("xmodal_index/sample_data"),
                        help="subset folder to (re)write (default: xmodal_index/sample_data)")
    args = parser.parse_args(argv)

    wavs = copy_fsdd(args.data / "fsdd" / "recordings", args.out / "fsdd")
    rows = select_digits(args.data / "digits" / "digits.csv.gz")
    write_digits(rows, args.out / "digits" / "digits_subset.csv")
    (args.out / "LICENSE.md").write_text(LICENSE_TEXT, encoding="utf-8")
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {len(wavs)} recordings, {len(rows)} digit images and LICENSE.md to {args.out} ({total} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
