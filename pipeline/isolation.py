"""Decoding in warm, killable worker processes: a bad file costs one item.

``IsolatedDecoder`` runs ``decode.decode_item`` in ``config.workers`` child
processes started with the ``spawn`` method (no inherited threads or locks from
the Beam worker). A child imports numpy, decord and PyAV once and then serves
item after item, streaming each segment back as soon as it is decoded; the pipe
between them holds at most a segment or two, so a slow consumer pauses the child
instead of piling segments up in memory. ``decode_many`` keeps the other workers
decoding the next items meanwhile, holding what they send up to
``max_prefetch_bytes`` per item.

The parent kills the child and starts a fresh one, lazily, when it
- dies (segfault, abort): ``DecoderCrashedError`` naming the signal;
- sends nothing for ``idle_timeout_s``, or the item has made the parent wait
  longer than ``timeout_s`` in all (time the consumer spends between segments
  is not counted): ``DecodeTimeoutError``;
- runs out of its address space (``RLIMIT_AS`` = ``memory_mb``): ``DecoderCrashedError``.
A ``DecodeError`` raised inside the child comes back as the same class and message.

Native decoder messages (FFmpeg's ``[h264 @ 0x...] ...``, decord's
``threaded_decoder.cc:...``, a crash's native traceback) never reach the console:
a worker's file descriptor 2 points at a private log file, emptied before each
item. What an item left there comes back with its reply, summarised
(:func:`summarize_native_log`): appended to the item's error (so its dead letter
says what the decoder said) or, for an item that decoded, logged at DEBUG with
the item's URI. For a worker that died, the parent reads the file itself.

``decode_fn`` replaces ``decode_item`` with another module-level function of
(item, config) that yields segments (a different decoder, or a fault injected by
a test). Create it where it is used (a DoFn's ``setup``); pickling one carries
only its settings, never a live process. Not thread-safe: one user at a time.

Tests and tools run any module-level generator function in a worker with the
private ``_run_callable(fn, *args, uri=...)``; it is how the fault tests inject a
segfault, a hang or a memory blow-up without a test hook in the decoder itself.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .decode import DecodeConfig, DecodeError, DecoderCrashedError, DecodeTimeoutError, decode_item
from .isolation_worker import EXIT_OUT_OF_MEMORY, read_native_log, worker_main
from .types import MediaItem, Segment

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # a fresh worker must import its decoders within this
_STOP_GRACE_S = 5.0

_start_lock = threading.Lock()


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start a worker without the parent's ``__main__``. A spawned child re-runs the
    parent's main script first (for ``xmodal-index``, the whole CLI: Beam and torch,
    2-3 s and hundreds of MiB per worker); a worker needs only this module, and its
    requests name module-level functions of importable modules."""
    main = sys.modules.get("__main__")
    with _start_lock:
        if main is None:
            yield
            return
        saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
        main.__dict__.pop("__file__", None)
        main.__dict__["__spec__"] = None
        try:
            yield
        finally:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


class _Worker:
    """One child process and the parent's end of its pipe."""

    def __init__(self, ctx: multiprocessing.context.BaseContext, memory_mb: int) -> None:
        self.conn, child_conn = ctx.Pipe(duplex=True)
        fd, self.log_path = tempfile.mkstemp(prefix="xmodal-decode-", suffix=".log")
        os.close(fd)
        self.process = ctx.Process(target=worker_main, args=(child_conn, memory_mb, os.getpid(), self.log_path),
                                   name="xmodal-decode-worker", daemon=True)
        with _main_module_hidden():
            self.process.start()
        child_conn.close()  # so that the child's death reads as EOF here
        self.ready = False

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def describe_exit(self) -> str:
        self.process.join(_STOP_GRACE_S)
        code = self.process.exitcode
        if code is None:
            return "stopped answering"
        if code < 0:
            try:
                return f"was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        if code == EXIT_OUT_OF_MEMORY:
            return "ran out of memory"
        return f"exited with status {code}"

    def native_notes(self) -> str:
        """The summarised native messages of the worker's current (or last) item."""
        return read_native_log(self.log_path)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(_STOP_GRACE_S)
        self.conn.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)

    def stop(self, busy: bool) -> None:
        if busy or not self.process.is_alive():
            self.kill()
            return
        try:
            self.conn.send(("stop",))
        except OSError:
            pass
        self.process.join(_STOP_GRACE_S)
        self.kill()


