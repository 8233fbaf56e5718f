"""Beam's local runner servers listen on loopback only.

Beam's DirectRunner (FnApiRunner) in ``multi_threading`` and ``multi_processing``
mode starts four unauthenticated gRPC servers (control, data, state, logging) for
its workers, bound to every interface (``[::]:0``, apache_beam 2.77
``fn_api_runner/worker_handlers.py`` ``GrpcServer``), although its workers always
reach them at ``localhost:PORT``. In ``multi_processing`` mode each worker
process also gets a logging server (``local_job_service.py``
``SubprocessSdkWorker``). A batch job on an archive host must not listen
on the network, so :func:`install` makes those servers bind ``localhost:0``
(IPv4 and IPv6 loopback) instead. Nothing else changes: same runner, same worker
threads or processes, same throughput (bench/README.md). ``in_memory`` mode opens
no server at all.

The change is confined to the gRPC module reference of those two Beam modules; a
test (tests/test_run_listeners.py) checks that a running ``xmodal-index run`` has
no listening socket outside loopback, so a Beam upgrade that moves the servers
fails there rather than silently listening again.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

logger = logging.getLogger(__name__)

_ALL_INTERFACES = "[::]:"
_LOOPBACK = "localhost:"
_lock = threading.Lock()


class _LoopbackServer:
    """A grpc server whose ports bind loopback where Beam asks for every interface."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def add_insecure_port(self, address: str) -> int:
        if address.startswith(_ALL_INTERFACES):
            address = _LOOPBACK + address[len(_ALL_INTERFACES):]
        return self._server.add_insecure_port(address)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)


class _LoopbackGrpc:
    """Stands in for the ``grpc`` module inside Beam's worker_handlers: ``server()``
    returns loopback-only servers; everything else is grpc's own."""

    def __init__(self, grpc_module: Any) -> None:
        self._grpc = grpc_module

    def server(self, *args: Any, **kwargs: Any) -> _LoopbackServer:
        return _LoopbackServer(self._grpc.server(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grpc, name)


# Beam modules that start servers for the DirectRunner's own workers
_MODULES = (
    "apache_beam.runners.portability.fn_api_runner.worker_handlers",  # control, data, state, logging
    "apache_beam.runners.portability.local_job_service",  # multi_processing: each worker's logging server
)


def install() -> bool:
    """Make the DirectRunner's worker servers of this process bind loopback only
    (idempotent). False when a Beam module no longer looks as expected."""
    import importlib

    ok = True
    with _lock:
        for name in _MODULES:
            try:
                module: Any = importlib.import_module(name)  # its `grpc` is replaced below
            except ImportError:
                ok = False
                continue
            current = getattr(module, "grpc", None)
            if isinstance(current, _LoopbackGrpc):
                continue
            if current is None or not hasattr(current, "server"):
                logger.warning("cannot keep Beam's worker servers on loopback: %s has no grpc module", name)
                ok = False
                continue
            module.grpc = _LoopbackGrpc(current)
    return ok
