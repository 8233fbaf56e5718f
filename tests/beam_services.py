"""Beam's portable services for tests, bound to the loopback interface only.

    python tests/beam_services.py job --port P       # local_job_service_main
    python tests/beam_services.py pool --port P      # worker_pool_main (external SDK workers)

Beam's launchers bind their gRPC servers to every interface (``[::]:PORT``); here
every ``add_insecure_port`` of the process is rewritten to ``127.0.0.1`` first, then
Beam's own ``main`` runs unchanged. ``start_portable_services`` starts both as child
processes (the worker pool with the interpreter's ``bin`` first on PATH: it starts
its workers as ``python``, here through docker/beam_boot.py, which hands each worker
the job's pipeline options as the SDK container's boot does) and waits until both answer.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def _loopback_only() -> None:
    import grpc._server

    original = grpc._server._Server.add_insecure_port

    def add_insecure_port(self, address: str) -> int:
        host, _, port = address.rpartition(":")
        if host in ("[::]", "0.0.0.0", "", "localhost"):
            address = f"127.0.0.1:{port}"
        return original(self, address)

    grpc._server._Server.add_insecure_port = add_insecure_port


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, name: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} before listening on 127.0.0.1:{port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{name} did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s")


@dataclass
class PortableServices:
    job_port: int
    pool_port: int
    processes: list[subprocess.Popen]

    def beam_args(self) -> list[str]:
        """What ``xmodal-index run --runner PortableRunner -- ...`` takes to use these services."""
        return [f"--job_endpoint=localhost:{self.job_port}", "--environment_type=EXTERNAL",
                f"--environment_config=localhost:{self.pool_port}"]

    def stop(self) -> None:
        for p in self.processes:
            p.terminate()
        for p in self.processes:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def start_portable_services(cwd: str | os.PathLike, env: dict[str, str] | None = None,
                            log_dir: str | os.PathLike | None = None) -> PortableServices:
    """A job service and an external worker pool in child processes, run from ``cwd``."""
    env = {**os.environ, **(env or {})}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    log_dir = Path(log_dir or cwd)
    processes = []
    ports = []
    try:
        for kind in ("job", "pool"):
            port = free_port()
            log = open(log_dir / f"beam-{kind}.log", "wb")
            p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), kind, "--port", str(port)],
                                 cwd=str(cwd), env=env, stdout=log, stderr=subprocess.STDOUT)
            log.close()
            processes.append(p)
            ports.append(port)
        for (kind, port), p in zip(zip(("job service", "worker pool"), ports), processes):
            wait_for_port(port, p, kind)
    except BaseException:
        PortableServices(0, 0, processes).stop()
        raise
    return PortableServices(ports[0], ports[1], processes)


def main(argv: list[str]) -> None:
    kind, port = argv[0], argv[argv.index("--port") + 1]
    _loopback_only()
    if kind == "job":
        from apache_beam.runners.portability import local_job_service_main

        local_job_service_main.run(["--port", port])
    elif kind == "pool":
        from apache_beam.runners.worker import worker_pool_main

        boot = str(Path(__file__).resolve().parents[1] / "docker" / "beam_boot.py")
        worker_pool_main.main(["--service_port", port, "--container_executable", boot])
    else:
        raise SystemExit(f"unknown service {kind!r}: job or pool")


if __name__ == "__main__":
    main(sys.argv[1:])
