"""Prometheus metrics of workers and the scheduler (``prometheus-client``): the one
place that defines them; docs/architecture.md lists them.

A process exposes them with :func:`serve_metrics` (``oao-worker --metrics-port``,
``oao-scheduler serve --metrics-port``) at ``http://HOST:PORT/metrics``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

EXECUTIONS = Counter(
    "oao_executions_total", "Node attempts finished, by outcome and agent kind", ["status", "agent_type"]
)
EXECUTION_SECONDS = Histogram(
    "oao_execution_duration_seconds",
    "Wall time of one node attempt, seconds",
    ["agent_type"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
ACTIVE_AGENTS = Gauge("oao_active_agents", "Node attempts running in this process")
TOKENS = Counter("oao_token_usage_total", "Model tokens used by executed steps", ["model", "kind"])
STEPS = Counter("oao_steps_total", "Steps by kind and how they ran", ["kind", "mode"])
TOOL_CALLS = Counter("oao_tool_calls_total", "Tool calls executed", ["tool"])
POLICY_VIOLATIONS = Counter(
    "oao_policy_violations_total", "Policy violations by rule and scope", ["rule", "scope"]
)
COST_USD = Counter("oao_cost_usd_total", "USD spent on model calls", ["model"])
RETRIES = Counter("oao_retries_total", "Retries scheduled, by layer", ["layer"])
REQUEUED = Counter("oao_jobs_requeued_total", "Jobs handed back to a ready list", ["reason"])
DEAD_LETTERED = Counter("oao_jobs_dead_lettered_total", "Poison jobs failed after too many requeues")
STALE_WRITES = Counter("oao_stale_writes_total", "Writes rejected because the attempt moved on")
RATE_LIMIT_WAITS = Counter("oao_rate_limit_waits_total", "Times a call waited for rate-limit capacity")
QUEUE_SIZE = Gauge("oao_queue_size", "Ready jobs per queue", ["queue"])
DELAYED_SIZE = Gauge("oao_delayed_jobs", "Retries waiting in the delayed set")
WORKERS_ALIVE = Gauge("oao_workers_alive", "Workers with a live heartbeat")
LOOP_BLOCKED_SECONDS = Histogram(
    "oao_event_loop_blocked_seconds",
    "Episodes of a worker's event loop held by one task, seconds",
    buckets=(1, 2, 5, 10, 30, 60, 300),
)
WORKER_SATURATED = Counter(
    "oao_worker_executor_saturated_total", "Times a worker's sync threads were all hung"
)
REDIS_ERRORS = Counter(
    "oao_redis_errors_total", "Redis errors met by long-lived loops, by loop and error code", ["loop", "code"]
)


def serve_metrics(port: int, addr: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` on ``addr:port`` from a background thread."""
    start_http_server(port, addr=addr)
