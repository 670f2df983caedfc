"""The spans of a node attempt: ``oao.node`` → ``oao.step`` → ``oao.llm`` / ``oao.tool``
(``oao_common/tracing.py`` sets tracing up and holds the run-level parts).

Every entry point returns at once when tracing is off (:data:`tracing.ENABLED` false):
the worker and the agent context call them unconditionally.

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

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from oao_common import tracing
from oao_common.broker import ClaimedJob
from oao_common.errors import PolicyViolation

if TYPE_CHECKING:
    from opentelemetry.trace import Span

#: Event types of the node's event log that become span events, and their names.
SPAN_EVENTS = {
    "RATE_LIMIT_WAIT": "oao.rate_limit.wait",
    "STEP_RETRIED": "oao.retry",
    "LOOP_BLOCKED": "oao.loop_blocked",
}


class NodeSpan:
    """The ``oao.node`` span of one attempt, current in the attempt's task from
    :meth:`start` to :meth:`finish`. :data:`OFF` stands in when tracing is off."""

    __slots__ = ("_token", "span")

    def __init__(self, span: Span | None, token: object = None) -> None:
        self.span = span
        self._token = token

    @classmethod
    def start(cls, job: ClaimedJob, worker_id: str) -> NodeSpan:
        """Start the span of ``job``'s attempt as a child of its run's span
        (``job.traceparent``), with the attempt's derived span id."""
        if not tracing.ENABLED:
            return OFF
        from opentelemetry import context, trace

        parent = tracing.parse_traceparent(job.traceparent) if job.traceparent else None
        sid = tracing.attempt_span_id(parent[0], job.node_id, job.attempt) if parent else None
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
            None,
            "internal",
        )
        return cls(span, context.attach(trace.set_span_in_context(span)))

    def annotate(self, attrs: Mapping[str, Any]) -> None:
        if self.span is not None:
            self.span.set_attributes(tracing.clean_attributes(attrs))

    def event(self, name: str, attrs: Mapping[str, Any]) -> None:
        if self.span is not None:
            self.span.add_event(name, tracing.clean_attributes(attrs, free_text=True))

    def finish(self, status: str, error: BaseException | None = None, failed: bool = False) -> None:
        """End the span with ``oao.node.status`` = ``status``; ``error`` is recorded
        (and sets the span's status to ERROR when ``failed``)."""
        span = self.span
        if span is None:
            return
        from opentelemetry import context
        from opentelemetry.trace import Status, StatusCode

        span.set_attribute("oao.node.status", status)
        if isinstance(error, PolicyViolation):
            span.add_event("oao.policy_violation", tracing.clean_attributes(_violation(error)))
        if error is not None:
            tracing.fail_span(span, error, status=failed)
        elif status == "succeeded":
            span.set_status(Status(StatusCode.OK))
        span.end()
        if self._token is not None:
            context.detach(self._token)  # type: ignore[arg-type]
        self.span = None


OFF = NodeSpan(None)


def _violation(e: PolicyViolation) -> dict[str, Any]:
    return {
        "oao.policy.rule": e.rule,
        "oao.policy.scope": e.scope,
        "oao.policy.limit": e.limit if isinstance(e.limit, int | float) else None,
        "oao.policy.reached": e.value if isinstance(e.value, int | float) else None,
    }


@contextmanager
def step_span(seq: int, kind: str, name: str) -> Iterator[Span | None]:
    """``oao.step`` around an executed step; an exception leaving it is recorded (a
    policy violation also as an ``oao.policy_violation`` event) and re-raised."""
    if not tracing.ENABLED:
        yield None
        return
    with tracing.start_span(
        "oao.step",
        {"oao.step.seq": seq, "oao.step.kind": kind, "oao.step.name": name, "oao.step.replayed": False},
    ) as span:
        try:
            yield span
        except BaseException as e:
            _record(span, e)
            raise


