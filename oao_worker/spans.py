"""The tracing middleware: spans of a node attempt, ``oao.node`` → ``oao.step`` →
``oao.llm`` / ``oao.tool`` (``oao_common/tracing.py`` sets tracing up and holds the
run-level parts).

:class:`Tracing` is a :class:`~oao_worker.governance.StepMiddleware` placed among the
chain's observers, right after ``Metrics`` (``oao_worker/middleware.py`` ``compose``),
so it sees every attempt, step and try of a call whole: the guards (rate limits,
circuit breakers) run inside its ``oao.llm`` / ``oao.tool`` spans, and their waits and
refusals become events of those spans. The worker adds it only when tracing is on
(:data:`tracing.ENABLED`): off, it is not in the chain and costs nothing.

Each span is made current (OpenTelemetry context) from its ``before_*`` hook to its
``after_*`` hook, which the chain calls in the same task, so log records and nested
spans in between belong to it.

Attributes follow the OpenTelemetry semantic conventions where one exists: GenAI spans
(https://opentelemetry.io/docs/specs/semconv/gen-ai/gen-ai-spans/) for model and tool
calls — ``gen_ai.operation.name``, ``gen_ai.provider.name`` (and the older
``gen_ai.system``), ``gen_ai.request.model``, ``gen_ai.response.model``,
``gen_ai.usage.input_tokens`` / ``output_tokens``, ``gen_ai.response.finish_reasons``,
``gen_ai.tool.name``; ``error.type`` and ``exception`` events for errors. OAO's own
attributes are under ``oao.*``. The span names are OAO's (``oao.llm``, not the
convention's ``chat {model}``), so one query finds every model call of a fleet.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from oao_common import tracing
from oao_common.broker import ClaimedJob
from oao_common.circuit import CircuitOpenError
from oao_common.errors import PolicyViolation

from .context import tool_idempotency_key
from .governance import CallTry, NodeAttempt, StepInfo, StepMiddleware, Usage

if TYPE_CHECKING:
    from opentelemetry.trace import Span

#: Events of the attempt's log that become events of the current span, and their names.
SPAN_EVENTS = {
    "RATE_LIMIT_WAIT": "oao.rate_limit.wait",
    "STEP_RETRIED": "oao.retry",
    "POLICY_VIOLATION": "oao.policy_violation",
    "LOOP_BLOCKED": "oao.loop_blocked",
}
#: Outcomes of an attempt that set its span's status to ERROR.
FAILED_OUTCOMES = frozenset({"failed", "retry", "watchdog", "unrecorded"})


def _attach(span: Span) -> object:
    from opentelemetry import context, trace

    return context.attach(trace.set_span_in_context(span))


def _detach(token: object) -> None:
    from opentelemetry import context

    context.detach(token)  # type: ignore[arg-type]


class NodeSpan:
    """The ``oao.node`` span of one attempt, current in the attempt's task from
    :meth:`start` to :meth:`finish`."""

    __slots__ = ("_token", "span")

    def __init__(self, span: Span, token: object) -> None:
        self.span = span
        self._token = token

    @classmethod
    def start(cls, job: ClaimedJob, worker_id: str, started_monotonic: float | None = None) -> NodeSpan:
        """Start the span of ``job``'s attempt as a child of its run's span
        (``job.traceparent``), with the attempt's derived span id; it starts at
        ``started_monotonic`` (``time.monotonic()`` when the job was taken) if given."""
        parent = tracing.parse_traceparent(job.traceparent) if job.traceparent else None
        sid = tracing.attempt_span_id(parent[0], job.node_id, job.attempt) if parent else None
        start_ns = None
        if started_monotonic is not None:
            start_ns = time.time_ns() - int((time.monotonic() - started_monotonic) * 1e9)
        span = tracing._new_span(
            "oao.node",
            {
                "oao.run.id": job.run_id,
                "oao.node.id": job.node_id,
                "oao.node.attempt": job.attempt,
                "oao.worker.id": worker_id,
                "oao.node.replayed_steps_available": sum(1 for r in job.ledger if r),
            },
            job.traceparent or None,
            sid,
            start_ns,
            "internal",
        )
        return cls(span, _attach(span))

    def finish(self, status: str, error: BaseException | None = None) -> None:
        """End the span with ``oao.node.status`` = ``status``; ``error`` is recorded,
        and sets the status to ERROR for the outcomes of :data:`FAILED_OUTCOMES`."""
        from opentelemetry.trace import Status, StatusCode

        span = self.span
        span.set_attribute("oao.node.status", status)
        if status == "retry":
            span.add_event("oao.retry", {"oao.layer": "node"})
        if error is not None:
            tracing.fail_span(span, error, status=status in FAILED_OUTCOMES)
        elif status == "succeeded":
            span.set_status(Status(StatusCode.OK))
        span.end()
        _detach(self._token)


def _violation(e: PolicyViolation) -> dict[str, Any]:
    return {
        "oao.policy.rule": e.rule,
        "oao.policy.scope": e.scope,
        "oao.policy.limit": e.limit if isinstance(e.limit, int | float) else None,
        "oao.policy.reached": e.value if isinstance(e.value, int | float) else None,
    }


def _record(span: Span, e: BaseException) -> None:
    """An error leaving ``span``: a policy violation is an ``oao.policy_violation``
    event of the innermost span it left (the attempt's gets one from the event log);
    an open circuit's refusal an ``oao.circuit.rejected`` event; errors set the status.
    A cancellation is marked, not an error of the call."""
    if isinstance(e, PolicyViolation) and not getattr(e, "_oao_span_event", False):
        span.add_event("oao.policy_violation", tracing.clean_attributes(_violation(e)))
        e._oao_span_event = True  # type: ignore[attr-defined]
    if isinstance(e, CircuitOpenError):
        span.add_event(
            "oao.circuit.rejected",
            {
                "oao.circuit.key": e.key,
                "oao.circuit.state": str(e.state),
                "oao.retry_after_s": e.retry_after_s,
            },
        )
    if isinstance(e, Exception):
        tracing.fail_span(span, e)
    else:
        span.set_attribute("oao.cancelled", True)


class Tracing(StepMiddleware):
    """OpenTelemetry spans of attempts, steps and calls (this module's docstring).

    One per worker; per-attempt state lives in ``node.state`` / ``step.state`` /
    ``call.state``. Every hook is synchronous (no awaits: a span is cheap)."""

    # ------------------------------------------------------------------ node

    def before_node(self, node: NodeAttempt) -> None:
        ns = NodeSpan.start(node.job, node.worker_id, node.started)
        ns.span.set_attributes(
            tracing.clean_attributes(
                {
                    "oao.queue": node.node_spec.queue if node.node_spec is not None else None,
                    "oao.agent.name": node.node_spec.agent if node.node_spec is not None else None,
                    "oao.agent.kind": node.agent_type,
                }
            )
        )
        node.state[self] = ns

    def after_node(self, node: NodeAttempt) -> None:
        ns: NodeSpan | None = node.state.pop(self, None)
        if ns is None:  # the run's spec could not be loaded: before_node never ran
            ns = NodeSpan.start(node.job, node.worker_id, node.started)
        if node.governor is not None:
            ns.span.set_attribute("oao.node.steps", node.governor.usage.steps)
        ns.span.set_attribute("oao.node.replayed_steps", node.state.pop((self, "replayed"), 0))
        ns.finish(node.outcome or "abandoned", node.error)

    # ------------------------------------------------------------------ steps

    def before_step(self, step: StepInfo, usage: Usage) -> None:
        span = tracing._new_span(
            "oao.step",
            {"oao.step.seq": step.seq, "oao.step.kind": step.kind, "oao.step.name": step.name},
            None,
            None,
            None,
            "internal",
        )
        span.set_attribute("oao.step.replayed", False)
        step.state[self] = (span, _attach(span))

    def after_step(self, step: StepInfo, usage: Usage) -> None:
        entry = step.state.pop(self, None)
        if entry is None:
            if step.replayed:  # served from the ledger: nothing ran, a zero-length mark
                if step.node is not None:
                    key = (self, "replayed")
                    step.node.state[key] = step.node.state.get(key, 0) + 1
                span = tracing._new_span(
                    "oao.step",
                    {
                        "oao.step.seq": step.seq,
                        "oao.step.kind": step.kind,
                        "oao.step.name": step.name,
                        "oao.step.replayed": True,
                    },
                    None,
                    None,
                    None,
                    "internal",
                )
                span.end()
            return
        span, token = entry
        llm = step.state.pop((self, "llm"), None)
        if llm is not None:  # the successful try's span waits for the recorded reply
            lspan, end_ns = llm
            self._reply(lspan, step)
            lspan.end(end_time=end_ns)
        if step.error is not None:
            _record(span, step.error)
        elif step.governed:
            span.set_attributes({"oao.tokens_in": step.tokens_in, "oao.tokens_out": step.tokens_out})
        span.end()
        _detach(token)

    # ------------------------------------------------------------------ calls

    def before_call(self, call: CallTry) -> None:
        step = call.step
        node = step.node
        if step.kind == "llm":
            req = step.request or {}
            mspec = node.spec.models.get(step.name) if node is not None and node.spec is not None else None
            provider = str(getattr(mspec, "provider", "") or "")
            attrs: dict[str, Any] = {
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": provider,
                "gen_ai.system": provider,
                "gen_ai.request.model": str(getattr(mspec, "model", step.name)),
                "gen_ai.request.max_tokens": req.get("max_tokens"),
                "gen_ai.request.temperature": req.get("temperature"),
                "oao.model": step.name,
                "oao.try": call.number,
                "gen_ai.input.messages": tracing.content(req.get("messages")),
            }
            span = tracing._new_span("oao.llm", attrs, None, None, None, "client")
        elif step.kind == "tool":
            node_id = node.node_id if node is not None else ""
            run_id = node.run_id if node is not None else ""
            tool = (
                node.runtime.tools.get(step.name) if node is not None and node.runtime is not None else None
            )
            attrs = {
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": step.name,
                "gen_ai.tool.type": "function",
                "oao.tool.idempotency_key": tool_idempotency_key(
                    run_id, node_id, step.name, step.args, step.seq
                ),
                "oao.tool.idempotent": bool(tool is not None and tool.spec.idempotent),
                "oao.try": call.number,
                "gen_ai.tool.call.arguments": tracing.content(step.args),
            }
            span = tracing._new_span("oao.tool", attrs, None, None, None, "internal")
        else:
            return
        call.state[self] = (span, _attach(span))

    def after_call(self, call: CallTry, error: BaseException | None) -> None:
        entry = call.state.pop(self, None)
        if entry is None:
            return
        span, token = entry
        _detach(token)
        if error is not None:
            _record(span, error)
            if call.step.kind == "tool":
                span.set_attribute("oao.tool.outcome", "error")
            span.end()
        elif call.step.kind == "llm":
            # the reply's figures are known once the step is recorded: after_step ends it
            call.step.state[(self, "llm")] = (span, time.time_ns())
        else:
            span.set_attribute("oao.tool.outcome", "ok")
            result = tracing.content(call.step.result)
            if result is not None:
                span.set_attribute("gen_ai.tool.call.result", result)
            span.end()

    @staticmethod
    def _reply(span: Span, step: StepInfo) -> None:
        reply = step.result if isinstance(step.result, dict) else {}
        out = [{"role": "assistant", "content": reply.get("content"), "tool_calls": reply.get("tool_calls")}]
        span.set_attributes(
            tracing.clean_attributes(
                {
                    "gen_ai.response.model": reply.get("model") or None,
                    "gen_ai.response.finish_reasons": [str(reply.get("finish_reason") or "stop")],
                    "gen_ai.usage.input_tokens": step.tokens_in,
                    "gen_ai.usage.output_tokens": step.tokens_out,
                    "oao.cost_usd": step.cost_usd,
                    "gen_ai.output.messages": tracing.content(out),
                }
            )
        )
        if step.error is not None:
            _record(span, step.error)

    # ------------------------------------------------------------------ events

    def on_event(self, node: NodeAttempt, type_: str, data: dict[str, Any]) -> None:
        name = SPAN_EVENTS.get(type_)
        if name is None:
            return
        if type_ == "POLICY_VIOLATION":
            attrs: Mapping[str, Any] = {
                "oao.policy.rule": data.get("rule"),
                "oao.policy.scope": data.get("scope", "node"),
                "oao.policy.limit": data.get("limit") if isinstance(data.get("limit"), int | float) else None,
                "oao.policy.reached": data.get("value")
                if isinstance(data.get("value"), int | float)
                else None,
            }
        else:
            attrs = {f"oao.{k}": v for k, v in data.items()}
            if type_ == "STEP_RETRIED":
                attrs = {**attrs, "oao.layer": "step"}
        tracing.add_event(name, attrs)
