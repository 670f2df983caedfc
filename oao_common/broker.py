"""The queue protocol over Redis: the one place that issues OAO's Redis commands.

Both the scheduler and the workers talk to Redis only through :class:`Broker`.
Atomic transitions are Lua scripts (``oao_common/lua``); this class builds their
arguments, decodes their replies and offers the read side (runs, nodes, events,
workers) used by ``status``, ``events`` and the report.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from .events import Event
from .keys import Keys, job_id, parse_job
from .log import get_logger
from .retry import LOOP_ERRORS, MAX_DELAY_S, Backoff, retry_transient
from .scripts import Scripts
from .states import NodeState, RunState
from .stored_spec import SPEC_TEXTS, join_spec


def new_run_id() -> str:
    """A sortable, unique run id: ms timestamp in hex followed by 6 random hex digits."""
    return f"{int(time.time() * 1000):x}{secrets.token_hex(3)}"


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


@dataclass(slots=True)
class ClaimedJob:
    """A job this worker now runs.

    ``attempt`` is the node's attempt number (1, 2, ...; for events and people);
    ``fence`` the fencing token of this claim, which every write of the attempt presents
    (``claim.lua``: ``"<attempt>:<claim id>:<i>"``, never issued twice).

    ``dep_outputs`` maps each dependency's id to its decoded output; ``ledger`` holds
    the node's recorded steps in order (``None`` for a gap), decoded from JSON;
    ``started`` maps the sequence number of each step that an earlier attempt began
    (``begin_step``) but never recorded to its marker.
    """

    job: str
    run_id: str
    node_id: str
    attempt: int
    fence: str = ""
    dep_outputs: dict[str, Any] = field(default_factory=dict)
    ledger: list[dict[str, Any] | None] = field(default_factory=list)
    retries: int = 0
    started: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: The run's W3C ``traceparent`` (written at submit), so the attempt's span is a
    #: child of the run's span on any worker; "" for a run without one.
    traceparent: str = ""


@dataclass(slots=True)
class ReapResult:
    worker_id: str
    requeued: int
    poisoned: int
    dropped: int


@dataclass(slots=True)
class PruneResult:
    """What one ``prune.lua`` call deleted: runs, keys (spec keys included), run ids."""

    runs: int
    keys: int
    run_ids: list[str]


class Broker:
    """OAO's Redis protocol. ``redis`` must use ``decode_responses=True``."""

    def __init__(self, redis: Redis, prefix: str = "oao", write_retry_s: float = 30.0) -> None:
        # Typed Any: redis-py's annotations describe replies as ``bytes | str`` whatever
        # ``decode_responses`` says; with ``decode_responses=True`` they are ``str``.
        self.redis: Any = redis
        self.keys = Keys(prefix)
        self.scripts = Scripts(redis, self.keys)
        self.write_retry_s = write_retry_s

    async def _fenced(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run a fenced write script, retrying transient Redis errors (connection loss,
        OOM, READONLY, LOADING...: :func:`oao_common.retry.transient`) for up to
        ``write_retry_s`` seconds. Safe because the fenced scripts are idempotent for a
        repeated call of the same attempt. Raises the last error when the time is up."""
        return await retry_transient(
            lambda: self.scripts.call(name, keys, args),
            log=get_logger(component="broker"),
            what=name,
            for_s=self.write_retry_s,
        )

    # ---------------------------------------------------------------- submit

    async def submit(
        self,
        run_id: str,
        run_fields: dict[str, str],
        nodes: list[dict[str, Any]],
        event_data: dict[str, Any],
        idempotency_key: str | None = None,
        idempotency_ttl_s: int = 0,
        spec_hash: str | None = None,
        spec_json: str = "",
        seed_steps: dict[str, str] | None = None,
        seed_messages: dict[str, str] | None = None,
    ) -> tuple[bool, str]:
        """Write a run atomically (``submit.lua``). Returns ``(created, run_id)``;
        ``created`` is False when the idempotency key already named a run, and
        ``run_id`` is then that run's id. ``run_id`` must be fresh (:func:`new_run_id`):
        an existing run of that id counts as this call's own write, re-sent by the
        client after a lost reply. With ``spec_hash``, ``spec_json`` (the spec without
        inputs, see :mod:`oao_common.stored_spec`) is stored once under that hash and the
        run takes a reference to it. Only keys that exist are declared (an ACL user
        limited to the prefix can submit). A replay seeds its step ledger with
        ``seed_steps`` (``"<node>:<seq>"`` → record JSON) and the messages they refer to
        (``seed_messages``, ref → JSON) in the same atomic step."""
        keys = [self.keys.run(run_id), self.keys.runs]
        if spec_hash:
            keys.append(self.keys.spec(spec_hash))
        if idempotency_key:
            keys.append(self.keys.idempotency(idempotency_key))
        created, rid = await self.scripts.call(
            "submit",
            keys,
            [
                run_id,
                _json(run_fields),
                _json(nodes),
                _json(event_data),
                idempotency_ttl_s,
                spec_json if spec_hash else "",
                _json(seed_steps) if seed_steps else "",
                _json(seed_messages) if seed_messages else "",
            ],
        )
        # A fresh run id that already exists is this very call, re-sent by the client
        # after a lost reply: it was written, by us.
        return bool(created) or str(rid) == run_id, str(rid)

    # ---------------------------------------------------------------- claim

    async def wait_for_work(self, queues: list[str], timeout_s: float) -> bool:
        """Block until a wake token of one of ``queues`` arrives (``BLPOP``) or
        ``timeout_s`` seconds pass; True if woken. Tokens are hints: the claim that
        follows decides whether there is work (ADR 007)."""
        got = await self.redis.blpop([self.keys.wake(q) for q in queues], timeout=timeout_s)
        return got is not None

    async def claim(self, worker_id: str, queues: list[str] | str, most: int) -> list[ClaimedJob]:
        """Claim up to ``most`` jobs from ``queues`` (in order, each by priority band) in
        one round trip (``claim.lua``): each is moved to the worker's active list and
        becomes a RUNNING attempt. Returns ``[]`` when there is nothing to claim."""
        qs = [queues] if isinstance(queues, str) else queues
        reply = await self.scripts.call(
            "claim",
            [self.keys.active(worker_id), self.keys.claim_memo(worker_id), *self.keys.ready_lists(qs)],
            [worker_id, max(1, most), secrets.token_hex(8)],
        )
        out: list[ClaimedJob] = []
        for job, attempt, fence, outs, ledger, retries, started, *rest in reply:
            rid, nid = parse_job(job)
            deps = {outs[i]: json.loads(outs[i + 1]) for i in range(0, len(outs), 2)}
            out.append(
                ClaimedJob(
                    job=job,
                    run_id=rid,
                    node_id=nid,
                    attempt=int(attempt),
                    fence=str(fence),
                    dep_outputs=deps,
                    ledger=[json.loads(r) if r else None for r in ledger],
                    retries=int(retries),
                    started={int(started[i]): json.loads(started[i + 1]) for i in range(0, len(started), 2)},
                    traceparent=str(rest[0]) if rest and rest[0] else "",
                )
            )
        return out

    # ---------------------------------------------------------------- fenced writes

    async def append_events(self, worker_id: str, job: ClaimedJob, events: list[list[Any]]) -> bool:
        """Write buffered events of a node now (fenced); False if the attempt is stale."""
        ok = await self._fenced(
            "append_events",
            [self.keys.active(worker_id)],
            [worker_id, job.job, job.fence, _json(events)],
        )
        return bool(ok)

    async def begin_step(
        self,
        worker_id: str,
        job: ClaimedJob,
        seq: int,
        marker: dict[str, Any],
        events: list[list[Any]] | None = None,
    ) -> bool:
        """Mark step ``seq`` as started before it executes; False if the attempt is stale."""
        ok = await self._fenced(
            "begin_step",
            [self.keys.active(worker_id)],
            [worker_id, job.job, job.fence, seq, _json(marker), _json(events or [])],
        )
        return bool(ok)

    async def record_step(
        self,
        worker_id: str,
        job: ClaimedJob,
        seq: int,
        record: dict[str, Any],
        tokens_in: int = 0,
        tokens_out: int = 0,
        cost_usd: float = 0.0,
        is_tool: bool = False,
        events: list[list[Any]] | None = None,
        reservation: str | None = None,
        messages: dict[str, str] | None = None,
        counts: bool = True,
    ) -> bool:
        """Append step ``seq`` to the ledger and add its usage to the node and run
        counters, settling budget ``reservation`` in the same atomic step; False if the
        attempt is stale. ``messages`` (ref → canonical JSON) are added to the run's
        message store (:mod:`oao_common.ledger`); ``counts=False`` leaves the run's step
        counter alone (``ctx.now()`` and the like)."""
        ok = await self._fenced(
            "record_step",
            [self.keys.active(worker_id), self.keys.reservations(job.run_id)],
            [
                worker_id,
                job.job,
                job.fence,
                seq,
                _json(record),
                int(tokens_in),
                int(tokens_out),
                repr(float(cost_usd)),
                1 if is_tool else 0,
                _json(events or []),
                reservation or "",
                _json(messages) if messages else "",
                1 if counts else 0,
            ],
        )
        return bool(ok)

    async def get_messages(self, run_id: str, refs: list[str]) -> dict[str, str | None]:
        """Bodies of the run's stored messages ``refs`` (``None`` for a ref not stored)."""
        if not refs:
            return {}
        bodies = await self.redis.hmget(self.keys.messages(run_id), refs)
        return dict(zip(refs, bodies, strict=True))

    async def all_messages(self, run_id: str) -> dict[str, str]:
        """The run's whole message store: ref → message JSON (:mod:`oao_common.ledger`)."""
        return dict(await self.redis.hgetall(self.keys.messages(run_id)))

    async def record_usage(
        self,
        worker_id: str,
        job: ClaimedJob,
        call_id: str,
        tokens_in: int,
        tokens_out: int,
        cost_usd: float,
        events: list[list[Any]] | None = None,
    ) -> bool:
        """Add what a failed model call consumed (tokens, USD) to the node's and run's
        usage (``record_usage.lua``, fenced; ``call_id`` makes a re-sent call count
        once); False if the attempt is stale."""
        ok = await self._fenced(
            "record_usage",
            [self.keys.active(worker_id)],
            [
                worker_id,
                job.job,
                job.fence,
                call_id,
                int(tokens_in),
                int(tokens_out),
                repr(float(cost_usd)),
                _json(events or []),
            ],
        )
        return bool(ok)

    async def reserve_budget(
        self,
        run_id: str,
        reservation: str,
        tokens_in: int,
        tokens_out: int,
        cost_usd: float,
        limits: dict[str, float],
        ttl_s: float,
    ) -> tuple[bool, str, float, float]:
        """Reserve (or extend) part of a run's shared budget (``budget.lua``).

        Returns ``(True, "", 0, 0)`` or ``(False, rule, limit, would_reach)``; nothing is
        reserved when refused. Units: tokens and USD; ``ttl_s`` in seconds.
        """
        r = await self.scripts.call(
            "budget",
            [self.keys.run(run_id), self.keys.reservations(run_id)],
            [
                "reserve",
                reservation,
                int(tokens_in),
                int(tokens_out),
                f"{cost_usd:.10f}",
                int(ttl_s * 1000),
                _json(limits),
            ],
        )
        if int(r[0]) == 1:
            return True, "", 0.0, 0.0
        return False, str(r[1]), float(r[2]), float(r[3])

    async def release_budget(self, run_id: str, reservation: str) -> None:
        """Release a reservation whose call failed (no usage recorded)."""
        await self.scripts.call(
            "budget",
            [self.keys.run(run_id), self.keys.reservations(run_id)],
            ["release", reservation, 0, 0, "0", 0, "{}"],
        )

    async def complete(
        self,
        worker_id: str,
        job: ClaimedJob,
        output: Any,
        fields: dict[str, str] | None = None,
        events: list[list[Any]] | None = None,
    ) -> bool:
        """Mark the node SUCCEEDED and release dependents; False if the attempt is stale."""
        ok = await self._fenced(
            "complete",
            [self.keys.active(worker_id)],
            [worker_id, job.job, job.fence, _json(output), _json(fields or {}), _json(events or [])],
        )
        return bool(ok)

    async def append_run_event(
        self, run_id: str, type_: str, data: dict[str, Any], node: str = "", attempt: int = 0
    ) -> None:
        """Append an event written outside the Lua scripts (``ESCALATED``, ``LOOP_BLOCKED``)."""
        now_ms = int(time.time() * 1000)
        await self.redis.xadd(
            self.keys.events(run_id),
            {
                "type": str(type_),
                "node": node,
                "attempt": str(attempt),
                "ts": str(now_ms),
                "data": _json(data),
            },
        )

    async def notify_cancelled(self, run_ids: list[str]) -> None:
        """Tell every worker (pub/sub) to stop the in-flight nodes of these runs now."""
        for rid in run_ids:
            await self.redis.publish(self.keys.control_channel, f"cancel {rid}")

    async def fail(
        self,
        worker_id: str,
        job: ClaimedJob,
        error: dict[str, Any],
        retry_delay_s: float | None,
        fields: dict[str, str] | None = None,
        events: list[list[Any]] | None = None,
    ) -> int:
        """Fail an attempt: retry after ``retry_delay_s`` seconds, or for good when None.

        Returns 2 (retry scheduled), 1 (failed) or 0 (stale attempt, nothing written).
        When a critical node's failure ended its run, the fleet is told to stop the run's
        other in-flight nodes.
        """
        delay_ms = -1 if retry_delay_s is None else int(min(max(0.0, retry_delay_s), MAX_DELAY_S) * 1000)
        r = int(
            await self._fenced(
                "fail",
                [self.keys.active(worker_id), self.keys.delayed],
                [
                    worker_id,
                    job.job,
                    job.fence,
                    _json(error),
                    delay_ms,
                    _json(fields or {}),
                    _json(events or []),
                ],
            )
        )
        if r == 3:
            await self.notify_cancelled([job.run_id])
            return 1
        return r

    # ---------------------------------------------------------------- workers

    async def heartbeat(self, worker_id: str, ttl_s: float, info: dict[str, str] | None = None) -> bool:
        """Refresh the worker's heartbeat and its entry in the worker index, on the
        server's clock (``heartbeat.lua``); ``ttl_s`` in seconds.

        Returns False if the previous heartbeat had already expired: the worker may have
        been reaped and must not trust its leases.
        """
        k = self.keys
        r = await self.scripts.call(
            "heartbeat",
            [k.heartbeat(worker_id), k.workers, k.worker_info(worker_id)],
            [worker_id, int(ttl_s * 1000), _json(info or {})],
        )
        return int(r) == 1

    async def deregister(self, worker_id: str) -> None:
        """Remove a cleanly stopped worker (its active list must be empty)."""
        async with self.redis.pipeline(transaction=True) as p:
            p.delete(
                self.keys.heartbeat(worker_id),
                self.keys.worker_info(worker_id),
                self.keys.claim_memo(worker_id),
            )
            p.zrem(self.keys.workers, worker_id)
            await p.execute()

    async def handback(
        self,
        worker_id: str,
        keep: list[str] | None = None,
        recover: bool = False,
        max_requeues: int = -1,
        only: list[str] | None = None,
    ) -> int:
        """Return the jobs of the worker's active list, except ``keep`` (or, with
        ``only``, just those), to the front of their ready lists (``handback.lua``);
        a job whose node ended (cancelled) just leaves the list. Returns how many were
        requeued.

        ``recover=True`` is for a worker starting under an id that ran before: the jobs
        died with the previous process, so they count toward ``max_requeues`` like a
        reaped worker's (poisoned ones are dead-lettered).
        """
        mode = "release" if only is not None else "recover" if recover else "handback"
        listed = only if only is not None else keep or []
        n, _poisoned, ended = await self.scripts.call(
            "handback", [self.keys.active(worker_id)], [worker_id, _json(listed), mode, max_requeues]
        )
        if ended:
            await self.notify_cancelled([str(x) for x in ended])
        return int(n)

    async def lease_holders(self, jobs: list[ClaimedJob]) -> list[bool]:
        """For each job: does this attempt still hold its node (RUNNING, same fence)?"""
        async with self.redis.pipeline(transaction=False) as p:
            for j in jobs:
                p.hmget(self.keys.node(j.run_id, j.node_id), "status", "fence")
            res = await p.execute()
        return [s == NodeState.RUNNING and f == j.fence for j, (s, f) in zip(jobs, res, strict=True)]

    # ---------------------------------------------------------------- reaper

    async def reap(self, worker_id: str, max_requeues: int) -> ReapResult | None:
        """Requeue the jobs of ``worker_id`` if its heartbeat expired; None if it is alive."""
        k = self.keys
        r = await self.scripts.call(
            "reap",
            [
                k.workers,
                k.heartbeat(worker_id),
                k.active(worker_id),
                k.worker_info(worker_id),
                k.claim_memo(worker_id),
            ],
            [worker_id, max_requeues],
        )
        if r == -1:
            return None
        if r[3]:
            await self.notify_cancelled([str(x) for x in r[3]])
        return ReapResult(worker_id, int(r[0]), int(r[1]), int(r[2]))

    async def stale_workers(self, older_than_s: float) -> list[str]:
        """Workers whose last heartbeat in the index is older than ``older_than_s``
        seconds, judged on the server's clock (the index holds server times)."""
        sec, usec = await self.redis.time()
        cutoff = int(sec) + int(usec) / 1e6 - older_than_s
        return [str(w) for w in await self.redis.zrangebyscore(self.keys.workers, "-inf", cutoff)]

    async def promote_due(self, limit: int = 1000) -> int:
        """Move due retries from the delayed set to their ready lists; returns how many."""
        return int(await self.scripts.call("promote", [self.keys.delayed], [limit]))

    async def cancel(self, run_id: str) -> int:
        """Cancel a run and tell the workers to stop its in-flight nodes now; returns the
        number of nodes cancelled, or -1 if the run is unknown or already finished.
        The workers are told whenever the run ends up CANCELLED (also when this call was
        re-sent after a lost reply and the first one did the work)."""
        n = int(await self.scripts.call("cancel", [self.keys.run(run_id)], [run_id]))
        if n >= 0 or await self.redis.hget(self.keys.run(run_id), "status") == RunState.CANCELLED:
            await self.notify_cancelled([run_id])
        return n

    # ---------------------------------------------------------------- read side

    async def get_run(self, run_id: str) -> dict[str, str]:
        """The run hash (empty dict if unknown)."""
        return dict(await self.redis.hgetall(self.keys.run(run_id)))

    async def run_field(self, run_id: str, name: str) -> str | None:
        """One field of the run hash (``None`` if absent)."""
        value = await self.redis.hget(self.keys.run(run_id), name)
        return None if value is None else str(value)

    async def run_status(self, run_id: str) -> str | None:
        """The run's ``status`` (``None`` if the run is unknown, e.g. pruned)."""
        st = await self.redis.hget(self.keys.run(run_id), "status")
        return None if st is None else str(st)

    async def get_spec_json(self, run_id: str) -> tuple[str | None, str | None, str | None]:
        """``(spec_json, inputs_json, started_at_ms)`` of a run, for a worker's cache.

        ``spec_json`` is the whole spec with the run's inputs (``None`` if the run or its
        stored spec is gone): read from the shared spec key named by the run's
        ``spec_hash`` (one more round trip, skipped when the text is cached), or from the
        run's own ``spec`` field for runs submitted before specs were shared.
        """
        spec, spec_hash, inputs, started = await self.redis.hmget(
            self.keys.run(run_id), "spec", "spec_hash", "inputs", "started_at"
        )
        if spec is None and spec_hash:
            body = SPEC_TEXTS.get(spec_hash)
            if body is None:
                body = await self.redis.hget(self.keys.spec(spec_hash), "json")
                if body is not None:
                    SPEC_TEXTS.put(spec_hash, body)
            spec = None if body is None else join_spec(body, inputs)
        return spec, inputs, started

    async def get_nodes(self, run_id: str, node_ids: list[str]) -> list[dict[str, str]]:
        """The node hashes, in the order of ``node_ids``."""
        async with self.redis.pipeline(transaction=False) as p:
            for nid in node_ids:
                p.hgetall(self.keys.node(run_id, nid))
            res = await p.execute()
        return [{"id": nid, **h} for nid, h in zip(node_ids, res, strict=True)]

    async def get_steps(self, run_id: str) -> dict[str, dict[str, Any]]:
        """The run's whole step ledger: ``"<nid>:<seq>"`` → record."""
        raw = await self.redis.hgetall(self.keys.steps(run_id))
        return {k: json.loads(v) for k, v in raw.items()}

    async def get_node_steps(self, run_id: str, node_id: str, upto: int) -> list[dict[str, Any]]:
        """The ledger records of ``node_id``, steps 1..``upto`` in order (missing ones
        skipped); each record has ``seq`` added. ``upto`` is the node's ``steps_recorded``."""
        if upto <= 0:
            return []
        fields = [f"{node_id}:{seq}" for seq in range(1, upto + 1)]
        raw = await self.redis.hmget(self.keys.steps(run_id), fields)
        return [{"seq": seq, **json.loads(v)} for seq, v in enumerate(raw, start=1) if v is not None]

    async def events(self, run_id: str, after: str = "-", count: int | None = None) -> list[Event]:
        """Events of a run after stream id ``after`` (exclusive unless ``-``)."""
        start = after if after == "-" else f"({after}"
        entries = await self.redis.xrange(self.keys.events(run_id), start, "+", count=count)
        return [Event.from_stream(eid, f) for eid, f in entries]

    async def last_event_id(self, run_id: str) -> str:
        """The id of the run's newest event (``"0-0"`` if it has none): reading after
        it misses nothing that happens from now on."""
        newest = await self.redis.xrevrange(self.keys.events(run_id), "+", "-", count=1)
        return str(newest[0][0]) if newest else "0-0"

    async def next_events(
        self, run_id: str, after: str, block_ms: int, count: int = 1000, with_data: bool = True
    ) -> list[Event]:
        """One ``XREAD BLOCK``: the run's events after stream id ``after`` (at most
        ``count``), waiting up to ``block_ms`` (>= 1) for the first; ``[]`` if none came.
        Without ``with_data`` each event's ``data`` is left empty (not decoded). Redis
        errors go to the caller."""
        res = await self.redis.xread({self.keys.events(run_id): after}, block=max(1, block_ms), count=count)
        entries = [e for _key, es in res or [] for e in es]
        if with_data:
            return [Event.from_stream(eid, f) for eid, f in entries]
        return [
            Event(
                eid, f.get("type", "?"), f.get("node", ""), int(f.get("attempt") or 0), int(f.get("ts") or 0)
            )
            for eid, f in entries
        ]

    async def node_statuses(self, run_id: str, node_ids: list[str], chunk: int = 5000) -> list[str | None]:
        """The ``status`` of each node, in the order of ``node_ids`` (pipelined HGETs)."""
        out: list[str | None] = []
        for i in range(0, len(node_ids), chunk):
            async with self.redis.pipeline(transaction=False) as p:
                for nid in node_ids[i : i + chunk]:
                    p.hget(self.keys.node(run_id, nid), "status")
                out.extend(await p.execute())
        return out

    async def follow_events(
        self, run_id: str, after: str = "0-0", block_ms: int = 1000
    ) -> AsyncIterator[Event]:
        """Yield events as they are appended (``XREAD BLOCK``); runs until cancelled.
        Redis errors (a dropped connection, ``UNBLOCKED`` from a demoted primary) are
        logged and waited out with backoff; the stream resumes after the last event."""
        last = after
        key = self.keys.events(run_id)
        backoff = Backoff(get_logger(component="events", run_id=run_id), "follow_events")
        while True:
            try:
                res = await self.redis.xread({key: last}, block=block_ms, count=500)
                backoff.ok()
            except LOOP_ERRORS as e:
                await backoff.sleep_after(e)
                continue
            for _key, entries in res or []:
                for eid, f in entries:
                    last = eid
                    yield Event.from_stream(eid, f)

    async def recent_runs(self, limit: int = 20) -> list[dict[str, str]]:
        """The newest runs first, each its run hash plus ``id`` (without the spec)."""
        rids = await self.redis.zrevrange(self.keys.runs, 0, max(0, limit - 1))
        fields = [
            "name",
            "status",
            "created_at",
            "started_at",
            "finished_at",
            "nodes_total",
            "nodes_done",
            "nodes_failed",
            "tokens_in",
            "tokens_out",
            "cost_usd",
            "exec_hash",
            "replay_of",
        ]
        async with self.redis.pipeline(transaction=False) as p:
            for rid in rids:
                p.hmget(self.keys.run(rid), fields)
            res = await p.execute()
        return [
            {"id": rid, **{f: v for f, v in zip(fields, vals, strict=True) if v is not None}}
            for rid, vals in zip(rids, res, strict=True)
        ]

    async def workers(self) -> list[dict[str, Any]]:
        """Known workers: id, last heartbeat (epoch s), alive, active jobs, info fields."""
        entries = await self.redis.zrange(self.keys.workers, 0, -1, withscores=True)
        async with self.redis.pipeline(transaction=False) as p:
            for wid, _ in entries:
                p.exists(self.keys.heartbeat(wid))
                p.lrange(self.keys.active(wid), 0, -1)
                p.hgetall(self.keys.worker_info(wid))
            res = await p.execute()
        out = []
        for i, (wid, score) in enumerate(entries):
            alive, active, info = res[3 * i : 3 * i + 3]
            out.append(
                {
                    "id": wid,
                    "last_heartbeat": float(score),
                    "alive": bool(alive),
                    "active": list(active),
                    **info,
                }
            )
        return out

    async def queue_lengths(self, queues: list[str]) -> dict[str, int]:
        async with self.redis.pipeline(transaction=False) as p:
            for q in queues:
                p.llen(self.keys.queue(q))
            res = await p.execute()
        return {q: int(n) for q, n in zip(queues, res, strict=True)}

    async def depths(self, most_lookups: int = 5000) -> list[tuple[str, str, int]]:
        """Jobs outside the ready lists as ``(state, ready list, jobs)``: state
        ``delayed``, ``active`` or ``parked``, the ready list of their node (``default``,
        ``default:high``; ``?`` past ``most_lookups`` node reads). One ``depths.lua``
        call, O(workers + active jobs + runs with parked jobs + ``most_lookups``)."""
        k = self.keys
        r = await self.scripts.call("depths", [k.delayed, k.workers, k.parked_runs], [most_lookups])
        return [(str(r[i]), str(r[i + 1]), int(r[i + 2])) for i in range(0, len(r), 3)]

    async def all_queue_lengths(self) -> dict[str, int]:
        """Length of every ready list under the prefix (uses SCAN)."""
        head = self.keys.queue("")
        names = [k[len(head) :] async for k in self.redis.scan_iter(match=head + "*", count=500)]
        return await self.queue_lengths(names) if names else {}

    # ---------------------------------------------------------------- retention

    async def prune_runs(
        self, cutoff_ms: int, most: int = 100, run_ids: list[str] | None = None, max_keys: int = 0
    ) -> PruneResult:
        """Delete up to ``most`` finished runs that ended at or before ``cutoff_ms`` (ms
        since the epoch, server time) with every key they own (``prune.lua``): the oldest
        of the finished-runs index, or only those of ``run_ids``. A run that is not
        terminal is never deleted. ``max_keys`` > 0 stops taking runs once that many keys
        were deleted (bounds the time one call holds Redis)."""
        runs, keys, ids = await self.scripts.call(
            "prune",
            [self.keys.runs, self.keys.done],
            [int(cutoff_ms), max(1, most), _json(run_ids) if run_ids else "", int(max_keys)],
        )
        return PruneResult(int(runs), int(keys), [str(x) for x in ids])

    async def server_time_ms(self) -> int:
        """The Redis server's clock in ms since the epoch (the clock of ``finished_at``)."""
        sec, usec = await self.redis.time()
        return int(sec) * 1000 + int(usec) // 1000

    async def run_is_terminal(self, run_id: str) -> bool:
        st = await self.redis.hget(self.keys.run(run_id), "status")
        return st is not None and RunState(st).terminal


__all__ = ["Broker", "ClaimedJob", "PruneResult", "ReapResult", "job_id", "new_run_id"]
