"""The README's Python API example runs as written against the indexed sample archive."""

import contextlib
import io
import os
import re

from tests.query_fixtures import ROOT, sample_work


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_example_has_five_lines():
    assert len(_readme_example().strip().splitlines()) == 5


def test_readme_example_runs_and_prints_five_hits(tmp_path_factory):
    _, work = sample_work(tmp_path_factory)
    assert work.name == "sample-work"
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(work.parent)
    try:
        scope: dict = {}
        with contextlib.redirect_stdout(out):
            exec(compile(_readme_example(), "README.md", "exec"), scope)  # the documented example
    finally:
        os.chdir(cwd)
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 5
    assert all(re.match(r"^\d\.\d{3} (video|audio|image|text)", line) for line in lines)
    assert scope["rows"].num_rows == scope["index"].manifest.ntotal
    scope["index"].close()
