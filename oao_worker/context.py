"""The agent context: the only way an agent reaches the world.

``await ctx.llm(...)`` and ``await ctx.tool(name, **args)`` are *steps*. Each step

1. gets the next sequence number of the node (1, 2, ...);
2. is looked up in the node's step ledger: a recorded step with the same request hash
   is served from the record (``STEP_REPLAYED``) and not executed again; a different
   hash raises :class:`~oao_common.errors.NonDeterminismError` (docs/guarantees.md, promises 3 and 4);
3. otherwise passes the attempt's middleware chain (``before_step``; each try of its
   model or tool call ``before_call`` / ``after_call``, ``on_error`` deciding in-step
   retries; ``on_chunk`` while a reply streams), executes, and is recorded atomically
   with its events by a fenced script (``record_step.lua``), then ``after_step``. A
   rejected record means another attempt owns the node:
   :class:`~oao_common.errors.StaleAttemptError`.

Governance itself (limits, budgets, prices, retries, rate limits, circuit breakers,
metrics) lives in the middleware (``oao_worker/governance.py``, ``middleware.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from oao_common.broker import Broker, ClaimedJob
from oao_common.errors import (
    NonDeterminismError,
    OAOError,
    PermanentError,
    StaleAttemptError,
    UncertainSideEffect,
)
from oao_common.events import EventType
from oao_common.hashing import canonical_json, sha256_hex
from oao_common.ledger import (
    VOLATILE_KINDS,
    address_request,
    message_refs,
    request_diff,
    resolve_request,
)
from oao_common.retry import LOOP_ERRORS
from oao_common.spec import Spec

from .budget import RESERVE_CHUNK
from .deltas import DeltaPublisher, DeltaStream
from .governance import Governor, NodeAttempt, StepInfo
from .lifecycle import AgentState, Lifecycle
from .providers import ModelReply, ModelRequest, Provider
from .providers.base import estimate_message_tokens
from .tools import RunSync, Tool, ToolCallInfo


def tool_idempotency_key(run_id: str, node_id: str, tool: str, args: dict[str, Any], seq: int) -> str:
    """sha256 of run id, node id, tool name, canonical arguments and the step's sequence
    number (so two identical calls in one node stay distinct, and a replay of the same
    step gets the same key)."""
    return sha256_hex({"run": run_id, "node": node_id, "tool": tool, "args": args, "seq": seq})


class AgentContext:
    """Per-attempt context handed to agents.

    Attributes: ``run_id``, ``node_id``, ``attempt``, ``task`` (rendered), ``inputs``
    (the run's inputs), ``deps`` (dependency id → output), ``lifecycle``,
    ``idempotency_key`` (of the current or last tool call), ``governor`` (the
    attempt's middleware chain and usage), ``node`` (the attempt as middleware see it).
    """

    def __init__(
        self,
        *,
        broker: Broker,
        worker_id: str,
        job: ClaimedJob,
        spec: Spec,
        inputs: dict[str, Any],
        task: str,
        governor: Governor,
        providers: dict[str, Provider],
        tools: dict[str, Tool],
        default_model: str | None = None,
        run_sync: RunSync | None = None,
        strict_replay: bool = False,
        deltas: DeltaPublisher | None = None,
        node: NodeAttempt | None = None,
    ) -> None:
        self.broker = broker
        self.worker_id = worker_id
        self.job = job
        self.spec = spec
        self.run_id = job.run_id
        self.node_id = job.node_id
        self.attempt = job.attempt
        self.inputs = inputs
        self.deps = job.dep_outputs
        self.task = task
        self.governor = governor
        if node is None:
            node = governor.node or NodeAttempt(job, worker_id, time.monotonic(), spec=spec)
        if node.governor is None:
            node.governor = governor
        governor.node = node
        #: The attempt as middleware see it; its events are this context's.
        self.node = node
        self.providers = providers
        self.tools = tools
        self.default_model = default_model
        #: ``await ctx.run_sync(fn, *args)``: run blocking code in the worker's bounded
        #: executor (its time counts from when its thread starts; see executor.py).
        self.run_sync: RunSync = run_sync or asyncio.to_thread
        #: Publishes streamed model text live (``oao_worker/deltas.py``); None: not at all.
        self.deltas = deltas
        self.idempotency_key: str | None = None
        #: A strict replay (docs/replay.md) serves every step from the record and
        #: executes nothing: a step with no record is a NonDeterminismError.
        self.strict_replay = strict_replay
        # messages known to be in the run's message store: not sent again
        self._stored_refs: set[str] = {
            ref
            for rec in job.ledger
            if rec and isinstance(rec.get("request"), dict)
            for ref in rec["request"].get("messages") or []
            if isinstance(ref, str)
        }
        # (seq, message refs) of the node's last model step: the next one stores only
        # the messages it adds (oao_common.ledger)
        self._last_messages: tuple[int, list[str]] | None = None
        self.replayed_steps = 0
        self.executed_steps = 0
        self._seq = 0
        self._model_calls: dict[str, int] = {}
        self.lifecycle = Lifecycle(self._on_state)

    # ------------------------------------------------------------------ events

    def _on_state(self, state: AgentState, prev: AgentState | None) -> None:
        self.emit(EventType.STATE_ENTER, {"state": str(state), "from": str(prev or "")})

    def emit(self, type_: EventType, data: dict[str, Any] | None = None) -> None:
        """Buffer an event; it is written with the node's next fenced write (middleware
        see it at once, ``on_event``)."""
        self.node.emit(type_, data)

    def drain_events(self) -> list[list[Any]]:
        return self.node.drain_events()

    def template_vars(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "nodes": {k: {"output": v} for k, v in self.deps.items()},
            "task": self.task,
            "node_id": self.node_id,
        }

    # ------------------------------------------------------------------ steps

    async def _step(
        self,
        kind: str,
        name: str,
        request: dict[str, Any],
        execute: Callable[[StepInfo], Awaitable[tuple[Any, int, int, float]]],
        input_tokens: int = 0,
        extra: dict[str, Any] | None = None,
        max_tokens: int | None = None,
        repeatable: bool = False,
    ) -> Any:
        """Run one step through ledger, middleware, execution and recording.

        ``execute(step)`` returns ``(result_json_value, tokens_in, tokens_out, cost_usd)``.
        ``request`` identifies the step (its sha256 is checked on replay) and is stored
        in the record, model messages by reference (:mod:`oao_common.ledger`). Steps of
        :data:`~oao_common.ledger.VOLATILE_KINDS` are not counted (``step.governed``).
        ``max_tokens``: a model call's output bound; ``repeatable``: a failed try may be
        repeated inside the step (:class:`~oao_worker.governance.StepInfo`).
        """
        governed = kind not in VOLATILE_KINDS
        self._seq += 1
        seq = self._seq
        req_hash = sha256_hex(request)
        step = StepInfo(
            seq=seq,
            kind=kind,
            name=name,
            input_tokens=input_tokens,
            node=self.node,
            request=request,
            max_tokens=max_tokens,
            repeatable=repeatable,
            reserved_out=(max_tokens or RESERVE_CHUNK) if kind == "llm" else 0,
        )
        ledger = self.job.ledger
        rec = ledger[seq - 1] if seq <= len(ledger) else None
        if rec is not None:
            if rec.get("request_hash") != req_hash:
                raise await self._divergence(seq, kind, name, rec, request, req_hash)
            u = rec.get("usage") or {}
            step.tokens_in, step.tokens_out = int(u.get("in", 0)), int(u.get("out", 0))
            step.cost_usd = float(u.get("cost_usd", 0.0))
            if governed:
                self.governor.account(kind, step.tokens_in, step.tokens_out, step.cost_usd)
            if kind == "llm":
                self._last_messages = (seq, address_request(request)[2])
            self.replayed_steps += 1
            step.replayed, step.result = True, rec.get("result")
            step.duration_ms = int(rec.get("duration_ms") or 0)
            await self.governor.after_step(step)
            self.emit(EventType.STEP_REPLAYED, {"seq": seq, "kind": kind, "name": name})
            return step.result
        if self.strict_replay:
            now = canonical_json(request)
            raise NonDeterminismError(
                f"{self.node_id}#{seq} ({kind} {name})",
                "",
                req_hash,
                [f"recorded: nothing -> now: {now if len(now) <= 200 else now[:199] + '…'}"],
            )

        await self.governor.before_step(step)
        try:
            result, tin, tout, cost, duration_ms = await self._execute_and_record(
                step, req_hash, request, execute, extra
            )
        except BaseException as e:
            step.error = e
            await self.governor.after_step(step)
            raise
        step.tokens_in, step.tokens_out, step.cost_usd = tin, tout, cost
        step.duration_ms, step.result = duration_ms, result
        await self.governor.after_step(step)
        return result

    async def _execute_and_record(
        self,
        step: StepInfo,
        req_hash: str,
        request: dict[str, Any],
        execute: Callable[[StepInfo], Awaitable[tuple[Any, int, int, float]]],
        extra: dict[str, Any] | None,
    ) -> tuple[Any, int, int, float, int]:
        """Execute a step that passed ``before_step`` and record it (fenced);
        ``(result, tokens_in, tokens_out, cost_usd, duration_ms)``."""
        seq, kind, name = step.seq, step.kind, step.name
        governed = step.governed
        if kind == "tool":
            await self._begin_tool_step(seq, name, req_hash)
        elif (
            governed
            and self.node.events
            and not await self.broker.append_events(self.worker_id, self.job, self.drain_events())
        ):
            # Before a live model call or agent invocation (seconds to minutes, and money)
            # the log shows what happened so far, and a fenced-off attempt stops here.
            raise StaleAttemptError(f"{self.run_id}/{self.node_id} attempt {self.attempt} is stale")
        started = time.monotonic()
        result, tin, tout, cost = await execute(step)
        duration_ms = int((time.monotonic() - started) * 1000)
        if governed:
            self.governor.account(kind, tin, tout, cost)
        self.executed_steps += 1
        stored_request, bodies, refs = address_request(request, self._last_messages)
        new_bodies = {ref: b for ref, b in bodies.items() if ref not in self._stored_refs}
        record = {
            "kind": kind,
            "name": name,
            "request_hash": req_hash,
            "request": stored_request,
            "result": result,
            "usage": {"in": tin, "out": tout, "cost_usd": cost},
            "attempt": self.attempt,
            "duration_ms": duration_ms,
            **(extra or {}),
        }
        self.emit(
            EventType.STEP_COMPLETED,
            {
                "seq": seq,
                "kind": kind,
                "name": name,
                "tokens_in": tin,
                "tokens_out": tout,
                "duration_ms": duration_ms,
            },
        )
        ok = await self.broker.record_step(
            self.worker_id,
            self.job,
            seq,
            record,
            tin,
            tout,
            cost,
            is_tool=kind == "tool",
            events=self.drain_events(),
            reservation=step.reservation,
            messages=new_bodies,
            counts=governed,
        )
        if not ok:
            raise StaleAttemptError(f"{self.run_id}/{self.node_id} attempt {self.attempt} is stale")
        self._stored_refs.update(new_bodies)
        if kind == "llm":
            self._last_messages = (seq, refs)
        return result, tin, tout, cost, duration_ms

    async def _divergence(
        self, seq: int, kind: str, name: str, rec: dict[str, Any], request: dict[str, Any], req_hash: str
    ) -> NonDeterminismError:
        """The error for a replayed step whose request differs from the record, with the
        field-level differences when the record holds its request."""
        stored = rec.get("request")
        diff = None
        if isinstance(stored, dict):
            records = dict(enumerate(self.job.ledger, start=1))
            refs = message_refs(stored, records) or []
            bodies: dict[str, str | None] = {}
            with contextlib.suppress(*LOOP_ERRORS):  # the other differences still show
                bodies = await self.broker.get_messages(self.run_id, refs)
            diff = request_diff(resolve_request(stored, bodies, records), request)
        return NonDeterminismError(
            f"{self.node_id}#{seq} ({kind} {name})", str(rec.get("request_hash")), req_hash, diff
        )

    def check_replay_complete(self) -> None:
        """In a strict replay, raise :class:`NonDeterminismError` if the node ended
        before issuing every step of its record."""
        if not self.strict_replay:
            return
        ledger = self.job.ledger
        rest = [(i, r) for i, r in enumerate(ledger[self._seq :], start=self._seq + 1) if r]
        if rest:
            seq, rec = rest[0]
            raise NonDeterminismError(
                f"{self.node_id}#{seq} ({rec.get('kind')} {rec.get('name')})",
                str(rec.get("request_hash")),
                "",
            )

    # ------------------------------------------------------------------ volatile values

    async def _volatile(self, kind: str, name: str, value: Callable[[], Any]) -> Any:
        async def execute(_step: StepInfo) -> tuple[Any, int, int, float]:
            return value(), 0, 0, 0.0

        return await self._step(kind, name, {"kind": kind, "name": name}, execute)

    async def now(self) -> float:
        """The wall clock (seconds since the epoch, float) as a recorded step: a replay
        returns the recorded time. Agent code must use this, not ``time.time()``
        (docs/replay.md). Not governed and not counted as a step."""
        return float(await self._volatile("clock", "now", time.time))

    async def random(self) -> float:
        """A random float in [0, 1) as a recorded step (replayed like :meth:`now`)."""
        return float(await self._volatile("random", "random", random.random))

    async def uuid(self) -> str:
        """A random UUID (version 4, canonical text) as a recorded step (replayed like
        :meth:`now`)."""
        return str(await self._volatile("uuid", "uuid4", lambda: str(uuid.uuid4())))

    async def _begin_tool_step(self, seq: int, name: str, req_hash: str) -> None:
        """Guard a side effect: refuse to repeat an unrecorded non-idempotent call, and
        write a fenced "started" marker before executing (docs/guarantees.md, ADR 003)."""
        tool = self.tools.get(name)
        idempotent = bool(tool and tool.spec.idempotent)
        prior = self.job.started.get(seq)
        if prior is not None and not idempotent:
            raise UncertainSideEffect(
                f"tool {name!r} (step {seq}) was started by attempt {prior.get('attempt')} "
                "which died before recording a result; the side effect may have happened, so "
                "it is not run again (declare the tool idempotent: true to allow that)"
            )
        self.emit(
            EventType.STEP_STARTED,
            {
                "seq": seq,
                "kind": "tool",
                "name": name,
                "retry_of_attempt": prior.get("attempt") if prior else None,
            },
        )
        marker = {
            "kind": "tool",
            "name": name,
            "request_hash": req_hash,
            "attempt": self.attempt,
            "idempotent": idempotent,
        }
        if not await self.broker.begin_step(self.worker_id, self.job, seq, marker, self.drain_events()):
            raise StaleAttemptError(f"{self.run_id}/{self.node_id} attempt {self.attempt} is stale")

    async def llm(
        self,
        messages: list[dict[str, Any]] | str,
        *,
        model: str | None = None,
        tools: list[str] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> ModelReply:
        """One model call (a step). ``messages`` is an OpenAI message list or a user prompt.

        ``model`` names a model of the spec (default: the agent's); ``tools`` names spec
        tools offered to the model. Raises ``PolicyViolation`` when a budget is crossed,
        mid-stream included; ``TransientError`` / ``PermanentError`` from the provider.
        """
        name = model or self.default_model
        if name is None or name not in self.providers:
            raise PermanentError(f"ctx.llm: unknown model {name!r}")
        msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
        schemas = [self.tools[t].schema() for t in tools or [] if t in self.tools]
        k = self._model_calls.get(name, 0)
        self._model_calls[name] = k + 1
        request = ModelRequest(
            model=name,
            messages=msgs,
            tools=schemas,
            max_tokens=max_tokens,
            temperature=temperature,
            context={**self.template_vars(), "call_index": k},
        )
        provider = self.providers[name]

        async def execute(step: StepInfo) -> tuple[Any, int, int, float]:
            price = step.price  # set by the costs middleware in before_step
            live: DeltaStream | None = None  # this try's text, published as it comes

            async def on_chunk(delta: str, out: int) -> None:
                # policies, then the run budget's extension: a stop raises before the text goes out
                await self.governor.on_chunk(step, out)
                if live is not None:
                    live.add(delta)

            async def call_model() -> ModelReply:
                """One try of the call; its streamed text also goes out live (not stored)."""
                nonlocal live
                if self.deltas is None:
                    return await provider.complete(request, on_chunk)
                live = stream = self.deltas.stream(self.run_id, self.node_id, self.attempt, step.seq)
                try:
                    reply = await provider.complete(request, on_chunk)
                finally:
                    stream.close()
                await stream.flushed()  # subscribers get the text before the step's record
                return reply

            reply = await self.governor.call(
                step,
                call_model,
                tokens=lambda: step.input_tokens + step.reserved_out,
                used_tokens=lambda r: r.usage.total,
            )
            u = reply.usage
            return (
                reply.to_dict(),
                u.input_tokens,
                u.output_tokens,
                price.cost(u.input_tokens, u.output_tokens),
            )

        result = await self._step(
            "llm",
            name,
            {"kind": "llm", **request.hash_view()},
            execute,
            input_tokens=estimate_message_tokens(msgs),
            max_tokens=max_tokens,
            repeatable=True,
        )
        return ModelReply.from_dict(result)

    async def tool(self, name: str, /, **args: Any) -> Any:
        """One tool call (a step): ``await ctx.tool("notes.search", query="x")``.

        ``name`` is positional-only, so a tool may have an argument called ``name``.

        The result must be JSON-serializable (others are stored as ``str``). Raises
        ``PolicyViolation`` for a tool outside the allow-list, ``PermanentError`` for an
        unknown tool or bad arguments, and whatever the tool raises.
        """
        return (await self._tool(name, args, capture=False))["value"]

    async def try_tool(self, name: str, args: dict[str, Any]) -> tuple[bool, Any]:
        """Like :meth:`tool`, but an ordinary exception from the tool is recorded as the
        step's result and returned as ``(False, "TypeName: message")``, so a replay sees
        the same failure. OAO errors (policy, bad arguments, stale attempt) still raise."""
        out = await self._tool(name, args, capture=True)
        return (True, out["value"]) if out["ok"] else (False, out["error"])

    async def _tool(self, name: str, args: dict[str, Any], capture: bool) -> dict[str, Any]:
        canon = json.loads(canonical_json(args))
        key = tool_idempotency_key(self.run_id, self.node_id, name, canon, self._seq + 1)
        self.idempotency_key = key
        known = self.tools.get(name)

        async def execute(step: StepInfo) -> tuple[Any, int, int, float]:
            if name not in self.tools:
                raise PermanentError(f"unknown tool {name!r} (known: {', '.join(sorted(self.tools))})")
            try:
                info = ToolCallInfo(key, self.run_id, self.node_id, step.seq, self.attempt)
                tool = self.tools[name]
                value = await self.governor.call(step, lambda: tool.call(args, info, self.run_sync))
            except OAOError:
                raise
            except Exception as e:
                if not capture:
                    raise
                return {"ok": False, "error": f"{type(e).__name__}: {e}"}, 0, 0, 0.0
            return {"ok": True, "value": json.loads(canonical_json(value))}, 0, 0, 0.0

        result: dict[str, Any] = await self._step(
            "tool",
            name,
            {"kind": "tool", "name": name, "args": canon},
            execute,
            extra={"idempotency_key": key},
            # an idempotent tool may be called again inside the step; others could repeat an effect
            repeatable=known is not None and known.spec.idempotent,
        )
        return result

    async def invoke(self, name: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Run a whole non-step-aware agent call as one recorded step (kind ``invoke``)."""

        async def execute(step: StepInfo) -> tuple[Any, int, int, float]:
            value = await fn()
            return json.loads(canonical_json(value)), 0, 0, 0.0

        return await self._step("invoke", name, {"kind": "invoke", "name": name, "task": self.task}, execute)

    def node_fields(self) -> dict[str, str]:
        """Figures written to the node hash at the end of the attempt."""
        u = self.governor.usage
        return {
            "steps": str(u.steps),
            "replayed_steps": str(self.replayed_steps),
            "executed_steps": str(self.executed_steps),
            "state_history": ",".join(self.lifecycle.history),
            "tokens_total": str(u.tokens),
        }
