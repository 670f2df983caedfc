"""The heartbeat thread and the event-loop watchdog of a worker.

Heartbeats must not depend on the worker's event loop: an agent that calls
``time.sleep(8)`` inside ``async def run(ctx)``, or a slow import, stops the loop, and
a heartbeat task on that loop would stop with it, so the reaper would declare a live
worker dead and its nodes would hop through the fleet. The heartbeat therefore runs in
a daemon thread with its own event loop and its own Redis connection.

The same thread watches the worker's loop: every ``check_s`` it posts a callback to the
loop and measures how long ago the previous one ran (the lag). A lag over
``block_warn_s`` is a *blocked loop*: it is logged at once, naming the task that holds
the loop (a node's task is named ``<run>/<node>#<fence>``, the fence starting with the
attempt number), and when the loop runs again the episode is logged with its length
and written to the node's event log
(``LOOP_BLOCKED``). A node whose blocking outlasts its time limit by a heartbeat TTL is
failed from this thread (``PolicyViolation`` ``timeout_s``, never retried), and a loop
still blocked a TTL after that ends the process (exit status 5) so a supervisor
replaces it; the reaper then requeues its other nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from oao_common import metrics
from oao_common.broker import Broker, ClaimedJob
from oao_common.errors import PolicyViolation
from oao_common.events import EventType, pending_event
from oao_common.log import get_logger
from oao_common.retry import LOOP_ERRORS, Backoff, describe

EXIT_LOOP_WEDGED = 5


@dataclass(slots=True)
class Running:
    """What the watchdog knows of a node task: its job, its time limit (seconds) and its
    deadline (``asyncio.Timeout``, on the monotonic clock, moved out while sync calls
    wait for a thread). ``failed`` is set once the watchdog failed the node."""

    job: ClaimedJob
    started: float
    limit_s: float | None
    deadline: asyncio.Timeout | None = None
    failed: bool = False

    def overrun_s(self, now: float) -> float | None:
        """Seconds past the deadline at monotonic time ``now`` (negative before it);
        None without a limit."""
        when = self.deadline.when() if self.deadline is not None else None
        if when is None:
            return None if self.limit_s is None else now - self.started - self.limit_s
        return now - when


class HeartbeatThread:
    """Heartbeats (``ttl_s``, refreshed every ``ttl_s / 3``) and the loop watchdog.

    ``make_broker()`` builds a :class:`Broker` on a new connection inside the thread.
    ``running`` maps task names to :class:`Running` (maintained by the worker);
    ``on_lapse()`` is called on the worker's loop when a refresh finds the previous
    heartbeat expired; ``on_blocked(task_name, seconds)`` when a blocked episode ends.
    """

    def __init__(
        self,
        make_broker: Callable[[], Broker],
        worker_id: str,
        ttl_s: float,
        loop: asyncio.AbstractEventLoop,
        running: dict[str, Running],
        on_lapse: Callable[[], Any],
        on_blocked: Callable[[str, float], Any],
        block_warn_s: float = 1.0,
        check_s: float = 0.2,
    ) -> None:
        self.make_broker = make_broker
        self.worker_id = worker_id
        self.ttl_s = ttl_s
        self.loop = loop
        self.running = running
        self.on_lapse = on_lapse
        self.on_blocked = on_blocked
        self.block_warn_s = block_warn_s
        self.check_s = min(check_s, ttl_s / 6)
        self.log = get_logger(worker_id=worker_id, component="heartbeat")
        self.beats = 0
        #: Monotonic times (seconds) of the thread's start, the last heartbeat that
        #: succeeded and the last that finished either way (read by ``oao_worker/health.py``).
        self.started_at: float | None = None
        self.last_ok: float | None = None
        self.last_done: float | None = None
        #: When the last heartbeat was written (monotonic seconds; the start before any).
        self.last_beat = time.monotonic()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"{worker_id}-heartbeat", daemon=True)
        self._last_pong = time.monotonic()
        self._first_beat = threading.Event()

    # ------------------------------------------------------------------ control

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the thread and wait for its first heartbeat attempt."""
        self.started_at = time.monotonic()
        metrics.watch_heartbeat(self)
        self._thread.start()
        self._first_beat.wait(timeout_s)

    def stop(self) -> None:
        metrics.forget_heartbeat(self)
        self._stop.set()
        self._thread.join(timeout=5.0)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _pong(self) -> None:
        self._last_pong = time.monotonic()

    # ------------------------------------------------------------------ thread

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as e:  # the worker sees a dead thread and exits non-zero
            self.error = e
            self.log.error("worker.heartbeat_thread_died", error=f"{type(e).__name__}: {e}")
        finally:
            self._first_beat.set()

    async def _beat(self, broker: Broker, backoff: Backoff) -> float:
        """One heartbeat; returns when the next is due (monotonic seconds)."""
        try:
            alive = await broker.heartbeat(self.worker_id, self.ttl_s)
        except LOOP_ERRORS as e:
            return time.monotonic() + backoff.failed(e)
        finally:
            self.last_done = time.monotonic()
            self._first_beat.set()
        backoff.ok()
        self.beats += 1
        self.last_ok = self.last_done
        self.last_beat = time.monotonic()
        if not alive:
            self._call_loop(self.on_lapse)
        return time.monotonic() + self.ttl_s / 3

    async def _run(self) -> None:
        broker = self.make_broker()
        backoff = Backoff(self.log, "worker.heartbeat", base_s=0.1, cap_s=self.ttl_s / 3)
        beat: asyncio.Task[float] | None = None
        next_beat = 0.0
        ping_sent: float | None = None  # when the unanswered ping was posted to the loop
        blocked_since: float | None = None
        culprit = ""
        record: Running | None = None
        failed_culprit = False
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                # heartbeats run beside the watchdog: a slow Redis call never delays a ping
                if beat is not None and beat.done():
                    next_beat, beat = beat.result(), None
                if beat is None and now >= next_beat:
                    beat = asyncio.create_task(self._beat(broker, backoff))
                # --- watchdog: how long has the posted ping waited for the loop?
                if ping_sent is not None and self._last_pong >= ping_sent:
                    metrics.LOOP_LAG_SECONDS.set(self._last_pong - ping_sent)
                    ping_sent = None
                lag = now - ping_sent if ping_sent is not None else 0.0
                if lag > self.block_warn_s:
                    if blocked_since is None:
                        blocked_since = ping_sent
                        culprit = self._current_task_name()
                        record = self.running.get(culprit)
                        self.log.warning("worker.loop_blocked", task=culprit, blocked_s=round(lag, 3))
                    if record is not None and not failed_culprit:
                        failed_culprit = await self._fail_if_over_limit(broker, record, lag)
                    overrun = record.overrun_s(time.monotonic()) if record is not None else None
                    if failed_culprit and overrun is not None and overrun > 2 * self.ttl_s:
                        self.log.error(
                            "worker.loop_wedged",
                            task=culprit,
                            blocked_s=round(lag, 3),
                            note="exiting so that a supervisor replaces this worker",
                        )
                        os._exit(EXIT_LOOP_WEDGED)
                elif blocked_since is not None and ping_sent is None:
                    total = self._last_pong - blocked_since
                    await self._report_blocked(broker, culprit, record, total)
                    blocked_since, culprit, record, failed_culprit = None, "", None, False
                if ping_sent is None:
                    ping_sent = time.monotonic()
                    self._call_loop(self._pong)
                await asyncio.sleep(self.check_s)
        finally:
            if beat is not None:
                beat.cancel()
                with contextlib.suppress(BaseException):
                    await beat
            await broker.redis.aclose()

    def _call_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the worker's loop is closed: the worker is gone
            self._stop.set()

    def _current_task_name(self) -> str:
        try:
            task = asyncio.current_task(self.loop)
        except RuntimeError:
            return ""
        return task.get_name() if task is not None else ""

    async def _fail_if_over_limit(self, broker: Broker, r: Running, lag: float) -> bool:
        """Fail the blocking node once its blocking outlasted its deadline by a TTL."""
        now = time.monotonic()
        overrun = r.overrun_s(now)
        if overrun is None or overrun < self.ttl_s:
            return False
        elapsed = now - r.started
        e = PolicyViolation(
            "timeout_s",
            r.limit_s,
            round(elapsed, 3),
            detail=f"the node's code blocked the worker's event loop for {lag:.1f} s "
            "(use await asyncio.sleep, or run blocking code in a thread)",
        )
        info = {"type": type(e).__name__, "message": str(e), **e.to_dict()}
        try:
            await broker.fail(
                self.worker_id,
                r.job,
                info,
                None,
                events=[pending_event(EventType.POLICY_VIOLATION, e.to_dict())],
            )
        except LOOP_ERRORS as err:
            self.log.warning("worker.blocked_node_fail_failed", error=describe(err))
            return False
        r.failed = True
        self.log.error("node.failed", run_id=r.job.run_id, node_id=r.job.node_id, error=str(e))
        return True

    async def _report_blocked(
        self, broker: Broker, task_name: str, r: Running | None, seconds: float
    ) -> None:
        fields: dict[str, Any] = {"task": task_name, "blocked_s": round(seconds, 3)}
        if r is not None:
            fields.update(run_id=r.job.run_id, node_id=r.job.node_id, attempt=r.job.attempt)
        self.log.warning("worker.loop_unblocked", **fields)
        self._call_loop(self.on_blocked, task_name, seconds)
        if r is None:
            return
        try:
            await broker.append_run_event(
                r.job.run_id,
                EventType.LOOP_BLOCKED,
                {"worker": self.worker_id, "blocked_s": round(seconds, 3)},
                node=r.job.node_id,
                attempt=r.job.attempt,
            )
        except LOOP_ERRORS as e:
            self.log.warning("worker.loop_blocked_event_lost", error=describe(e))
