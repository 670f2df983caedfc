"""The agent context: the only way an agent reaches the world.

``await ctx.llm(...)`` and ``await ctx.tool(name, **args)`` are *steps*. Each step

1. gets the next sequence number of the node (1, 2, ...);
2. is looked up in the node's step ledger: a recorded step with the same request hash
   is served from the record (``STEP_REPLAYED``) and not executed again; a different
   hash raises :class:`~oao_common.errors.NonDeterminismError` (docs/guarantees.md, promises 3 and 4);
3. otherwise passes the governance chain, executes, and is recorded atomically with
   its events by a fenced script (``record_step.lua``). A rejected record means
   another attempt owns the node: :class:`~oao_common.errors.StaleAttemptError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from oao_common import metrics, tracing
from oao_common.broker import Broker, ClaimedJob
from oao_common.circuit import CircuitOpenError
from oao_common.errors import (
    NonDeterminismError,
    OAOError,
    PermanentError,
    StaleAttemptError,
    TransientError,
    UncertainSideEffect,
)
from oao_common.events import EventType, pending_event
from oao_common.hashing import canonical_json, sha256_hex
from oao_common.ledger import (
    VOLATILE_KINDS,
    address_request,
    message_refs,
    request_diff,
    resolve_request,
)
from oao_common.policy import RetrySpec, RunPolicySpec, backoff_delay_s
from oao_common.pricing import FREE, Price
from oao_common.ratelimit import RateLimitTimeout
from oao_common.retry import LOOP_ERRORS
from oao_common.spec import Spec

from . import spans
from .budget import RESERVE_CHUNK, RunBudget
from .deltas import DeltaPublisher, DeltaStream
from .governance import Governor, StepInfo
from .guards import CallGuards, Guard
from .lifecycle import AgentState, Lifecycle
from .providers import ModelReply, ModelRequest, Provider
from .providers.base import estimate_message_tokens
from .tools import RunSync, Tool, ToolCallInfo

T = TypeVar("T")


def _transient(e: BaseException) -> bool:
    """Retried inside the step: transient provider errors, but not a fleet guard's
    refusal (open circuit, rate-limit wait exhausted): those fail fast and are retried
    by the node, through the delayed set, after their ``retry_after_s``."""
    return isinstance(e, TransientError) and not isinstance(e, (CircuitOpenError, RateLimitTimeout))


def _transient_tool_error(e: BaseException) -> bool:
    return _transient(e) or isinstance(e, (ConnectionError, TimeoutError))


def tool_idempotency_key(run_id: str, node_id: str, tool: str, args: dict[str, Any], seq: int) -> str:
    """sha256 of run id, node id, tool name, canonical arguments and the step's sequence
    number (so two identical calls in one node stay distinct, and a replay of the same
    step gets the same key)."""
    return sha256_hex({"run": run_id, "node": node_id, "tool": tool, "args": args, "seq": seq})


class AgentContext:
    """Per-attempt context handed to agents.

    Attributes: ``run_id``, ``node_id``, ``attempt``, ``task`` (rendered), ``inputs``
    (the run's inputs), ``deps`` (dependency id → output), ``lifecycle``,
    ``idempotency_key`` (of the current or last tool call).
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
        prices: dict[str, Price] | None = None,
        budget: RunBudget | None = None,
        retry: RetrySpec | None = None,
        call_guards: CallGuards | None = None,
        guards: dict[str, Guard] | None = None,
        run_sync: RunSync | None = None,
        strict_replay: bool = False,
        deltas: DeltaPublisher | None = None,
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
        self.providers = providers
        self.tools = tools
        self.default_model = default_model
        self.prices = prices or {}
        self.retry = retry or RetrySpec(max_retries=0)
        self.call_guards = call_guards
        self.guards = guards or {}
        self.budget = budget or RunBudget(broker, job.run_id, RunPolicySpec(), 0)
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
        self._events: list[list[Any]] = []
        self.lifecycle = Lifecycle(self._on_state)

    # ------------------------------------------------------------------ events

    def _on_state(self, state: AgentState, prev: AgentState | None) -> None:
        self.emit(EventType.STATE_ENTER, {"state": str(state), "from": str(prev or "")})

    def emit(self, type_: EventType, data: dict[str, Any] | None = None) -> None:
        """Buffer an event; it is written with the node's next fenced write (and, when
        tracing, some become events of the current span: ``spans.SPAN_EVENTS``)."""
        self._events.append(pending_event(type_, data))
        if tracing.ENABLED:
            spans.on_event(type_, data)

    def drain_events(self) -> list[list[Any]]:
        out, self._events = self._events, []
        return out

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
        price: Price = FREE,
        reservation: str | None = None,
    ) -> Any:
        """Run one step through ledger, governance, execution and recording.

        ``execute(step)`` returns ``(result_json_value, tokens_in, tokens_out, cost_usd)``.
        ``request`` identifies the step (its sha256 is checked on replay) and is stored
        in the record, model messages by reference (:mod:`oao_common.ledger`). Steps of
        :data:`~oao_common.ledger.VOLATILE_KINDS` are not governed nor counted.
        """
        governed = kind not in VOLATILE_KINDS
        self._seq += 1
        seq = self._seq
        req_hash = sha256_hex(request)
        ledger = self.job.ledger
        rec = ledger[seq - 1] if seq <= len(ledger) else None
        if rec is not None:
            if rec.get("request_hash") != req_hash:
                raise await self._divergence(seq, kind, name, rec, request, req_hash)
            if governed:
                u = rec.get("usage") or {}
                self.governor.account(
                    kind, int(u.get("in", 0)), int(u.get("out", 0)), float(u.get("cost_usd", 0.0))
                )
            if kind == "llm":
                self._last_messages = (seq, address_request(request)[2])
            self.replayed_steps += 1
            spans.replayed_step(seq, kind, name)
            metrics.STEPS.labels(kind, "replayed").inc()
            self.emit(EventType.STEP_REPLAYED, {"seq": seq, "kind": kind, "name": name})
            return rec.get("result")
        if self.strict_replay:
            now = canonical_json(request)
            raise NonDeterminismError(
                f"{self.node_id}#{seq} ({kind} {name})",
                "",
                req_hash,
                [f"recorded: nothing -> now: {now if len(now) <= 200 else now[:199] + '…'}"],
            )

        args = (
            seq,
            kind,
            name,
            request,
            req_hash,
            execute,
            input_tokens,
            extra,
            price,
            reservation,
            governed,
        )
        if not tracing.ENABLED:
            return await self._execute_step(*args)
        with spans.step_span(seq, kind, name):
            return await self._execute_step(*args)

    async def _execute_step(
        self,
        seq: int,
        kind: str,
        name: str,
        request: dict[str, Any],
        req_hash: str,
        execute: Callable[[StepInfo], Awaitable[tuple[Any, int, int, float]]],
        input_tokens: int,
        extra: dict[str, Any] | None,
        price: Price,
        reservation: str | None,
        governed: bool,
    ) -> Any:
        """Govern, execute and record a step that has no record (see :meth:`_step`)."""
        step = StepInfo(seq=seq, kind=kind, name=name, input_tokens=input_tokens, price=price)
        if governed:
            self.governor.before_step(step)
        if kind == "tool":
            await self._begin_tool_step(seq, name, req_hash)
        elif (
            governed
            and self._events
            and not await self.broker.append_events(self.worker_id, self.job, self.drain_events())
        ):
            # Before a live model call or agent invocation (seconds to minutes, and money)
            # the log shows what happened so far, and a fenced-off attempt stops here.
            raise StaleAttemptError(f"{self.run_id}/{self.node_id} attempt {self.attempt} is stale")
        started = time.monotonic()
        result, tin, tout, cost = await execute(step)
        took = time.monotonic() - started
        duration_ms = int(took * 1000)
        metrics.STEP_SECONDS.labels(kind).observe(took)
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
            reservation=reservation,
            messages=new_bodies,
            counts=governed,
        )
        if not ok:
            raise StaleAttemptError(f"{self.run_id}/{self.node_id} attempt {self.attempt} is stale")
        self._stored_refs.update(new_bodies)
        if kind == "llm":
            self._last_messages = (seq, refs)
        metrics.STEPS.labels(kind, "executed").inc()
        if kind == "llm":
            metrics.TOKENS.labels(name, "input").inc(tin)
            metrics.TOKENS.labels(name, "output").inc(tout)
            if cost:
                metrics.COST_USD.labels(name).inc(cost)
        if governed:
            self.governor.after_step(step)
        return result

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

    async def _guarded(
        self,
        guard_key: str,
        tokens: int,
        fn: Callable[[], Awaitable[T]],
        used_tokens: Callable[[T], int],
    ) -> T:
        """Run one call under its fleet-wide rate limiter and circuit breaker, if any."""
        guard = self.guards.get(guard_key)
        if self.call_guards is None or guard is None:
            return await fn()

        if tracing.ENABLED:
            try:
                return await self.call_guards.call(guard, tokens, fn, used_tokens, self._on_wait(guard.key))
            except CircuitOpenError as e:
                tracing.add_event(
                    "oao.circuit.rejected",
                    {
                        "oao.circuit.key": e.key,
                        "oao.circuit.state": str(e.state),
                        "oao.retry_after_s": e.retry_after_s,
                    },
                )
                raise
        return await self.call_guards.call(guard, tokens, fn, used_tokens, self._on_wait(guard.key))

    def _on_wait(self, key: str) -> Callable[[float], None]:
        def on_wait(wait_s: float) -> None:
            metrics.RATE_LIMIT_WAITS.labels(key).inc()
            metrics.RATE_LIMIT_WAIT_SECONDS.labels(key).inc(wait_s)
            self.emit(EventType.RATE_LIMIT_WAIT, {"key": key, "wait_s": round(wait_s, 3)})

        return on_wait

    async def _retrying(
        self,
        step: StepInfo,
        call: Callable[[], Awaitable[Any]],
        retriable: Callable[[BaseException], bool],
    ) -> Any:
        """Run ``call`` and retry it inside the step while ``retriable(error)``, up to the
        node's ``max_retries`` times, with the node's backoff and jitter (and at least a
        server's ``Retry-After``). Each retry is a ``STEP_RETRIED`` event."""
        n = 0
        while True:
            try:
                return await call()
            except Exception as e:
                if n >= (self.retry.max_retries or 0) or not retriable(e):
                    raise
                n += 1
                metrics.RETRIES.labels("step").inc()
                delay = backoff_delay_s(self.retry, n)
                hint = getattr(e, "retry_after_s", None)
                if hint:
                    delay = max(delay, float(hint))
                self.emit(
                    EventType.STEP_RETRIED,
                    {
                        "seq": step.seq,
                        "kind": step.kind,
                        "name": step.name,
                        "retry": n,
                        "delay_ms": int(delay * 1000),
                        "error": f"{type(e).__name__}: {e}",
                    },
                )
                await asyncio.sleep(delay)

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
        price = self.prices.get(name, FREE)
        budget = self.budget
        reservation = f"{self.node_id}#{self.attempt}#{self._seq + 1}" if budget.enabled else None

        async def execute(step: StepInfo) -> tuple[Any, int, int, float]:
            reserved_out = max_tokens or RESERVE_CHUNK
            if reservation:
                await budget.reserve(
                    reservation, step.input_tokens, reserved_out, price.cost(step.input_tokens, reserved_out)
                )

            live: DeltaStream | None = None  # this try's text, published as it comes

            async def on_chunk(delta: str, out: int) -> None:
                nonlocal reserved_out
                self.governor.on_chunk(step, out)  # a budget stop raises before the text goes out
                while reservation and out > reserved_out:  # the stream outgrew its reservation
                    await budget.reserve(reservation, 0, RESERVE_CHUNK, price.cost(0, RESERVE_CHUNK))
                    reserved_out += RESERVE_CHUNK
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

            mspec = self.spec.models.get(name)
            with spans.llm_span(
                name,
                mspec.provider if mspec is not None else "",
                str(getattr(mspec, "model", name)),
                max_tokens,
                temperature,
                msgs,
            ) as span:
                try:
                    reply = await self._retrying(
                        step,
                        lambda: self._guarded(
                            f"model:{name}",
                            step.input_tokens + reserved_out,
                            call_model,
                            lambda r: r.usage.total,
                        ),
                        _transient,
                    )
                except BaseException:
                    if reservation:
                        await budget.release(reservation)
                    raise
                u = reply.usage
                cost = price.cost(u.input_tokens, u.output_tokens)
                out = reply.to_dict()
                spans.llm_reply(span, out, cost)
            return out, u.input_tokens, u.output_tokens, cost

        result = await self._step(
            "llm",
            name,
            {"kind": "llm", **request.hash_view()},
            execute,
            input_tokens=estimate_message_tokens(msgs),
            price=price,
            reservation=reservation,
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

        async def execute(step: StepInfo) -> tuple[Any, int, int, float]:
            if name not in self.tools:
                raise PermanentError(f"unknown tool {name!r} (known: {', '.join(sorted(self.tools))})")
            tool = self.tools[name]
            with spans.tool_span(name, key, tool.spec.idempotent, canon) as span:
                try:
                    info = ToolCallInfo(key, self.run_id, self.node_id, step.seq, self.attempt)
                    value = await self._retrying(
                        step,
                        lambda: self._guarded(
                            f"tool:{name}", 0, lambda: tool.call(args, info, self.run_sync), lambda _: 0
                        ),
                        # an idempotent tool may be called again; others could repeat an effect
                        lambda e: tool.spec.idempotent and _transient_tool_error(e),
                    )
                except OAOError:
                    metrics.TOOL_CALLS.labels(name, "error").inc()
                    raise
                except Exception as e:
                    metrics.TOOL_CALLS.labels(name, "error").inc()
                    if not capture:
                        raise
                    error = f"{type(e).__name__}: {e}"
                    spans.tool_result(span, False, error)
                    return {"ok": False, "error": error}, 0, 0, 0.0
                metrics.TOOL_CALLS.labels(name, "ok").inc()
                value = json.loads(canonical_json(value))
                spans.tool_result(span, True, value)
            return {"ok": True, "value": value}, 0, 0, 0.0

        result: dict[str, Any] = await self._step(
            "tool",
            name,
            {"kind": "tool", "name": name, "args": canon},
            execute,
            extra={"idempotency_key": key},
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