def replayed_step(seq: int, kind: str, name: str) -> None:
    """A zero-length ``oao.step`` marked ``oao.step.replayed`` (served from the ledger)."""
    if not tracing.ENABLED:
        return
    with tracing.start_span(
        "oao.step",
        {"oao.step.seq": seq, "oao.step.kind": kind, "oao.step.name": name, "oao.step.replayed": True},
    ):
        pass


def _record(span: Span, e: BaseException) -> None:
    """An exception leaving ``span``: a policy violation is an ``oao.policy_violation``
    event of the innermost span it left (and of the node's); errors set the status."""
    if isinstance(e, PolicyViolation) and not getattr(e, "_oao_span_event", False):
        span.add_event("oao.policy_violation", tracing.clean_attributes(_violation(e)))
        e._oao_span_event = True  # type: ignore[attr-defined]
    if isinstance(e, Exception):
        tracing.fail_span(span, e)
    else:  # cancelled: the attempt was stopped, not the call's fault
        span.set_attribute("oao.cancelled", True)


@contextmanager
def llm_span(
    model: str,
    provider: str,
    request_model: str,
    max_tokens: int | None,
    temperature: float | None,
    messages: list[dict[str, Any]],
) -> Iterator[Span | None]:
    """``oao.llm`` around a model call (its tries included); GenAI request attributes.
    Finish it with :func:`llm_reply`."""
    if not tracing.ENABLED:
        yield None
        return
    attrs = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": provider,
        "gen_ai.system": provider,
        "gen_ai.request.model": request_model,
        "gen_ai.request.max_tokens": max_tokens,
        "gen_ai.request.temperature": temperature,
        "oao.model": model,
        "gen_ai.input.messages": tracing.content(messages),
    }
    with tracing.start_span("oao.llm", attrs, kind="client") as span:
        try:
            yield span
        except BaseException as e:
            _record(span, e)
            raise


def llm_reply(span: Span | None, reply: dict[str, Any], cost_usd: float) -> None:
    """Response attributes of a model call: model, finish reasons, token usage, cost."""
    if span is None:
        return
    usage = reply.get("usage") or {}
    out = [{"role": "assistant", "content": reply.get("content"), "tool_calls": reply.get("tool_calls")}]
    span.set_attributes(
        tracing.clean_attributes(
            {
                "gen_ai.response.model": reply.get("model") or None,
                "gen_ai.response.finish_reasons": [str(reply.get("finish_reason") or "stop")],
                "gen_ai.usage.input_tokens": int(usage.get("input_tokens", 0)),
                "gen_ai.usage.output_tokens": int(usage.get("output_tokens", 0)),
                "oao.cost_usd": cost_usd,
                "gen_ai.output.messages": tracing.content(out),
            }
        )
    )


@contextmanager
def tool_span(name: str, idempotency_key: str, idempotent: bool, args: Any) -> Iterator[Span | None]:
    """``oao.tool`` around a tool call (its tries included)."""
    if not tracing.ENABLED:
        yield None
        return
    attrs = {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": name,
        "gen_ai.tool.type": "function",
        "oao.tool.idempotency_key": idempotency_key,
        "oao.tool.idempotent": idempotent,
        "gen_ai.tool.call.arguments": tracing.content(args),
    }
    with tracing.start_span("oao.tool", attrs) as span:
        try:
            yield span
        except BaseException as e:
            _record(span, e)
            raise


def tool_result(span: Span | None, ok: bool, value: Any) -> None:
    if span is None:
        return
    span.set_attribute("oao.tool.outcome", "ok" if ok else "error")
    result = tracing.content(value)
    if result is not None:
        span.set_attribute("gen_ai.tool.call.result", result)
    if not ok:
        tracing.fail_span(span, str(value))


def on_event(type_: str, data: Mapping[str, Any] | None) -> None:
    """A node event (``AgentContext.emit``) as an event of the current span."""
    name = SPAN_EVENTS.get(type_)
    if name is None or not tracing.ENABLED:
        return
    attrs = {f"oao.{k}": v for k, v in (data or {}).items()}
    if type_ == "STEP_RETRIED":
        attrs["oao.layer"] = "step"
    tracing.add_event(name, attrs)