class _Request:
    """The results of one request to one worker, in order: read when the consumer
    asks, or earlier into a bounded buffer while the consumer waits on another worker."""

    def __init__(self, owner: IsolatedDecoder, slot: int, worker: _Worker, uri: str) -> None:
        self.owner = owner
        self.slot = slot
        self.worker = worker
        self.uri = uri
        self.buffer: deque[tuple] = deque()
        self.buffered_bytes = 0
        self.waited_s = 0.0  # time the parent has waited on this request (its timeout clock)
        self.progress_s = 0.0  # waited_s when its last message arrived (its idle clock)
        self.ended = False  # the worker sent its last message for this request
        self.closed = False  # the consumer is done with it

    def __iter__(self) -> _Request:
        return self

    def __next__(self) -> Any:
        if self.closed:
            raise StopIteration
        try:
            message = self.owner._next_message(self)
        except BaseException:
            self.closed = True
            raise
        kind = message[0]
        if kind == "item":
            return message[1]
        self.closed = True
        if kind in ("done", "cancelled"):
            if len(message) > 2 and message[2]:
                logger.debug("%s: decoder messages: %s", self.uri, message[2])
            raise StopIteration
        raise self.owner._error_from(self, message)

    def close(self) -> None:
        """Leave the worker clean when the consumer stops early: cancel, drain, or restart it."""
        if not self.closed:
            self.closed = True
            self.buffer.clear()
            if not self.ended:
                self.owner._cancel(self)


