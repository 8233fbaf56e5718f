"""A running `xmodal-index run` listens on nothing outside loopback (Beam's DirectRunner
worker servers included): read from /proc while the run's processes are alive."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.run_helpers import make_archive, write_config

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")

LISTEN = "0A"


def _address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    # /proc prints an IPv6 address as four host-order 32-bit words
    return ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def _listening(pid: int) -> dict[int, str]:
    """inode -> "address:port" of the listening TCP sockets in the process's network namespace."""
    out = {}
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == LISTEN:
                addr, port = fields[1].split(":")
                out[int(fields[9])] = f"{_address(addr)}:{int(port, 16)}"
    return out


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo.extend(int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split())
        except OSError:
            continue
    return pids


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.rsplit(":", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


@pytest.mark.parametrize("beam_args", [[], ["--", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]],
                         ids=["default", "multi_processing"])
def test_a_running_run_listens_on_loopback_only(tmp_path, beam_args):
    make_archive(tmp_path / "src")
    for k in range(6):  # enough work that the DAG runs for a while
        (tmp_path / "src" / "texts" / f"more{k}.txt").write_text(f"more text {k} " * 50)
    config = write_config(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "xmodal_index", "run", "--source", str(tmp_path / "src"),
                             "--workdir", str(tmp_path / "work"), "--config", str(config), *beam_args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[str, int] = {}
    try:
        while proc.poll() is None:
            for pid in _tree(proc.pid):
                listening = _listening(pid)
                for inode in _socket_inodes(pid) & set(listening):
                    seen[listening[inode]] = pid
            time.sleep(0.02)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    exposed = sorted(a for a in seen if not _is_loopback(a))
    assert exposed == [], f"listening outside loopback: {exposed}"
    assert seen, "no listening socket seen while the run was alive: the check did not observe the runner"
