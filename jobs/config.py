"""RunConfig: the job config, composed of one frozen dataclass per component.

Loaded from TOML or JSON (``--config FILE``) with one table per component:
[source], [decode], [encoder], [index], [run], [gate]. Unknown tables or keys are refused
with a message that names them and the allowed ones.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

import tomllib

from xmodal_index.encoders.config import EncoderConfig
from xmodal_index.pipeline.decode_config import DecodeConfig
from xmodal_index.pipeline.listing import SourceConfig
from xmodal_index.sinks.index.compaction import IncrementalConfig
from xmodal_index.sinks.index.config import IndexBuildConfig
from xmodal_index.sinks.index.publish_gate import GateConfig


class ConfigError(ValueError):
    """A config file or option is invalid; the message names the bad value."""


_SELF = re.compile(r"\bself\.")


def user_message(err: BaseException) -> str:
    """A validation error as one line for a user: the field as the config file names it
    (``max_error_fraction = 1.5``, never ``self.max_error_fraction``)."""
    return _SELF.sub("", " ".join(str(err).split()))


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """Job-level settings.

    max_error_fraction: the run fails (exit 3, no new index version published)
      when more than this fraction of the processed items is dead-lettered.
    isolate_decoding: decode in killable worker processes (a decoder crash or
      hang costs one item); False decodes in the Beam worker itself.
    """

    max_error_fraction: float = 0.1
    isolate_decoding: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ValueError(f"max_error_fraction = {self.max_error_fraction} must be within [0, 1]")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    source: SourceConfig = SourceConfig()
    decode: DecodeConfig = DecodeConfig()
    encoder: EncoderConfig = EncoderConfig()
    index: IndexBuildConfig = IndexBuildConfig()
    run: JobConfig = JobConfig()
    gate: GateConfig = GateConfig()
    incremental: IncrementalConfig = IncrementalConfig()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, section: str, **changes: Any) -> RunConfig:
        """A copy with fields of one section changed (validated)."""
        try:
            new = dataclasses.replace(getattr(self, section), **changes)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"[{section}] {user_message(err)}") from err
        return dataclasses.replace(self, **{section: new})


_CLASSES = {"source": SourceConfig, "decode": DecodeConfig, "encoder": EncoderConfig, "index": IndexBuildConfig,
            "run": JobConfig,
            "gate": GateConfig, "incremental": IncrementalConfig}


def _build(section: str, values: Mapping[str, Any]) -> Any:
    cls = _CLASSES[section]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)} in [{section}]; allowed: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for key, value in values.items():
        default = getattr(cls(), key)
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if default is not None and not isinstance(value, type(default)):
            raise ConfigError(
                f"[{section}] {key} = {value!r} must be of type {type(default).__name__}"
            )
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"[{section}] {user_message(err)}") from err


def config_from_mapping(data: Mapping[str, Any]) -> RunConfig:
    unknown = sorted(set(data) - set(_CLASSES))
    if unknown:
        raise ConfigError(f"unknown table(s) {', '.join(unknown)}; allowed: {', '.join(_CLASSES)}")
    parts = {}
    for section in _CLASSES:
        values = data.get(section, {})
        if not isinstance(values, Mapping):
            raise ConfigError(f"[{section}] must be a table of key = value settings, got {values!r}")
        parts[section] = _build(section, values)
    return RunConfig(**parts)


def load_config(path: str | None) -> RunConfig:
    """Load a TOML (.toml) or JSON (.json) config file; None gives the defaults."""
    if path is None:
        return RunConfig()
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path!r}: {err.strerror}") from err
    try:
        data = json.loads(raw) if path.endswith(".json") else tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        kind = "JSON" if path.endswith(".json") else "TOML"
        raise ConfigError(f"config file {path!r} is not valid {kind}: {err}") from err
    try:
        return config_from_mapping(data)
    except ConfigError as err:
        raise ConfigError(f"config file {path!r}: {err}") from err
