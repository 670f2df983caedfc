"""The worker: claims nodes (atomic LMOVE in Lua, ADR 007), runs up to ``concurrency`` at
once on asyncio, heartbeats from a thread, and shuts down gracefully.

Claiming: with free slots, ``claim.lua`` moves up to that many ready jobs into this
worker's active list and makes them RUNNING attempts, in one round trip, taking the
worker's queues in order and each queue's priority bands high, normal, low. When it
finds nothing, the worker blocks in ``BLPOP`` on its queues' wake tokens (no polling)
until a push wakes it (ADR 007). Each claim carries a random claim id: a claim the
client re-sends after a lost reply returns the same jobs, and the fencing tokens of
the attempts it creates can never be issued again (docs/architecture.md).

Reconciliation: the active list in Redis must hold exactly the jobs the worker runs.
At start the worker recovers the jobs a previous process under the same id left there
(a restarted pod); the claim loop, which alone adds jobs, hands back every entry it is
not running every ``reconcile_every_s`` and after each Redis error (a lost claim
reply, writes Redis lost and rewound, a cancelled node).

Heartbeat and watchdog: a thread with its own event loop and connection
(``heartbeat.py``), so a blocked event loop cannot make a live worker look dead; the
same thread reports a blocked loop, names the node that blocks it, and fails it past
its time limit.

Sync code (agents' ``invoke``, sync tools, imports, templates with statements) runs
in the worker's own bounded executor (``executor.py``). A worker whose threads are all
hung in calls that timed out stops claiming and exits to be replaced.

Every long-lived loop survives any Redis error (logged, jittered backoff,
``oao_common/retry.py``); if one dies anyway, or the heartbeat thread does, the worker
stops and :attr:`Worker.fatal` says why (``oao-worker`` then exits with status 5).

Shutdown (SIGTERM / SIGINT): stop claiming, give in-flight nodes ``grace_period_s`` to
finish (a second signal, :meth:`Worker.end_grace`, cuts it short), cancel the rest and
hand every job of the active list back to the front of its ready list
(``handback.lua``), then deregister.

Governance is not written here: each attempt runs under a chain of middleware
(``oao_worker/middleware.py``: metrics, listeners, retries, timeouts, costs, the node's
policy, plugin policies, run budget, rate limits, circuit breakers) composed per worker
and per spec; the worker calls its node hooks and writes what they decide.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from oao_common import metrics, tracing
from oao_common.broker import Broker, ClaimedJob
from oao_common.circuit import CircuitBreaker
from oao_common.connection import reconnect
from oao_common.errors import (
    NonDeterminismError,
    PermanentError,
    PolicyViolation,
    StaleAttemptError,
)
from oao_common.events import EventType
from oao_common.log import bind_node, get_logger
from oao_common.policy import DEFAULT_RETRY
from oao_common.ratelimit import RateLimiter
from oao_common.redact import redact, redact_text
from oao_common.retry import LOOP_ERRORS, Backoff, describe, retry_transient
from oao_common.templating import render_off_loop
from oao_common.trust import DEFAULT_TRUST, TrustPolicy

from .context import AgentContext
from .deltas import DeltaPublisher
from .executor import SyncExecutor, node_deadline
from .governance import Failure, Governor, NodeAttempt, StepMiddleware
from .heartbeat import HeartbeatThread, Running
from .middleware import Builtins, compose, node_policy
from .plugins import NO_PLUGINS, EventBus, EventListeners, PluginSet
from .runtime import RuntimeCache
from .spans import Tracing


def default_worker_id() -> str:
    """``<host>-<pid>-<4 hex>``: unique per process life, readable in ``workers``."""
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(2).hex()}"


def error_info(e: BaseException) -> dict[str, Any]:
    """The JSON error record stored on a node and in its events."""
    info: dict[str, Any] = {"type": type(e).__name__, "message": redact_text(str(e))}
    if isinstance(e, PolicyViolation | NonDeterminismError):
        info.update(redact(e.to_dict()))
    return info


class _Slots:
    """A counting semaphore that can also take "as many as are free" at once.

    ``release`` is synchronous so it is safe in ``finally`` blocks of cancelled tasks.
    """

    def __init__(self, n: int) -> None:
        self.free = n
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        while self.free <= 0:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)
        self.free -= 1

    def take_free(self, most: int) -> int:
        n = max(0, min(self.free, most))
        self.free -= n
        return n

    def release(self, n: int = 1) -> None:
        self.free += n
        while n > 0 and self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                n -= 1


def _reraise_swallowed_cancel() -> None:
    """Raise ``CancelledError`` if this task was cancelled but the call it was in returned
    anyway: redis-py's pub/sub ``subscribe()`` can swallow a cancellation, after which
    its timed reads misbehave and a stopping worker waited forever on its control loop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Worker:
    """One worker process' engine (``oao-worker`` runs one; ``run`` may run several).

    ``heartbeat_ttl_s``: seconds a heartbeat lives; the reaper treats a worker whose
    key expired as dead. ``claim_batch``: most extra jobs taken per claim round trip.
    ``sync_threads``: size of the executor for sync agent and tool code (default
    ``concurrency``, at least 4, at most 64). ``reconcile_every_s``: seconds between
    reconciliations of the active list. ``block_warn_s``: event-loop lag (seconds)
    reported as a blocked loop. ``max_requeues``: as the reaper's, for the jobs a
    previous process under the same id left behind. ``trust``: what specs may import,
    read as API keys and connect to (docs/security.md). ``model_deltas``: publish
    streamed model text live on the runs' delta channels for the HTTP API's event
    streams (``oao_worker/deltas.py``; nothing is sent for a run nobody watches).
    ``plugins``: the plugins this worker loaded (``load_plugins``; docs/plugins.md):
    their middleware, providers, agent kinds and listeners. ``middleware``: more
    middleware for every attempt, placed with the plugins' (after the node's
    ``StrictPolicy``, before the run budget and the guards).
    """

    def __init__(
        self,
        broker: Broker,
        queues: list[str] | None = None,
        concurrency: int = 10,
        worker_id: str | None = None,
        heartbeat_ttl_s: float = 5.0,
        grace_period_s: float = 30.0,
        claim_timeout_s: float = 1.0,
        claim_batch: int = 32,
        sync_threads: int | None = None,
        reconcile_every_s: float = 10.0,
        block_warn_s: float = 1.0,
        max_requeues: int = 5,
        trust: TrustPolicy = DEFAULT_TRUST,
        model_deltas: bool = True,
        plugins: PluginSet | None = None,
        middleware: Sequence[StepMiddleware] = (),
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.broker = broker
        self.queues = queues or ["default"]
        self.concurrency = concurrency
        self.id = worker_id or default_worker_id()
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.grace_period_s = grace_period_s
        # Idle waits stay well inside the heartbeat so a stopping worker exits promptly.
        self.claim_timeout_s = min(claim_timeout_s, heartbeat_ttl_s / 4)
        self.claim_batch = claim_batch
        self.reconcile_every_s = reconcile_every_s
        self.block_warn_s = block_warn_s
        self.max_requeues = max_requeues
        self.executor = SyncExecutor(sync_threads or max(4, min(64, concurrency)), name=f"{self.id}-sync")
        self.plugins = plugins or NO_PLUGINS
        self.runtimes = RuntimeCache(broker, run_sync=self.executor.run, trust=trust, plugins=self.plugins)
        #: the worker-wide built-in middleware (oao_worker/middleware.py)
        self.builtins = Builtins(
            broker, RateLimiter(broker.redis, broker.keys), CircuitBreaker(broker.redis, broker.keys)
        )
        #: middleware of every attempt given by the embedding code (with the plugins')
        self.middleware = list(middleware)
        #: delivers events to the plugins' listeners (empty without listeners)
        self.listeners = EventBus(self.plugins.listeners)
        self._observers: list[StepMiddleware] = [EventListeners(self.listeners)] if self.listeners else []
        if tracing.ENABLED:  # spans of attempts, steps and calls (oao_worker/spans.py)
            self._observers.insert(0, Tracing())
        #: Publishes streamed model text on the runs' delta channels (None: off).
        self.deltas = DeltaPublisher(broker.redis, broker.keys) if model_deltas else None
        self.log = get_logger(worker_id=self.id)
        #: Why the worker stopped on its own (a loop died, executor saturated), else None.
        self.fatal: str | None = None
        self._slots = _Slots(concurrency)
        self._stop = asyncio.Event()
        self._end_grace = asyncio.Event()
        self._inflight: dict[asyncio.Task[None], ClaimedJob] = {}
        self._cancelled: set[asyncio.Task[Any]] = set()
        self._running: dict[str, Running] = {}  # task name -> job and limit (watchdog)
        self._blocked_s: dict[str, float] = {}  # task name -> seconds it blocked the loop
        self._reconcile_needed = True
        self._heartbeat: HeartbeatThread | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.completed = 0
        self.failed = 0

    # ------------------------------------------------------------------ lifecycle

    def request_stop(self, fatal: str | None = None) -> None:
        """Stop claiming and begin the graceful shutdown (safe from a signal handler).
        ``fatal`` records why the worker stops on its own (then it exits non-zero)."""
        if fatal and not self.fatal:
            self.fatal = fatal
            self.log.error("worker.fatal", reason=fatal)
        if not self._stop.is_set():
            self.log.info("worker.stopping", inflight=len(self._inflight))
            self._stop.set()

    def end_grace(self) -> None:
        """Cut the grace period short: in-flight nodes are stopped and handed back now."""
        self.grace_period_s = 0.0
        self._end_grace.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def inflight(self) -> int:
        """Node attempts this worker is running now."""
        return len(self._inflight)

    @property
    def heartbeat(self) -> HeartbeatThread | None:
        """The heartbeat thread, once the worker has registered (None before)."""
        return self._heartbeat

    async def run(self) -> None:
        """Run until :meth:`request_stop`; then drain, hand back and deregister."""
        info = {
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            "queues": ",".join(self.queues),
            "concurrency": str(self.concurrency),
            "started_at": f"{time.time():.3f}",
        }
        if not await self._start(info):
            return
        self.listeners.start()
        self.log.info(
            "worker.started", queues=self.queues, concurrency=self.concurrency, plugins=self.plugins.names
        )
        metrics.CONCURRENCY.inc(self.concurrency)
        loops = {
            asyncio.create_task(self._claim_loop(), name=f"{self.id}-claim"): "claim",
            asyncio.create_task(self._control_loop(), name=f"{self.id}-control"): "control",
        }
        watch = asyncio.create_task(self._watch(loops), name=f"{self.id}-watch")
        try:
            await self._stop.wait()
        finally:
            watch.cancel()
            for t in loops:
                t.cancel()
            await asyncio.gather(watch, *loops, return_exceptions=True)
            await self._drain()
            metrics.CONCURRENCY.dec(self.concurrency)
            await self._leave()
            await self.listeners.aclose()
            if self._heartbeat is not None:
                await asyncio.to_thread(self._heartbeat.stop)
            await self.runtimes.aclose()
            if self.deltas is not None:
                await self.deltas.aclose()
            self.executor.shutdown()

    async def _start(self, info: dict[str, str]) -> bool:
        """Register, recover what a previous process under this id left in the active
        list, start the heartbeat thread. Retries Redis errors until stopped."""
        backoff = Backoff(self.log, "worker.start")
        while not self._stop.is_set():
            try:
                await self.broker.heartbeat(self.id, self.heartbeat_ttl_s, info)
                n = await self.broker.handback(self.id, recover=True, max_requeues=self.max_requeues)
                backoff.ok()
                if n:
                    metrics.REQUEUED.labels("worker_restart").inc(n)
                    self.log.warning("worker.recovered_jobs", jobs=n, note="left by a previous process")
                break
            except LOOP_ERRORS as e:
                await backoff.sleep_after(e)
        if self._stop.is_set():
            return False
        prefix = self.broker.keys.prefix
        self._heartbeat = HeartbeatThread(
            lambda: Broker(reconnect(self.broker.redis), prefix),
            self.id,
            self.heartbeat_ttl_s,
            asyncio.get_running_loop(),
            self._running,
            on_lapse=self._on_lapse,
            on_blocked=self._on_blocked,
            block_warn_s=self.block_warn_s,
        )
        await asyncio.to_thread(self._heartbeat.start)
        return True

    async def _watch(self, loops: dict[asyncio.Task[None], str]) -> None:
        """Supervise: a loop that ends, a dead heartbeat thread or a saturated executor
        stops the worker with :attr:`fatal` set."""
        while not self._stop.is_set():
            done, _ = await asyncio.wait(loops, timeout=0.5)
            for t in done:
                e = t.exception() if not t.cancelled() else None
                self.request_stop(fatal=f"{loops[t]} loop ended: {describe(e) if e else 'returned'}")
            hb = self._heartbeat
            if hb is not None and not hb.alive:
                self.request_stop(fatal=f"heartbeat thread died: {hb.error!r}")
            if self.executor.saturated:
                metrics.WORKER_SATURATED.inc()
                self.request_stop(
                    fatal=f"all {self.executor.threads} sync threads are hung in calls that timed out; "
                    "exiting to be replaced"
                )

    def _on_lapse(self) -> None:
        t = asyncio.get_running_loop().create_task(self._check_leases())
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    def _on_blocked(self, task_name: str, seconds: float) -> None:
        if task_name in self._running:
            self._blocked_s[task_name] = self._blocked_s.get(task_name, 0.0) + seconds
        metrics.LOOP_BLOCKED_SECONDS.observe(seconds)

    async def _drain(self) -> None:
        """Give in-flight nodes the grace period (ended early by :meth:`end_grace`), then
        cancel what still runs."""
        tasks = list(self._inflight)
        if tasks:
            self.log.info("worker.draining", inflight=len(tasks), grace_s=self.grace_period_s)
            cut = asyncio.create_task(self._end_grace.wait())
            deadline = time.monotonic() + self.grace_period_s
            pending_tasks: set[asyncio.Future[Any]] = set(tasks)
            while pending_tasks and not cut.done() and time.monotonic() < deadline:
                done, _ = await asyncio.wait(
                    [*pending_tasks, cut],
                    timeout=deadline - time.monotonic(),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                pending_tasks -= done
            cut.cancel()
            pending = [t for t in tasks if not t.done()]
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _leave(self) -> None:
        """Hand everything back and deregister, retrying Redis errors for about 5 s;
        after that the reaper requeues our jobs once the heartbeat expires."""
        backoff = Backoff(self.log, "worker.leave", base_s=0.2, cap_s=2.0)
        for _ in range(5):
            try:
                n = await self.broker.handback(self.id)
                metrics.REQUEUED.labels("handback").inc(n)
                await self.broker.deregister(self.id)
                self.log.info("worker.stopped", handed_back=n, completed=self.completed, failed=self.failed)
                return
            except LOOP_ERRORS as e:
                await backoff.sleep_after(e)
        self.log.error(
            "worker.handback_gave_up",
            note="the reaper will requeue this worker's jobs after its heartbeat expires",
        )

    # ------------------------------------------------------------------ leases

    async def _check_leases(self) -> None:
        """Our heartbeat had lapsed: abandon nodes whose attempt moved on."""
        items = list(self._inflight.items())
        if not items:
            return
        try:
            held = await self.broker.lease_holders([j for _, j in items])
        except LOOP_ERRORS as e:
            self.log.warning("worker.lease_check_failed", error=describe(e))
            return
        lost = [(t, j) for (t, j), ok in zip(items, held, strict=True) if not ok]
        self.log.warning("worker.heartbeat_lapsed", inflight=len(items), lost=len(lost))
        for t, j in lost:
            self.log.warning("node.lease_lost", run_id=j.run_id, node_id=j.node_id, attempt=j.attempt)
            t.cancel()
        self._reconcile_needed = True

    # ------------------------------------------------------------------ control

    async def _control_loop(self) -> None:
        """Listen for fleet control messages (``cancel <rid>``) on the pub/sub channel.

        A message missed during a reconnect costs only latency: the cancelled nodes'
        next fenced write is rejected anyway.
        """
        backoff = Backoff(self.log, "worker.control")
        # redis-py's pub/sub calls can swallow a cancellation (subscribe(), or a cancel
        # that lands as get_message's own timeout fires), and shutdown then waited
        # forever: a swallowed cancel is re-raised, and the loop also ends on its own
        # once the worker stops.
        while not self._stop.is_set():
            pubsub = self.broker.redis.pubsub()
            try:
                await pubsub.subscribe(self.broker.keys.control_channel)
                _reraise_swallowed_cancel()
                backoff.ok()
                while not self._stop.is_set():
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    _reraise_swallowed_cancel()
                    if msg is None or msg.get("type") != "message":
                        continue
                    cmd, _, arg = str(msg["data"]).partition(" ")
                    if cmd == "cancel" and arg:
                        await self._cancel_run(arg)
            except LOOP_ERRORS as e:
                await backoff.sleep_after(e)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _cancel_run(self, run_id: str) -> None:
        """Stop this worker's in-flight nodes of a cancelled (or failed) run at once."""
        victims = {t: j for t, j in self._inflight.items() if j.run_id == run_id}
        if not victims:
            return
        self._cancelled.update(victims)
        for t in victims:
            t.cancel()
        await asyncio.gather(*victims, return_exceptions=True)
        self.log.info("run.cancelled_nodes_stopped", run_id=run_id, nodes=len(victims))
        try:  # their jobs leave the active list now (only theirs: a claim may be in flight)
            await self.broker.handback(self.id, only=[j.job for j in victims.values()])
        except LOOP_ERRORS:
            self._reconcile_needed = True

    # ------------------------------------------------------------------ claiming

    async def _claim_loop(self) -> None:
        """Claim while there is work and a free slot; when a claim finds nothing, block
        on the queues' wake tokens (no polling). Claims are atomic moves in Lua. The
        active list is reconciled here, between claims, so it never races one."""
        backoff = Backoff(self.log, "worker.claim", base_s=0.05)
        next_reconcile = time.monotonic() + self.reconcile_every_s
        while not self._stop.is_set():
            if self.executor.hung:
                await self._wait_for_sync_threads()
            await self._slots.acquire()
            taken = 1 + self._slots.take_free(self.claim_batch - 1)
            claimed: list[ClaimedJob] = []
            wanted = taken
            pause = 0.0
            try:
                if self._reconcile_needed or time.monotonic() >= next_reconcile:
                    await self._reconcile()
                    next_reconcile = time.monotonic() + self.reconcile_every_s
                claimed = await self.broker.claim(self.id, self.queues, taken)
                for cj in claimed:
                    t = asyncio.create_task(self._execute(cj), name=f"{cj.job}#{cj.fence}")
                    self._inflight[t] = cj
                    t.add_done_callback(self._inflight.pop)
                taken -= len(claimed)
                backoff.ok()
            except LOOP_ERRORS as e:
                pause = backoff.failed(e)
                self._reconcile_needed = True  # a claim whose reply was lost
            finally:
                self._slots.release(taken)
            if pause:
                await asyncio.sleep(pause)
            elif len(claimed) < wanted:
                # The lists were drained: a later push leaves a wake token, so waiting
                # now loses nothing and saves an empty claim round trip.
                try:
                    await self.broker.wait_for_work(self.queues, self.claim_timeout_s)
                except LOOP_ERRORS as e:
                    await backoff.sleep_after(e)

    async def _wait_for_sync_threads(self) -> None:
        """Some sync threads are hung: claim only while a thread is free for new work."""
        logged = False
        while self.executor.hung and self.executor.busy >= self.executor.threads and not self._stop.is_set():
            if not logged:
                self.log.warning(
                    "worker.sync_threads_busy",
                    hung=self.executor.hung,
                    threads=self.executor.threads,
                    note="not claiming until a sync thread is free",
                )
                logged = True
            await asyncio.sleep(0.2)

    async def _reconcile(self) -> None:
        """Hand back the jobs of our active list we are not running."""
        self._reconcile_needed = False
        n = await self.broker.handback(self.id, keep=[j.job for j in self._inflight.values()])
        if n:
            metrics.REQUEUED.labels("reconcile").inc(n)
            self.log.warning("worker.reconciled", handed_back=n)

    # ------------------------------------------------------------------ executing

    def _chain(self, node: NodeAttempt, *, full: bool = True) -> list[StepMiddleware]:
        """The attempt's middleware, composed per worker (built-ins, plugins' worker-wide
        middleware, ``middleware``) and per spec (the node's policy, the spec's
        ``middleware:``). Not ``full`` (the spec could not be loaded, or its middleware
        built): the worker's built-ins only. Raises :class:`PermanentError` for spec
        middleware no loaded plugin provides, or whose config it refuses."""
        if not full or node.spec is None:
            return compose(self.builtins, observers=self._observers)
        policies = [
            *self.plugins.worker_middleware(node),
            *self.middleware,
            *self.plugins.spec_middleware(node.spec.middleware),
        ]
        return compose(
            self.builtins, node_policy=node_policy(node), observers=self._observers, policies=policies
        )

    async def _execute(self, job: ClaimedJob) -> None:
        with bind_node(job.run_id, job.node_id, job.attempt, self.id):
            await self._execute_attempt(job)

    async def _execute_attempt(self, job: ClaimedJob) -> None:
        log = self.log.bind(run_id=job.run_id, node_id=job.node_id, attempt=job.attempt)
        me = asyncio.current_task()
        name = me.get_name() if me is not None else job.job
        ctx: AgentContext | None = None
        node = NodeAttempt(job, self.id, time.monotonic())
        gov: Governor | None = None
        try:
            log.debug("node.started")
            # A read, but idempotent: ride out a Redis blip like a fenced write would,
            # instead of spending one of the node's retries before its agent ran.
            rt = await retry_transient(
                lambda: self.runtimes.get(job.run_id),
                log=log,
                what="load_run",
                for_s=self.broker.write_retry_s,
            )
            node.runtime, node.spec = rt, rt.spec
            node.node_spec = nspec = rt.spec.node(job.node_id)
            node.agent_spec = rt.spec.agents[nspec.agent]
            node.policy = rt.spec.effective_policy(nspec)
            node.retry = rt.spec.effective_retry(nspec)
            gov = Governor(self._chain(node), node)
            await gov.before_node(node)  # the timeouts middleware sets the time limit
            self._running[name] = Running(job, node.started, node.time_limit_s)
            try:
                async with asyncio.timeout(node.time_limit_s) as deadline:
                    self._running[name].deadline = deadline
                    with node_deadline(deadline):
                        variables = {
                            "inputs": rt.inputs,
                            "nodes": {k: {"output": v} for k, v in job.dep_outputs.items()},
                        }
                        task = await render_off_loop(
                            nspec.task, variables, f"nodes.{nspec.id}.task", self.executor.run
                        )
                        ctx = AgentContext(
                            broker=self.broker,
                            worker_id=self.id,
                            job=job,
                            spec=rt.spec,
                            inputs=rt.inputs,
                            task=task,
                            governor=gov,
                            providers=rt.providers,
                            tools=rt.tools,
                            default_model=rt.spec.default_model(nspec.agent),
                            run_sync=self.executor.run,
                            strict_replay=rt.strict_replay,
                            deltas=self.deltas,
                            node=node,
                        )
                        agent = await rt.agent(nspec.agent, self.executor.run)
                        output = await agent.run(ctx)
                        ctx.check_replay_complete()
            except TimeoutError:
                node.timed_out = True  # the timeouts middleware makes it a policy violation
                raise
            if (when := deadline.when()) is not None and asyncio.get_running_loop().time() > when:
                # The loop was blocked past the deadline and the agent returned before
                # the timeout could fire: the limit still holds. (The deadline, not the
                # wall time: it moved out while sync calls waited for a thread.)
                node.timed_out = True
                raise TimeoutError
            ok = await self.broker.complete(self.id, job, output, ctx.node_fields(), ctx.drain_events())
            node.outcome, node.output = ("succeeded" if ok else "stale"), output
            if ok:
                self.completed += 1
                log.info(
                    "node.succeeded",
                    steps=ctx.governor.usage.steps,
                    replayed=ctx.replayed_steps,
                    duration_ms=int((time.monotonic() - node.started) * 1000),
                )
            else:
                log.warning("node.stale_completion_rejected")
        except asyncio.CancelledError:
            if me in self._cancelled:
                self._cancelled.discard(me)
                node.outcome = "cancelled"
                log.info("node.stopped", reason="run cancelled or failed")
            else:
                node.outcome = "abandoned"
                log.info("node.abandoned", reason="shutdown or lease lost")
                raise
        except StaleAttemptError as e:
            node.outcome, node.error = "stale", e
            log.warning("node.stale_attempt", error=str(e))
        except Exception as e:
            r = self._running.get(name)
            if r is not None and r.failed:  # the watchdog failed it while the loop was blocked
                node.outcome, node.error = "watchdog", e
                log.warning("node.failed_by_watchdog", error=str(e))
                return
            node.blocked_s = self._blocked_s.get(name, 0.0)
            gov = gov or Governor(self._chain(node, full=False), node)
            node.outcome = await self._fail(node, gov, ctx, e, log)
        finally:
            self._running.pop(name, None)
            self._blocked_s.pop(name, None)
            try:
                if gov is None:  # cancelled before its chain existed
                    gov = Governor(self._chain(node, full=False), node)
                await gov.after_node(node)
            finally:
                self._slots.release()

    async def _fail(
        self, node: NodeAttempt, gov: Governor, ctx: AgentContext | None, e: Exception, log: Any
    ) -> str:
        """Record a failed attempt; returns the outcome (retry, failed, stale, unrecorded).

        The chain's ``on_error`` classifies the error (``oao_worker/middleware.py``:
        policy violations and other permanent errors fail the node at once; anything
        else, a Redis error included, is retried with the node's backoff, or the default
        retry settings when the run's spec cannot be read right now).
        """
        job = node.job
        if node.retry is None and not isinstance(e, PermanentError):
            try:  # the spec could not be loaded before: its retry settings, if it can be now
                rt = await self.runtimes.get(job.run_id)
                node.retry = rt.spec.effective_retry(rt.spec.node(job.node_id))
            except PermanentError:
                node.retry = None
            except Exception:  # e.g. Redis unreachable while the spec is not cached
                node.retry = DEFAULT_RETRY
        failure = Failure("node", e, node)
        await gov.on_error(failure)
        node.error = err = failure.error
        events = node.drain_events()
        if ctx and ctx.lifecycle.state != "TERMINATE":
            ctx.lifecycle.terminate()
            events += node.drain_events()
        fields = ctx.node_fields() if ctx else {}
        info = error_info(err)
        if isinstance(err, PolicyViolation):
            node.emit(EventType.POLICY_VIOLATION, err.to_dict())
            events += node.drain_events()
        delay = failure.delay_s if failure.retry else None
        try:
            r = await self.broker.fail(self.id, job, info, delay, fields, events)
        except LOOP_ERRORS as re:
            log.error(
                "node.fail_not_recorded",
                error=describe(re),
                note="the job stays in the active list; reconciliation or the reaper requeues it",
            )
            self._reconcile_needed = True
            return "unrecorded"
        if r == 2:
            log.warning(
                "node.retry_scheduled",
                error=info["message"],
                delay_s=round(delay or 0, 3),
                retry=job.retries + 1,
            )
            return "retry"
        if r == 1:
            self.failed += 1
            log.error("node.failed", error=info["message"], error_type=info["type"])
            return "failed"
        log.warning("node.stale_failure_rejected", error=info["message"])
        return "stale"
