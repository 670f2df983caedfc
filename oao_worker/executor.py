"""The worker's own bounded thread pool for agents' and tools' synchronous code.

``asyncio.timeout`` cannot stop a thread. With the default executor, six sync calls
that hang past their ``timeout_s`` used to fill it, and every later sync node on the
worker then failed its time limit while waiting for a thread. This pool fixes that:

* its size is fixed (``threads``) and its threads are daemons, so a hung call never
  keeps the process from exiting (a supervisor can always replace the worker);
* the timeout clock of a sync call starts when its thread does: the time a call waits
  for a free thread is added back to the node's deadline (:func:`node_deadline`);
* a call abandoned by its caller (timed out, cancelled) while its thread still runs is
  counted as *hung* until the thread returns; :attr:`SyncExecutor.saturated` says that
  every thread is hung, and the worker then stops claiming and exits to be replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_deadline: contextvars.ContextVar[asyncio.Timeout | None] = contextvars.ContextVar(
    "oao_node_deadline", default=None
)


@contextlib.contextmanager
def node_deadline(timeout: asyncio.Timeout) -> Iterator[None]:
    """Make ``timeout`` (the node's ``asyncio.timeout``) the deadline that sync calls of
    this task extend by the time they wait for a thread."""
    token = _deadline.set(timeout)
    try:
        yield
    finally:
        _deadline.reset(token)


class _Call:
    __slots__ = ("abandoned", "args", "done", "fn", "kwargs", "loop", "result", "running", "skip", "started")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.loop = asyncio.get_running_loop()
        self.started: asyncio.Future[float] = self.loop.create_future()
        self.result: asyncio.Future[Any] = self.loop.create_future()
        self.abandoned = False  # the caller gave up while the thread ran it
        self.skip = False  # the caller gave up before a thread took it: never run it
        self.running = False
        self.done = False


def _settle(fut: asyncio.Future[Any], value: Any = None, error: BaseException | None = None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


class SyncExecutor:
    """A fixed pool of ``threads`` daemon threads running sync callables for coroutines.

    ``await pool.run(fn, *args)`` runs ``fn`` in a thread (with the caller's context
    variables) and returns its result or raises its exception. ``hung`` counts calls
    whose caller gave up while the thread still runs; ``busy`` the threads running.
    """

    def __init__(self, threads: int, name: str = "oao-sync") -> None:
        if threads < 1:
            raise ValueError("threads must be >= 1")
        self.threads = threads
        self.name = name
        self.busy = 0
        self.hung = 0
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[_Call, contextvars.Context] | None] = queue.SimpleQueue()
        self._started = 0
        self._closed = False

    @property
    def saturated(self) -> bool:
        """Every thread is held by a call its caller abandoned: nothing sync can run."""
        return self.hung >= self.threads

    def _spawn_if_needed(self) -> None:
        with self._lock:
            if self._started < self.threads and self._started < self.busy + self._queue.qsize() + 1:
                self._started += 1
                threading.Thread(target=self._work, name=f"{self.name}-{self._started}", daemon=True).start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            call, ctx = item
            with self._lock:
                if call.skip:
                    continue
                call.running = True
                self.busy += 1
            with contextlib.suppress(RuntimeError):
                call.loop.call_soon_threadsafe(_settle, call.started, time.monotonic())
            try:
                value = ctx.run(call.fn, *call.args, **call.kwargs)
                error: BaseException | None = None
            except BaseException as e:
                value, error = None, e
            with self._lock:
                self.busy -= 1
                call.done = True
                if call.abandoned:
                    self.hung -= 1
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                call.loop.call_soon_threadsafe(_settle, call.result, value, error)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` in a pool thread; see the class docstring.

        While the call waits for a free thread, the current node's deadline (if any,
        :func:`node_deadline`) moves out by the same time. Raises ``RuntimeError`` after
        :meth:`shutdown`.
        """
        if self._closed:
            raise RuntimeError("executor is shut down")
        call = _Call(fn, args, kwargs)
        queued_at = time.monotonic()
        self._queue.put((call, contextvars.copy_context()))
        self._spawn_if_needed()
        try:
            started_at = await asyncio.shield(call.started)
            waited = started_at - queued_at
            deadline = _deadline.get()
            if deadline is not None and waited > 0.001 and deadline.when() is not None:
                deadline.reschedule(deadline.when() + waited)  # type: ignore[operator]
            return await asyncio.shield(call.result)
        except asyncio.CancelledError:
            with self._lock:
                if not call.running:
                    call.skip = True
                elif not call.done and not call.abandoned:
                    call.abandoned = True
                    self.hung += 1
            raise

    def shutdown(self) -> None:
        """Stop idle threads; hung ones are daemons and die with the process."""
        self._closed = True
        for _ in range(self._started):
            self._queue.put(None)
