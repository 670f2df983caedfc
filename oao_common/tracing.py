"""OpenTelemetry tracing: one trace per run.

Span tree (docs/observability.md lists every attribute)::

    oao.run                       emitted by serve's escalator when the run ends
    ├── oao.node  (attempt 1)     one per attempt, on the worker that ran it
    │   ├── oao.step  (seq 1)     one per step, replayed ones marked oao.step.replayed
    │   │   └── oao.llm           the model call (GenAI semantic conventions)
    │   └── oao.step  (seq 2)
    │       └── oao.tool          the tool call
    └── oao.node  (attempt 2)     a requeued or retried attempt: a sibling

**Off unless configured, and then nearly free.** :func:`configure_tracing` turns
tracing on only when the standard variables ask for an exporter
(``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, or
``OTEL_TRACES_EXPORTER=otlp|console``; ``OTEL_SDK_DISABLED=true`` and
``OTEL_TRACES_EXPORTER=none`` keep it off). Off, :data:`ENABLED` is False, the SDK is
not even imported, and every hook returns at its first test. On, spans go to the OTLP
exporter over HTTP/protobuf (``opentelemetry-exporter-otlp-proto-http``) through a
batch processor; sampling, resource and batch settings come from the standard
variables (``OTEL_TRACES_SAMPLER``, ``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_BSP_*``), read by the SDK itself
(https://opentelemetry.io/docs/specs/otel/configuration/sdk-environment-variables/).

**Context in the run.** At submit, :func:`new_run_traceparent` fixes the run span's
trace id and span id (a child of the submitter's current span, if it has one) and the
run hash keeps them as a W3C ``traceparent`` (https://www.w3.org/TR/trace-context/);
``claim.lua`` returns it with every job, so each attempt, on any worker, starts its
``oao.node`` span as a child of the run span. An attempt's span id is derived from the
trace id, node id and attempt number (:func:`attempt_span_id`), so the reaper can end
the span of an attempt whose worker was killed (:func:`emit_dead_attempt`) and the
steps that worker exported still hang under it. The run span itself is written once,
when the run ends, by the escalator (which sees every ending exactly once), with the
fixed ids and the run's real start and end times.

**Content.** Prompts, replies, tool arguments and results are recorded only when
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`` (the opt-in of the GenAI
semantic conventions), and then redacted (``oao_common/redact.py``); secrets never.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import os
import secrets
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .redact import redact, redact_text

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

#: True once :func:`configure_tracing` installed a tracer provider in this process.
ENABLED = False
#: Record message contents (GenAI opt-in); read by :func:`configure_tracing`.
CAPTURE_CONTENT = False

_tracer: Tracer | None = None
_provider: TracerProvider | None = None
_lock = threading.Lock()
# Ids the next span must take (the run span, an attempt span): (trace id, span id).
_forced: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "oao_forced_ids", default=None
)

ENV_CAPTURE = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"


def wanted() -> bool:
    """Do the standard variables ask for traces to be exported?"""
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    if exporter in ("otlp", "console"):
        return True
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def configure_tracing(service_name: str, exporter: SpanExporter | None = None, batch: bool = True) -> bool:
    """Turn tracing on for this process if :func:`wanted` (or ``exporter`` is given: the
    tests' in-memory exporter, the benchmark's no-op one). Returns :data:`ENABLED`.

    ``service_name`` is the default ``service.name`` (``OTEL_SERVICE_NAME`` wins).
    ``batch=False`` exports each span as it ends (tests)."""
    global ENABLED, CAPTURE_CONTENT, _tracer, _provider
    with _lock:
        if ENABLED:
            return True
        if exporter is None and not wanted():
            return False
        from opentelemetry import trace
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        if exporter is None:
            kind = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
            if kind == "console":
                from opentelemetry.sdk.trace.export import ConsoleSpanExporter

                exporter = ConsoleSpanExporter()
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                exporter = OTLPSpanExporter()
        attrs: dict[str, Any] = {}
        if not os.environ.get("OTEL_SERVICE_NAME"):
            attrs[SERVICE_NAME] = service_name
        provider = TracerProvider(resource=Resource.create(attrs), id_generator=_forced_ids())
        provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        _provider = provider
        _tracer = provider.get_tracer("oao", schema_url="https://opentelemetry.io/schemas/1.37.0")
        CAPTURE_CONTENT = os.environ.get(ENV_CAPTURE, "").strip().lower() == "true"
        ENABLED = True
        return True


def shutdown(timeout_s: float = 5.0) -> None:
    """Export what is buffered and stop (process exit; the tests)."""
    global ENABLED, _tracer, _provider
    with _lock:
        p = _provider
        ENABLED, _tracer, _provider = False, None, None
    if p is not None:
        p.force_flush(int(timeout_s * 1000))
        p.shutdown()


def force_flush(timeout_s: float = 5.0) -> None:
    if _provider is not None:
        _provider.force_flush(int(timeout_s * 1000))


def tracer() -> Tracer:
    assert _tracer is not None, "tracing is not configured"
    return _tracer


def _forced_ids() -> Any:
    """The SDK's random ids, unless :data:`_forced` names the ids of the next span."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class ForcedIds(RandomIdGenerator):
        def generate_span_id(self) -> int:
            f = _forced.get()
            return f[1] if f is not None else super().generate_span_id()

        def generate_trace_id(self) -> int:
            f = _forced.get()
            return f[0] if f is not None else super().generate_trace_id()

    return ForcedIds()


