"""The built wheel holds every subpackage under the one import root xmodal_index."""

import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        check=True, capture_output=True,
    )
    (whl,) = out.glob("xmodal_index-*.whl")
    return zipfile.ZipFile(whl)


def test_wheel_has_every_subpackage_under_one_root(wheel):
    names = wheel.namelist()
    for pkg in (
        "xmodal_index", "xmodal_index/pipeline", "xmodal_index/encoders", "xmodal_index/sinks", "xmodal_index/jobs",
    ):
        assert f"{pkg}/__init__.py" in names


def test_wheel_has_no_bare_top_level_modules(wheel):
    tops = {n.split("/")[0] for n in wheel.namelist()}
    assert {t for t in tops if not t.startswith("xmodal_index")} == set()


def test_wheel_ships_the_bundled_checkpoint_and_sample_data(wheel):
    names = wheel.namelist()
    assert any(n.startswith("xmodal_index/encoders/checkpoints/") and n.endswith(".safetensors") for n in names)
    assert any(n.startswith("xmodal_index/sample_data/") for n in names)
