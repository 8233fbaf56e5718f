"""Beam runner flags given after `--`: checked against Beam's own option parser
before anything runs, so that a misspelt flag is refused instead of silently dropped."""

from __future__ import annotations

from collections.abc import Sequence


class BeamArgsError(ValueError):
    """A Beam flag after `--` is unknown or has a bad value; the message is one line."""


def check_beam_args(args: Sequence[str]) -> None:
    """Raise BeamArgsError naming every unknown flag, or the first bad value of a known one."""
    from apache_beam.options.pipeline_options import (
        PipelineOptions,
        _BeamArgumentParser,
    )

    class _Parser(_BeamArgumentParser):
        def error(self, message: str):  # argparse would print its usage and exit 2
            raise BeamArgsError(" ".join(message.split()))

    parser = _Parser(allow_abbrev=False)
    # the option classes Beam itself parses with (PipelineOptions.get_all_options)
    classes = {str(cls): cls for cls in PipelineOptions.__subclasses__()}
    for cls in classes.values():
        cls._add_argparse_args(parser)  # Beam's own way to collect every option (get_all_options)
    bare = [a for a in args if not a.startswith("--")]
    if bare:
        raise BeamArgsError(f"Beam arguments must look like --name=value, got {bare[0]!r}")
    _, unknown = parser.parse_known_args(list(args))
    names = sorted({a.split("=", 1)[0] for a in unknown if a.startswith("--")})
    if names:
        raise BeamArgsError(f"unknown Beam option(s) {', '.join(names)} (Beam's PipelineOptions do not define "
                            f"{'it' if len(names) == 1 else 'them'}; check the spelling)")
