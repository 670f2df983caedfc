"""Prometheus metrics of workers, ``serve`` and ``run`` (``prometheus-client``): the one
place that defines them; docs/observability.md lists each with its type, labels and
meaning.

Conventions (https://prometheus.io/docs/practices/naming/ and
https://prometheus.io/docs/practices/instrumentation/): every name starts with ``oao_``;
base units in the name (``_seconds``, ``_usd``); counters end in ``_total``; no label
takes unbounded values (no run, node or worker id: a worker is told apart by the
``instance`` Prometheus gives each scrape target). Label values come from small fixed
sets (statuses, kinds, reasons, rules) or from the fleet's own configuration (agent
kinds, model and tool names of the specs, queue names, limiter keys). Labels of fixed
sets are initialised to zero at import, so a rate over them exists before the first
event (the instrumentation guide's "avoid missing metrics").

A process exposes them with :func:`serve_metrics` (``oao-worker --metrics-port``,
``oao-scheduler serve --metrics-port``, ``oao-scheduler run --metrics-port``) at
``http://HOST:PORT/metrics``. Worker and ``serve`` export the same families; the
ones a process does not update stay at zero (or without series, for labelled ones).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterable
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram, start_http_server

# Agent work runs from milliseconds (a replayed step, a python node) to minutes (a
# long model stream, a node with many steps): 10 ms .. 10 min, seconds.
AGENT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

# ------------------------------------------------------------------ executions (workers)

EXECUTIONS = Counter(
    "oao_executions_total",
    "Node attempts finished, by outcome (succeeded, failed, retry, stale, unrecorded) and agent kind",
    ["status", "agent_type"],
)
EXECUTION_SECONDS = Histogram(
    "oao_execution_duration_seconds",
    "Wall time of one node attempt, seconds",
    ["agent_type"],
    buckets=AGENT_BUCKETS_S,
)
STEP_SECONDS = Histogram(
    "oao_step_duration_seconds",
    "Wall time of one executed step (model call, tool call, invoke), retries inside it included, seconds",
    ["kind"],
    buckets=AGENT_BUCKETS_S,
)
ACTIVE_AGENTS = Gauge("oao_active_agents", "Node attempts running in this process")
CONCURRENCY = Gauge("oao_worker_concurrency", "Node attempts this process may run at once (its slots)")
STEPS = Counter("oao_steps_total", "Steps by kind and how they ran (executed, replayed)", ["kind", "mode"])
TOKENS = Counter(
    "oao_token_usage_total",
    "Model tokens of executed steps, by model and kind (input, output)",
    ["model", "kind"],
)
COST_USD = Counter("oao_cost_usd_total", "USD spent on executed model calls, by model", ["model"])
TOOL_CALLS = Counter(
    "oao_tool_calls_total", "Tool calls executed, by tool and outcome (ok, error)", ["tool", "outcome"]
)
POLICY_VIOLATIONS = Counter(
    "oao_policy_violations_total", "Policy violations by rule and scope (node, run)", ["rule", "scope"]
)
RETRIES = Counter("oao_retries_total", "Retries scheduled, by layer (step, node)", ["layer"])
STALE_WRITES = Counter("oao_stale_writes_total", "Writes rejected because the attempt moved on")

# ------------------------------------------------------------------ guards (workers)

RATE_LIMIT_WAITS = Counter(
    "oao_rate_limit_waits_total", "Times a call waited for rate-limit capacity, by limiter key", ["key"]
)
RATE_LIMIT_WAIT_SECONDS = Counter(
    "oao_rate_limit_wait_seconds_total", "Seconds calls were told to wait for rate-limit capacity", ["key"]
)
CIRCUIT_STATE = Gauge(
    "oao_circuit_state",
    "State of a circuit breaker as this process last saw it: 0 closed, 1 half-open, 2 open",
    ["key"],
)
CIRCUIT_REJECTIONS = Counter(
    "oao_circuit_rejections_total", "Calls refused by an open (or fully probing) circuit", ["key"]
)

# ------------------------------------------------------------------ worker health

LOOP_LAG_SECONDS = Gauge(
    "oao_event_loop_lag_seconds", "Latest measured delay of a callback posted to a worker's event loop"
)
LOOP_BLOCKED_SECONDS = Histogram(
    "oao_event_loop_blocked_seconds",
    "Episodes of a worker's event loop held by one task, seconds",
    buckets=(1, 2, 5, 10, 30, 60, 300),
)
WORKER_SATURATED = Counter(
    "oao_worker_executor_saturated_total", "Times a worker's sync threads were all hung"
)
HEARTBEAT_AGE = Gauge(
    "oao_worker_heartbeat_age_seconds",
    "Seconds since this process' oldest worker last wrote its heartbeat (0 without workers)",
)

# ------------------------------------------------------------------ recovery (workers and serve)

REQUEUED = Counter(
    "oao_jobs_requeued_total",
    "Jobs handed back to a ready list, by reason (worker_dead, handback, reconcile, worker_restart)",
    ["reason"],
)
DEAD_LETTERED = Counter("oao_jobs_dead_lettered_total", "Poison jobs failed after too many requeues")
REDIS_ERRORS = Counter(
    "oao_redis_errors_total", "Redis errors met by long-lived loops, by loop and error code", ["loop", "code"]
)

# ------------------------------------------------------------------ fleet (serve)

QUEUE_DEPTH = Gauge(
    "oao_queue_depth",
    "Jobs by queue, priority band (high, normal, low) and state (ready, delayed, active, parked)",
    ["queue", "band", "state"],
)
WORKERS = Gauge("oao_workers", "Registered workers by state (alive, dead: heartbeat expired)", ["state"])
FLEET_HEARTBEAT_AGE = Gauge(
    "oao_fleet_heartbeat_age_max_seconds", "Age of the oldest heartbeat among live workers, seconds"
)
FLEET_SLOTS = Gauge("oao_fleet_slots", "Node slots of live workers, by state (busy, total)", ["state"])
RUNS_IN_FLIGHT = Gauge("oao_runs_in_flight", "Runs submitted and not yet ended")
DEPTH_SCAN_SECONDS = Gauge(
    "oao_queue_depth_scan_seconds", "Time the last queue-depth computation took, seconds"
)

STATUSES = ("succeeded", "failed", "retry", "stale", "unrecorded")
REQUEUE_REASONS = ("worker_dead", "handback", "reconcile", "worker_restart")
RETRY_LAYERS = ("step", "node")
STEP_KINDS = ("llm", "tool", "invoke")
POLICY_RULES = (
    "max_steps",
    "max_tokens",
    "max_input_tokens",
    "max_output_tokens",
    "max_tool_calls",
    "max_cost_usd",
    "tool_not_allowed",
    "timeout_s",
    "max_turns",
)
BANDS = ("high", "normal", "low")
DEPTH_STATES = ("ready", "delayed", "active", "parked")


def _init_fixed_labels() -> None:
    """Zero series for label values drawn from fixed sets."""
    for reason in REQUEUE_REASONS:
        REQUEUED.labels(reason)
    for layer in RETRY_LAYERS:
        RETRIES.labels(layer)
    for kind in STEP_KINDS:
        STEPS.labels(kind, "executed")
        STEPS.labels(kind, "replayed")
    for rule in POLICY_RULES:
        POLICY_VIOLATIONS.labels(rule, "node")
    POLICY_VIOLATIONS.labels("timeout_s", "run")
    for state in ("alive", "dead"):
        WORKERS.labels(state)
    for state in ("busy", "total"):
        FLEET_SLOTS.labels(state)


_init_fixed_labels()


class _Beating(Protocol):
    @property
    def last_beat(self) -> float: ...


_beaters: weakref.WeakSet[_Beating] = weakref.WeakSet()


def watch_heartbeat(beater: _Beating) -> None:
    """Count ``beater`` (a heartbeat thread with ``last_beat``, monotonic seconds) in
    :data:`HEARTBEAT_AGE`, the oldest of this process' workers."""
    _beaters.add(beater)


