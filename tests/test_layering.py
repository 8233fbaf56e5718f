"""The import rules of HOUSE_STYLE.md hold: each package imports only what its layer may.

Imports are read from the source (absolute and relative ones, also those inside
functions); the light modules and the query-node modules are also imported in a
fresh interpreter to see what they pull in at run time.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMPORT_ROOT = "xmodal_index"

FORBIDDEN = {
    "encoders": {"apache_beam", "click", "boto3", "xmodal_index.pipeline", "xmodal_index.sinks", "xmodal_index.jobs",
                 "xmodal_index.query"},
    "sinks": {"apache_beam", "click", "torch", "xmodal_index.pipeline", "xmodal_index.encoders", "xmodal_index.jobs",
              "xmodal_index.query"},
    "pipeline": {"click", "xmodal_index.jobs", "xmodal_index.query"},
    "query": {"apache_beam", "click", "xmodal_index.jobs"},
}

# Imported by query nodes: nothing of Beam, torch or click may come with them.
SERVING_MODULES = sorted(
    f"{IMPORT_ROOT}.sinks.serving.{p.stem}" for p in (ROOT / "sinks" / "serving").glob("*.py") if p.stem != "__init__"
) + [f"{IMPORT_ROOT}.sinks.index.manifest", f"{IMPORT_ROOT}.sinks.storage"]

# Configs load and validate without media decoders or FAISS.
LIGHT_CONFIG_MODULES = [
    f"{IMPORT_ROOT}.sinks.index.config",
    f"{IMPORT_ROOT}.pipeline.decode_config",
    f"{IMPORT_ROOT}.encoders.config",
    f"{IMPORT_ROOT}.jobs.config",
]


def module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    """``sinks/index/build.py`` -> ``xmodal_index.sinks.index.build`` (a package's
    ``__init__.py`` is the package itself)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([IMPORT_ROOT, *parts])


def imports_of(path: pathlib.Path, root: pathlib.Path = ROOT) -> set[str]:
    """Every module ``path`` imports, relative imports resolved against its package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                pieces = package.split(".")
                if node.level - 1 >= len(pieces):
                    raise ValueError(f"{path}: relative import beyond the top-level package")
                base = ".".join(pieces[: len(pieces) - (node.level - 1)])
                if node.module:
                    base = f"{base}.{node.module}"
            names.add(base)
            # `from . import x` imports the module x (or a name of the package: both are checked)
            names.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
    return names


def offenders(package: str, root: pathlib.Path = ROOT) -> list[str]:
    found = []
    for path in sorted((root / package).rglob("*.py")):
        for name in sorted(imports_of(path, root)):
            for bad in FORBIDDEN[package]:
                if name == bad or name.startswith(bad + "."):
                    found.append(f"{path.relative_to(root)} imports {name}")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_its_layer(package):
    assert offenders(package) == []


def test_relative_imports_are_resolved_and_checked(tmp_path):
    (tmp_path / "sinks" / "index").mkdir(parents=True)
    (tmp_path / "sinks" / "__init__.py").write_text("from . import storage\n")
    (tmp_path / "sinks" / "index" / "__init__.py").write_text("")
    (tmp_path / "sinks" / "index" / "bad.py").write_text(
        "from .. import errors\nfrom ...jobs import cli\n\n"
        "def later():\n    from ...pipeline.dag import IndexArchive\n")
    assert imports_of(tmp_path / "sinks" / "index" / "bad.py", tmp_path) >= {
        "xmodal_index.sinks.errors", "xmodal_index.jobs", "xmodal_index.jobs.cli",
        "xmodal_index.pipeline.dag", "xmodal_index.pipeline.dag.IndexArchive"}
    assert imports_of(tmp_path / "sinks" / "__init__.py", tmp_path) == {"xmodal_index.sinks",
                                                                        "xmodal_index.sinks.storage"}
    assert offenders("sinks", tmp_path) == [
        "sinks/index/bad.py imports xmodal_index.jobs",
        "sinks/index/bad.py imports xmodal_index.jobs.cli",
        "sinks/index/bad.py imports xmodal_index.pipeline.dag",
        "sinks/index/bad.py imports xmodal_index.pipeline.dag.IndexArchive",
    ]


def _loaded_after_import(modules: list[str], watched: tuple[str, ...]) -> list[str]:
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(','.join(m for m in {watched!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_query_node_modules_need_no_beam_torch_or_click():
    assert f"{IMPORT_ROOT}.sinks.serving.loader" in SERVING_MODULES
    assert _loaded_after_import(SERVING_MODULES, ("apache_beam", "torch", "click")) == []


@pytest.mark.parametrize("module", LIGHT_CONFIG_MODULES)
def test_configs_load_without_decoders_or_faiss(module):
    assert _loaded_after_import([module], ("av", "decord", "faiss")) == []
