"""The import rules of HOUSE_STYLE.md hold: each package imports only what its layer may."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "encoders": {"apache_beam", "click", "boto3", "xmodal_index.pipeline", "xmodal_index.sinks", "xmodal_index.jobs"},
    "sinks": {"apache_beam", "click", "torch", "xmodal_index.pipeline", "xmodal_index.encoders", "xmodal_index.jobs"},
    "pipeline": {"click", "xmodal_index.jobs"},
}


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_its_layer(package):
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in _imports(path):
            for bad in FORBIDDEN[package]:
                if name == bad or name.startswith(bad + "."):
                    offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == []


def test_query_node_loader_needs_no_beam_or_torch():
    code = (
        "import sys, xmodal_index.sinks.serving.loader, xmodal_index.sinks.index.manifest, xmodal_index.sinks.storage, xmodal_index.sinks.serving.hot_swap\n"
        "bad = [m for m in ('apache_beam', 'torch', 'click') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