class IsolatedDecoder:
    """``decode_item`` in warm worker processes that are killed and replaced on failure."""

    def __init__(self, config: DecodeConfig, *, start_method: str = "spawn",
                 max_prefetch_bytes: int = 64 * 1024 * 1024,
                 decode_fn: Callable[[MediaItem, DecodeConfig], Iterable[Segment]] = decode_item) -> None:
        if max_prefetch_bytes < 0:
            raise ValueError(f"{max_prefetch_bytes = } must be >= 0")
        self._config = config
        self._decode_fn = decode_fn
        self._start_method = start_method
        self._max_prefetch_bytes = max_prefetch_bytes
        self._workers: list[_Worker | None] = [None] * config.workers
        self._in_flight: list[_Request] = []
        self.restarts = 0  # workers replaced after a crash, timeout or memory blow-up

    # -- pickling carries the settings only: a copy starts its own workers when first used
    def __getstate__(self) -> dict:
        return {"config": self._config, "start_method": self._start_method,
                "max_prefetch_bytes": self._max_prefetch_bytes, "decode_fn": self._decode_fn}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["config"], start_method=state["start_method"],
                      max_prefetch_bytes=state["max_prefetch_bytes"], decode_fn=state["decode_fn"])

    def __enter__(self) -> IsolatedDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pids(self) -> tuple[int | None, ...]:
        """Process ids of the worker slots (None where no worker runs)."""
        return tuple(w.pid if w is not None and w.process.is_alive() else None for w in self._workers)

    def close(self) -> None:
        """Stop every worker (idle ones cleanly, busy ones by force)."""
        for slot, worker in enumerate(self._workers):
            if worker is not None:
                worker.stop(busy=any(r.worker is worker for r in self._in_flight))
                self._workers[slot] = None
        self._in_flight.clear()

    def decode(self, item: MediaItem) -> Iterator[Segment]:
        """Segments of one item, decoded in a worker; errors as ``decode_item`` raises them."""
        request = self._submit(0, self._decode_fn, (item, self._config), item.uri)
        try:
            yield from request
        finally:
            request.close()

    def decode_many(self, items: Iterable[MediaItem]) -> Iterator[tuple[MediaItem, Iterator[Segment]]]:
        """(item, segments) in input order, the next ``workers - 1`` items decoding
        ahead in the other workers while the current one is consumed.

        Iterate (or drop) each item's segments before asking for the next item;
        a ``DecodeError`` is raised from that item's segment iterator only.
        Segments decoded ahead are held up to ``max_prefetch_bytes`` per item.
        """
        pending: deque[tuple[MediaItem, _Request]] = deque()
        free = deque(range(len(self._workers)))
        todo = iter(items)
        try:
            while True:
                while free:
                    item = next(todo, None)
                    if item is None:
                        break
                    pending.append((item, self._submit(free.popleft(), self._decode_fn, (item, self._config),
                                                       item.uri)))
                if not pending:
                    return
                item, request = pending.popleft()
                try:
                    yield item, request
                finally:
                    request.close()
                free.append(request.slot)
        finally:
            for _, request in pending:
                request.close()

    def _run_callable(self, fn: Callable[..., Iterable[Any]], *args: Any, uri: str = "<callable>") -> Iterator[Any]:
        """Run a module-level function that returns an iterable in worker 0, streaming its
        results back under the same supervision as ``decode`` (the fault-injection hook)."""
        request = self._submit(0, fn, args, uri)
        try:
            yield from request
        finally:
            request.close()

    # -- workers

    def start(self) -> None:
        """Start the worker processes now, without waiting for them: they import their
        decoders while the caller sets up the rest (otherwise the first item waits)."""
        ctx = multiprocessing.get_context(self._start_method)
        for i, worker in enumerate(self._workers):
            if worker is None:
                self._workers[i] = _Worker(ctx, self._config.memory_mb)

    def _worker(self, slot: int, uri: str) -> _Worker:
        """The worker of a slot, started (all empty slots at once) and ready."""
        if self._workers[slot] is None:
            self.start()
        worker = self._workers[slot]
        if not worker.ready:
            ready = worker.conn.poll(START_TIMEOUT_S)
            try:
                message = worker.conn.recv() if ready else None
            except (EOFError, OSError):
                message = None
            if message is None or message[0] != "ready":
                reason = worker.describe_exit() if ready else f"did not start within {START_TIMEOUT_S} s"
                self._drop_worker(slot, worker, restart=False)
                raise DecoderCrashedError(f"{uri}: decode worker {reason} while starting")
            worker.ready = True
        return worker

    def _drop_worker(self, slot: int, worker: _Worker, *, restart: bool = True) -> None:
        """Kill a worker; its slot starts a fresh one when next used."""
        worker.kill()
        if self._workers[slot] is worker:
            self._workers[slot] = None
        self.restarts += restart

    def _submit(self, slot: int, fn: Callable[..., Iterable[Any]], args: tuple, uri: str) -> _Request:
        worker = self._worker(slot, uri)
        if not worker.process.is_alive():  # died while idle (killed from outside)
            self._drop_worker(slot, worker)
            worker = self._worker(slot, uri)
        worker.conn.send(("run", fn, args))
        request = _Request(self, slot, worker, uri)
        self._in_flight.append(request)
        return request

    # -- messages

    def _read(self, request: _Request) -> None:
        """Read one message of a request's worker into the request's buffer."""
        worker = request.worker
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            message = ("crashed", f"decode worker (pid {worker.pid}) {worker.describe_exit()}", worker.native_notes())
        except Exception as err:  # noqa: BLE001 - a message that does not unpickle here
            message = ("crashed", f"unreadable reply from the decode worker: {type(err).__name__}: {err}")
        request.progress_s = request.waited_s
        if message[0] == "item":
            request.buffered_bytes += _size_of(message[1])
        else:
            self._end(request)
            if message[0] in ("crashed", "memory"):
                self._drop_worker(request.slot, worker)
        if not request.closed:
            request.buffer.append(message)

    def _next_message(self, request: _Request) -> tuple:
        """The next message of ``request``; while waiting for it, read ahead from the
        other requests in flight (up to their prefetch budget)."""
        cfg = self._config
        while not request.buffer:
            idle_left = cfg.idle_timeout_s - (request.waited_s - request.progress_s)
            total_left = cfg.timeout_s - request.waited_s
            if min(idle_left, total_left) <= 0:
                self._end(request)
                self._drop_worker(request.slot, request.worker)
                if total_left <= idle_left:
                    reason = f"took over timeout_s={cfg.timeout_s} s"
                else:
                    reason = f"made no progress for idle_timeout_s={cfg.idle_timeout_s} s"
                raise DecodeTimeoutError(f"{request.uri}: decoding {reason}; worker killed")
            owners = {request.worker.conn: request}
            for other in self._in_flight:
                if other is not request and other.buffered_bytes < self._max_prefetch_bytes:
                    owners[other.worker.conn] = other
            started = time.monotonic()
            ready = multiprocessing.connection.wait(list(owners), timeout=min(idle_left, total_left))
            request.waited_s += time.monotonic() - started
            for conn in ready:
                self._read(owners[conn])
        message = request.buffer.popleft()
        if message[0] == "item":
            request.buffered_bytes -= _size_of(message[1])
        return message

    def _error_from(self, request: _Request, message: tuple) -> DecodeError:
        err = self._plain_error_from(request, message)
        kind, *rest = message
        notes = {"error": rest[1:2], "failed": rest[2:3], "crashed": rest[1:2]}.get(kind)
        if notes and notes[0]:
            return with_decoder_messages(err, notes[0])
        return err

    def _plain_error_from(self, request: _Request, message: tuple) -> DecodeError:
        kind, *rest = message
        uri = request.uri
        if kind == "error" and isinstance(rest[0], DecodeError):
            return rest[0]
        if kind == "memory":
            return DecoderCrashedError(f"{uri}: decode worker ran out of memory (memory_mb={self._config.memory_mb}); "
                                       "worker restarted")
        if kind == "crashed":
            hint = f" (memory_mb={self._config.memory_mb})" if "memory" in rest[0] else ""
            return DecoderCrashedError(f"{uri}: {rest[0]}{hint}")
        if kind == "failed":
            logger.warning("%s: unexpected error in the decode worker:\n%s", uri, rest[1])
            return DecodeError(f"{uri}: unexpected error while decoding: {rest[0]}")
        return DecodeError(f"{uri}: unexpected reply {kind!r} from the decode worker")

    def _end(self, request: _Request) -> None:
        request.ended = True
        if request in self._in_flight:
            self._in_flight.remove(request)

    def _cancel(self, request: _Request) -> None:
        """Stop a request in flight; restart its worker if it does not stop in time."""
        try:
            request.worker.conn.send(("cancel",))
            deadline = time.monotonic() + self._config.idle_timeout_s
            while not request.ended and request.worker.conn.poll(max(0.0, deadline - time.monotonic())):
                self._read(request)
        except OSError:
            pass
        if not request.ended:
            logger.warning("%s: decode worker did not stop after a cancel; restarting it", request.uri)
            self._end(request)
            self._drop_worker(request.slot, request.worker)


def with_decoder_messages(err: DecodeError, notes: str) -> DecodeError:
    """The same error (class and stage) with what the native decoder said appended."""
    try:
        return type(err)(f"{err}; decoder said: {notes}", stage=err.stage)
    except TypeError:  # a subclass with another constructor: keep it as it is
        return err


def _size_of(result: Any) -> int:
    """Approximate bytes a result holds (its payload's, for segments)."""
    payload = getattr(result, "payload", result)
    if hasattr(payload, "nbytes"):
        return int(payload.nbytes)
    if isinstance(payload, (str, bytes)):
        return len(payload)
    return 64
