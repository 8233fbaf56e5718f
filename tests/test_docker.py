"""docker/Dockerfile (the worker image) pins every dependency pyproject.toml declares, within its range."""

from __future__ import annotations

import pathlib
import re
import shlex

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _logical_lines(text: str) -> list[str]:
    lines = text.replace("\\\n", " ").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _stages(text: str) -> dict[str, list[str]]:
    """Instructions per build stage (by its AS name); instructions before the first FROM under ''."""
    stages: dict[str, list[str]] = {"": []}
    current = ""
    for line in _logical_lines(text):
        match = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.I)
        if match:
            current = match.group(1) or f"stage{len(stages)}"
            stages[current] = [line]
        else:
            stages[current].append(line)
    return stages


def _settings(lines: list[str]) -> dict[str, str]:
    """ARG defaults and ENV values of some instructions (KEY=VALUE forms)."""
    out = {}
    for line in lines:
        word, _, rest = line.partition(" ")
        if word.upper() in ("ARG", "ENV"):
            for token in shlex.split(rest):
                if "=" in token:
                    key, value = token.split("=", 1)
                    out[key] = value
    return out


def pinned_requirements(variant: str) -> dict[str, Requirement]:
    """name -> requirement of every `pip install` of the image built with VARIANT=variant."""
    stages = _stages(DOCKERFILE.read_text())
    settings = {**_settings(stages[""]), "VARIANT": variant, **_settings(stages[f"base-{variant}"])}
    out: dict[str, Requirement] = {}
    for line in stages["worker"]:
        if not line.startswith("RUN") or "pip install" not in line:
            continue
        for command in line[3:].split("&&"):
            tokens = shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: settings[m.group(1)], command))
            if tokens[:2] != ["pip", "install"]:
                continue
            args = iter(tokens[2:])
            for token in args:
                if token in ("--extra-index-url", "--index-url"):
                    next(args)
                elif not token.startswith("-") and not token.startswith("/"):
                    req = Requirement(token)
                    out[canonicalize_name(req.name)] = req
    return out


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pin(req: Requirement) -> str:
    (spec,) = req.specifier
    assert spec.operator == "==", f"{req} is not pinned with =="
    return spec.version


@pytest.mark.parametrize("variant, extra", [("cpu", "cpu"), ("cuda", "gpu")])
def test_image_pins_every_dependency_within_pyproject_ranges(variant, extra):
    pins = pinned_requirements(variant)
    project = _pyproject()["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"][extra]]
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (pyproject) is not installed by docker/Dockerfile ({variant})"
        version = _pin(pins[name])
        assert req.specifier.contains(version, prereleases=True), f"{req.name}=={version} is outside {req}"


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_image_installs_nothing_unpinned(variant):
    for req in pinned_requirements(variant).values():
        _pin(req)


def test_beam_of_the_harness_is_the_beam_installed():
    stages = _stages(DOCKERFILE.read_text())
    beam_version = _settings(stages[""])["BEAM_VERSION"]
    assert _pin(pinned_requirements("cpu")["apache-beam"]) == beam_version
    froms = [lines[0] for lines in stages.values() if lines and lines[0].startswith("FROM apache/beam_python")]
    assert froms and all(":${BEAM_VERSION}" in line for line in froms)
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in stages["worker"]