def forget_heartbeat(beater: _Beating) -> None:
    """Stop counting ``beater`` (its worker stopped)."""
    _beaters.discard(beater)


def _heartbeat_age() -> float:
    now = time.monotonic()
    return max((now - b.last_beat for b in list(_beaters)), default=0.0)


HEARTBEAT_AGE.set_function(_heartbeat_age)


def split_band(ready_list: str) -> tuple[str, str]:
    """``"default:high"`` → ``("default", "high")``; ``"default"`` → ``("default", "normal")``."""
    q, sep, band = ready_list.rpartition(":")
    if sep and band in ("high", "low"):
        return q, band
    return ready_list, "normal"


def set_queue_depths(depths: dict[tuple[str, str, str], int], known: Iterable[tuple[str, str, str]]) -> None:
    """Set :data:`QUEUE_DEPTH` from ``{(queue, band, state): jobs}``; series of ``known``
    absent from ``depths`` go to 0 (a drained queue reads 0, not its last value)."""
    for key in known:
        if key not in depths:
            QUEUE_DEPTH.labels(*key).set(0)
    for key, n in depths.items():
        QUEUE_DEPTH.labels(*key).set(n)


def serve_metrics(port: int, addr: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` on ``addr:port`` from a background thread."""
    start_http_server(port, addr=addr)
