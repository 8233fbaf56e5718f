"""The child side of the isolated decode workers (pipeline/isolation.py is the parent).

A worker process points its file descriptor 2 at a private log file, so the native
messages of FFmpeg, decord and faulthandler never reach the console; before each item
the log is emptied, and the reply that ends the item carries a one-line summary of
what the decoders said. The worker limits its own address space, exits when its parent
is gone, and serves one request at a time, streaming results back over its pipe.
"""

from __future__ import annotations

import faulthandler
import os
import re
import resource
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from .decode import DecodeError

EXIT_OUT_OF_MEMORY = 75
NATIVE_LOG_TAIL_BYTES = 64 * 1024  # of one item's native messages, the last this many bytes are read
NATIVE_NOTE_CHARS = 600  # the summary added to an error or a debug line

_POINTER = re.compile(r" @ 0x[0-9a-fA-F]+\]")


def summarize_native_log(text: str, max_chars: int = NATIVE_NOTE_CHARS) -> str:
    """Native decoder output as one line: distinct messages in order of first appearance,
    repeats counted, object addresses dropped (``[h264 @ 0x55..] x`` -> ``[h264] x``)."""
    counts: dict[str, int] = {}
    for raw in text.splitlines():
        line = " ".join(_POINTER.sub("]", raw).split())
        if line:
            counts[line] = counts.get(line, 0) + 1
    parts = [f"{line} (x{n})" if n > 1 else line for line, n in counts.items()]
    out = "; ".join(parts)
    return out if len(out) <= max_chars else out[:max_chars - 3] + "..."


def read_native_log(path: str) -> str:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - NATIVE_LOG_TAIL_BYTES))
            data = f.read()
    except OSError:
        return ""
    return summarize_native_log(data.decode("utf-8", errors="replace"))


# --------------------------------------------------------------------------- child


def _watch_parent(parent_pid: int) -> None:
    """Exit when the parent is gone (a hung decode would otherwise outlive it)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)


def _limit_memory(memory_mb: int) -> None:
    limit = memory_mb * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _capture_native_output(log_path: str) -> None:
    """Point file descriptor 2 (where FFmpeg, decord and faulthandler write) at the log file."""
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(fd, 2)
    os.close(fd)


def _start_native_log() -> None:
    """Empty the log before an item (O_APPEND: the next message starts the file again)."""
    try:
        sys.stderr.flush()
        os.ftruncate(2, 0)
    except (OSError, ValueError):
        pass


def _native_notes(log_path: str | None) -> str:
    if log_path is None:
        return ""
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    return read_native_log(log_path)


def _serve_one(conn, fn: Callable[..., Iterable[Any]], args: tuple, log_path: str | None = None) -> None:
    """Run one request, streaming its results; stop early when the parent cancels. The
    reply that ends it carries the item's native decoder messages, summarised."""
    sent = 0
    _start_native_log()
    try:
        for result in fn(*args):
            if conn.poll() and conn.recv()[0] == "cancel":
                conn.send(("cancelled", sent, _native_notes(log_path)))
                return
            conn.send(("item", result))
            sent += 1
        conn.send(("done", sent, _native_notes(log_path)))
    except MemoryError:
        try:
            conn.send(("memory", ""))
        finally:
            os._exit(EXIT_OUT_OF_MEMORY)
    except DecodeError as err:
        notes = _native_notes(log_path)
        try:
            conn.send(("error", err, notes))
        except Exception:  # noqa: BLE001 - an unpicklable attribute: send the essentials
            conn.send(("error", DecodeError(str(err), stage=err.stage), notes))
    except Exception as err:  # noqa: BLE001 - reported to the parent, which decides
        conn.send(("failed", f"{type(err).__name__}: {err}", traceback.format_exc(), _native_notes(log_path)))


def worker_main(conn, memory_mb: int, parent_pid: int, log_path: str | None = None) -> None:
    """Entry point of a worker process: serve requests until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    if log_path is not None:
        _capture_native_output(log_path)
    faulthandler.enable()  # a crash leaves its native traceback in the log (stderr without one)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    _limit_memory(memory_mb)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        except Exception as err:  # noqa: BLE001 - a request whose function does not import here
            conn.send(("failed", f"cannot load the request: {type(err).__name__}: {err}", traceback.format_exc()))
            continue
        if message[0] == "stop":
            return
        if message[0] == "run":
            try:
                _serve_one(conn, message[1], message[2], log_path)
            except OSError:  # the parent closed its end: nobody to serve
                return
        # anything else is a cancel that arrived after its request ended: nothing to do
