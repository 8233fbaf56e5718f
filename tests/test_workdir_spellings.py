"""A workdir named by a relative path or a file:// URI is the same workdir as its
absolute path, for every command that lists it: run (ledger), deadletter, versions, gc."""

from __future__ import annotations

import json

from tests.run_helpers import invoke, make_archive, write_config


def test_relative_and_file_uri_workdirs_are_one_workdir(tmp_path, monkeypatch):
    make_archive(tmp_path / "src")
    (tmp_path / "src" / "videos" / "empty.mp4").write_bytes(b"")  # one dead letter
    config = write_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    file_uri = f"file://{tmp_path / 'work'}"

    first = invoke("run", "--source", "src", "--workdir", "work", "--config", config)
    assert first.exit_code == 0, first.output
    again = invoke("run", "--source", f"file://{tmp_path / 'src'}", "--workdir", file_uri, "--config", config)
    assert again.exit_code == 0, again.output
    assert "0 to process" in again.stderr, again.stderr  # the ledger written under "work" is read back

    for workdir in ("work", file_uri, str(tmp_path / "work")):
        for scope in ([], ["--run", "latest"], ["--all"]):
            listed = invoke("deadletter", "--workdir", workdir, "--json", *scope)
            assert listed.exit_code == 0, listed.output
            report = json.loads(listed.output)
            assert [(g["stage"], g["error_type"]) for g in report["groups"]] == [("probe", "ProbeError")], \
                (workdir, scope, report)

    for index in ("work", file_uri):
        versions = invoke("versions", "--index", index, "--json")
        assert versions.exit_code == 0, versions.output
        assert [json.loads(line)["version"] for line in versions.output.splitlines()] == ["v000001"]
        gc = invoke("gc", "--index", index, "--keep", "1", "--dry-run")
        assert gc.exit_code == 0, gc.output
