"""Option parsers shared by several commands (click callbacks, so they live below jobs/)."""

from __future__ import annotations

import click


def parse_bits(value: str) -> tuple[int, ...]:
    """``--bits 16,32,64``: code lengths of the hash heads, sorted and without repeats."""
    from xmodal_index.encoders.towers import HASH_BITS  # torch: only once a command runs

    try:
        bits = tuple(sorted({int(b) for b in value.split(",") if b.strip()}))
    except ValueError as err:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from err
    if not bits or any(b not in HASH_BITS for b in bits):
        raise click.BadParameter(f"{value!r}: each code length must be one of {', '.join(map(str, HASH_BITS))}")
    return bits