# ---------------------------------------------------------------------- ids


def parse_traceparent(tp: str) -> tuple[int, int, bool] | None:
    """``00-<32 hex>-<16 hex>-<2 hex>`` → (trace id, span id, sampled); None if invalid."""
    parts = tp.strip().split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    try:
        tid, sid, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if not tid or not sid:
        return None
    return tid, sid, bool(flags & 1)


def format_traceparent(trace_id: int, span_id: int, sampled: bool = True) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


def attempt_span_id(trace_id: int, node_id: str, attempt: int) -> int:
    """The span id of attempt ``attempt`` of node ``node_id`` in trace ``trace_id``: the
    first 8 bytes of sha256 over them (never 0), so any process can name it."""
    h = hashlib.sha256(f"{trace_id:032x}/{node_id}/{attempt}".encode()).digest()
    return int.from_bytes(h[:8], "big") or 1


def new_run_traceparent() -> tuple[str, str]:
    """``(traceparent, parent span id hex or "")`` for a new run's span: in the trace of
    the caller's current span (its child) if there is one, else a new trace. Sampled
    unless this process traces and its sampler drops the run."""
    parent_sid = ""
    tid = 0
    sampled = True
    if ENABLED:
        from opentelemetry import trace

        cur = trace.get_current_span().get_span_context()
        if cur.is_valid:
            tid, parent_sid, sampled = cur.trace_id, f"{cur.span_id:016x}", cur.trace_flags.sampled
    if not tid:
        tid = secrets.randbits(128) or 1
        if ENABLED and _provider is not None:
            from opentelemetry.sdk.trace.sampling import Decision

            r = _provider.sampler.should_sample(None, tid, "oao.run")
            sampled = r.decision is Decision.RECORD_AND_SAMPLE
    return format_traceparent(tid, secrets.randbits(64) or 1, sampled), parent_sid


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span as hex, or None."""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


def _remote_context(trace_id: int, span_id: int, sampled: bool) -> Any:
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    sc = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(1 if sampled else 0))
    return trace.set_span_in_context(NonRecordingSpan(sc))


# ---------------------------------------------------------------------- spans


def clean_attributes(attrs: Mapping[str, Any], free_text: bool = False) -> dict[str, Any]:
    """Attributes OpenTelemetry accepts (str, bool, int, float, lists of one of them),
    None dropped. With ``free_text`` every string is redacted (error messages, event data:
    text that may quote anything); OAO's own attributes (ids, names from the spec, kinds,
    counts) are not, which keeps the per-span cost down. Other values become redacted JSON."""
    out: dict[str, Any] = {}
    for k, v in attrs.items():
        if v is None:
            continue
        if isinstance(v, str):
            out[k] = redact_text(v) if free_text else v
        elif isinstance(v, bool | int | float):
            out[k] = v
        elif isinstance(v, list | tuple):
            out[k] = [redact_text(x) if free_text and isinstance(x, str) else x for x in v if x is not None]
        else:
            out[k] = redact_text(json.dumps(redact(v), default=str))
    return out


def content(value: Any) -> str | None:
    """``value`` as redacted JSON for a content attribute, or None unless content
    capture was opted into."""
    if not CAPTURE_CONTENT:
        return None
    return redact_text(json.dumps(redact(value), default=str, ensure_ascii=False))


def _new_span(
    name: str,
    attributes: Mapping[str, Any] | None,
    parent_traceparent: str | None,
    span_id: int | None,
    start_time_ns: int | None,
    kind: str,
) -> Span:
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind

    ctx = None
    trace_id = 0
    if parent_traceparent:
        p = parse_traceparent(parent_traceparent)
        if p is not None:
            ctx = _remote_context(*p)
            trace_id = p[0]
    token = None
    if span_id is not None:
        if not trace_id:
            trace_id = trace.get_current_span().get_span_context().trace_id or secrets.randbits(128) or 1
        token = _forced.set((trace_id, span_id))
    try:
        return tracer().start_span(
            name,
            context=ctx,
            kind=SpanKind.CLIENT if kind == "client" else SpanKind.INTERNAL,
            attributes=clean_attributes(attributes or {}),
            start_time=start_time_ns,
            record_exception=False,
            set_status_on_exception=False,
        )
    finally:
        if token is not None:
            _forced.reset(token)


@contextmanager
def start_span(
    name: str,
    attributes: Mapping[str, Any] | None = None,
    *,
    parent_traceparent: str | None = None,
    span_id: int | None = None,
    start_time_ns: int | None = None,
    kind: str = "internal",
) -> Iterator[Span]:
    """Start ``name`` as the current span (ended at the block's end). ``parent_traceparent``
    makes it a child of that remote span instead of the current one; ``span_id`` forces
    its id. Exceptions are not recorded here: the caller decides (see :func:`fail_span`)."""
    from opentelemetry import trace

    span = _new_span(name, attributes, parent_traceparent, span_id, start_time_ns, kind)
    with trace.use_span(span, end_on_exit=True, record_exception=False, set_status_on_exception=False):
        yield span


def fail_span(span: Span, error: BaseException | str, status: bool = True) -> None:
    """Record ``error`` on ``span`` as an ``exception`` event (``exception.type``,
    ``exception.message`` redacted: the semantic conventions' exception attributes) and,
    with ``status``, set the span's status to ERROR with that message."""
    from opentelemetry.trace import Status, StatusCode

    if isinstance(error, BaseException):
        etype, msg = type(error).__name__, redact_text(str(error))
    else:
        etype, msg = "Error", redact_text(error)
    span.add_event("exception", {"exception.type": etype, "exception.message": msg})
    span.set_attribute("error.type", etype)
    if status:
        span.set_status(Status(StatusCode.ERROR, msg[:500]))


def add_event(name: str, attributes: Mapping[str, Any] | None = None) -> None:
    """Add an event to the current span (nothing when tracing is off or no span is current)."""
    if not ENABLED:
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(name, clean_attributes(attributes or {}, free_text=True))


def emit_finished_span(
    name: str,
    traceparent: str,
    start_ns: int,
    end_ns: int,
    attributes: Mapping[str, Any],
    *,
    parent_span_hex: str = "",
    error: str | None = None,
    as_child: bool = False,
    span_id: int | None = None,
) -> None:
    """Write a span that another process began: with ``as_child`` a child of
    ``traceparent`` (span id ``span_id``), else the span ``traceparent`` names itself
    (its parent ``parent_span_hex``, or none), from ``start_ns`` to ``end_ns``
    (ns since the epoch). Nothing when tracing is off or the trace is not sampled."""
    if not ENABLED:
        return
    p = parse_traceparent(traceparent)
    if p is None or not p[2]:
        return
    tid, sid, _ = p
    parent: str | None = None
    if as_child:
        parent, forced = traceparent, span_id if span_id is not None else secrets.randbits(64) or 1
    else:
        forced = sid
        if parent_span_hex:
            parent = format_traceparent(tid, int(parent_span_hex, 16), True)
    token = _forced.set((tid, forced))
    try:
        span = _new_span(name, attributes, parent, None, start_ns, "internal")
    finally:
        _forced.reset(token)
    if error:
        fail_span(span, error)
    span.end(end_time=end_ns)
