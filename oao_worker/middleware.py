"""OAO's built-in governance middleware, and the order a worker composes them in.

Each concern is one :class:`~oao_worker.governance.StepMiddleware` (docs/plugins.md):

=================  ==========================================================  ===================
middleware         does                                                        module
=================  ==========================================================  ===================
``Metrics``        Prometheus counters of attempts, steps, tokens, costs,      here
                   retries, rate-limit waits, policy violations
``Tracing``        OpenTelemetry spans of attempts, steps and calls (only      ``spans.py``
                   when tracing is on)
``EventListeners`` plugins' event listeners (only when some are loaded)        ``plugins.py``
``Retries``        classifies errors: retry a call inside the step, retry the  here
                   node through the delayed set, or not
``Timeouts``       the attempt's time limit (node ``timeout_s``, or what is    here
                   left of the run's); a timeout becomes ``PolicyViolation``
``Costs``          prices each model step (``step.price``)                    here
``StrictPolicy``   the node's limits and the agent's tool allow / deny lists   ``governance.py``
plugins            worker-wide plugin middleware, then the spec's              ``plugins.py``
                   ``middleware:`` list
``RunBudgets``     the run's shared budget, by reservation                    ``budget.py``
``RateLimits``     fleet-wide rate limits of models and tools                 ``guards.py``
``CircuitBreakers`` fleet-wide circuit breakers of models and tools           ``guards.py``
=================  ==========================================================  ===================

``before_*`` hooks run top to bottom, ``after_*`` and ``on_error`` bottom to top, so
``Metrics`` (outermost) sees every outcome last, ``Timeouts`` turns a timeout into a
policy violation before ``Retries`` classifies it, and the guards hold their permits
only around the call itself. ``Tracing`` sits right after ``Metrics`` (:func:`compose`
``observers``), where it sees every attempt, step and call whole.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from oao_common import metrics
from oao_common.circuit import CircuitBreaker, CircuitOpenError
from oao_common.errors import PermanentError, PolicyViolation, StaleAttemptError, TransientError
from oao_common.events import EventType
from oao_common.policy import RetrySpec, backoff_delay_s
from oao_common.pricing import FREE
from oao_common.ratelimit import RateLimiter, RateLimitTimeout

from .budget import RunBudgets
from .governance import CallTry, Failure, NodeAttempt, StepInfo, StepMiddleware, StrictPolicy, Usage
from .guards import CircuitBreakers, RateLimits

NO_RETRY = RetrySpec(max_retries=0)


def transient(e: BaseException) -> bool:
    """Retried inside the step: transient provider errors, but not a fleet guard's
    refusal (open circuit, rate-limit wait exhausted): those fail fast and are retried
    by the node, through the delayed set, after their ``retry_after_s``."""
    return isinstance(e, TransientError) and not isinstance(e, (CircuitOpenError, RateLimitTimeout))


def transient_tool_error(e: BaseException) -> bool:
    """As :func:`transient`, plus Python's own connection errors and timeouts (a tool
    is plain Python code)."""
    return transient(e) or isinstance(e, (ConnectionError, TimeoutError))


class Retries(StepMiddleware):
    """Retry classification (``on_error``), with the node's ``retry`` settings
    (``max_retries``, ``retry_delay_s``, ``backoff``, ``max_delay_s``, ``jitter``).

    * A failed try of a call (``scope="call"``) is tried again inside the step when the
      step is ``repeatable`` (model calls; tools declared ``idempotent``), the error is
      transient (:func:`transient`; for tools also :func:`transient_tool_error`) and
      tries are left: after the backoff delay, at least a server's ``Retry-After``; a
      ``STEP_RETRIED`` event records it.
    * A failed attempt (``scope="node"``) is retried through the delayed set unless the
      error is a :class:`PermanentError` (policy violations included) or the node's
      retries are spent: after the backoff delay, at least ``retry_after_s`` (a
      server's ``Retry-After``, an open circuit's remaining cool-down).

    A decision already taken by an inner middleware (``failure.retry`` not None) stands.
    """

    def on_error(self, failure: Failure) -> None:
        if failure.retry is not None:
            return
        if failure.scope == "call":
            self._in_step(failure)
        else:
            self._node(failure)

    def _in_step(self, f: Failure) -> None:
        step, e, node = f.step, f.error, f.node
        number = f.call.number if f.call is not None else 1
        retry = (node.retry if node is not None else None) or NO_RETRY
        ok = transient_tool_error(e) if step is not None and step.kind == "tool" else transient(e)
        if step is None or not step.repeatable or not ok or number > (retry.max_retries or 0):
            f.retry = False
            return
        delay = backoff_delay_s(retry, number)
        hint = getattr(e, "retry_after_s", None)
        if hint:
            delay = max(delay, float(hint))
        f.retry, f.delay_s = True, delay
        if node is not None:
            node.emit(
                EventType.STEP_RETRIED,
                {
                    "seq": step.seq,
                    "kind": step.kind,
                    "name": step.name,
                    "retry": number,
                    "delay_ms": int(delay * 1000),
                    "error": f"{type(e).__name__}: {e}",
                },
            )

    def _node(self, f: Failure) -> None:
        e, node = f.error, f.node
        retry = node.retry if node is not None else None
        if isinstance(e, PermanentError) or node is None or retry is None:
            f.retry = False
            return
        if node.job.retries >= (retry.max_retries or 0):
            f.retry = False
            return
        delay = backoff_delay_s(retry, node.job.retries + 1)
        if isinstance(e, TransientError) and e.retry_after_s:
            delay = max(delay, e.retry_after_s)
        f.retry, f.delay_s = True, delay


class Timeouts(StepMiddleware):
    """The attempt's time limit. ``before_node`` sets ``node.time_limit_s``: the node's
    ``timeout_s``, or what is left of the run's ``timeout_s`` (counted from its first
    claim) if that is less (``limit_scope`` ``run``); a run already out of time fails
    the attempt at once (``PolicyViolation timeout_s``, scope ``run``). The worker runs
    the attempt under that limit; ``on_error`` turns the attempt's timeout
    (``node.timed_out``) into ``PolicyViolation timeout_s``, never retried, naming the
    seconds the node's code blocked the worker's event loop, if it did."""

    def before_node(self, node: NodeAttempt) -> None:
        if node.spec is None or node.policy is None:
            return
        limit, scope, run_elapsed = node.policy.timeout_s, "node", 0.0
        run_timeout = node.spec.policy.timeout_s
        started_at_ms = node.runtime.started_at_ms if node.runtime is not None else 0
        if run_timeout is not None and started_at_ms:
            run_elapsed = max(0.0, time.time() - started_at_ms / 1000)
            left = run_timeout - run_elapsed
            if left <= 0:
                raise PolicyViolation("timeout_s", run_timeout, round(run_elapsed, 3), scope="run")
            if limit is None or left < limit:
                limit, scope = left, "run"
        node.time_limit_s, node.limit_scope, node.run_elapsed_s = limit, scope, run_elapsed

    def on_error(self, failure: Failure) -> None:
        node = failure.node
        if failure.scope == "node" and node is not None and node.timed_out:
            failure.error = self.violation(node)

    @staticmethod
    def violation(node: NodeAttempt) -> PolicyViolation:
        """The ``timeout_s`` violation of an attempt that ran out of time now."""
        elapsed = round(time.monotonic() - node.started, 3)
        blocked = node.blocked_s
        detail = f"the node's code blocked the worker's event loop for {blocked:.1f} s" if blocked else ""
        if node.limit_scope == "run" and node.spec is not None:
            return PolicyViolation(
                "timeout_s",
                node.spec.policy.timeout_s,
                round(node.run_elapsed_s + elapsed, 3),
                detail,
                scope="run",
            )
        return PolicyViolation("timeout_s", node.policy.timeout_s if node.policy else None, elapsed, detail)


class Costs(StepMiddleware):
    """Prices each model step: ``step.price`` from the run's prices (the model's
    ``pricing``, ``OAO_PRICES_FILE``, the built-in table; ``oao_common/pricing.py``).
    Budgets, reservations and the recorded cost all use ``step.price``; a middleware
    placed after this one may change it."""

    def before_step(self, step: StepInfo, usage: Usage) -> None:
        node = step.node
        if step.kind == "llm" and node is not None and node.runtime is not None:
            step.price = node.runtime.prices.get(step.name, FREE)


class Metrics(StepMiddleware):
    """Prometheus metrics of attempts and steps (``oao_common/metrics.py``):
    ``oao_active_agents``, ``oao_executions_total``, ``oao_execution_duration_seconds``,
    ``oao_stale_writes_total`` (of attempts), ``oao_steps_total``,
    ``oao_step_duration_seconds``, ``oao_token_usage_total``, ``oao_cost_usd_total``,
    ``oao_tool_calls_total`` (per try of a tool call, by outcome), ``oao_retries_total``,
    ``oao_rate_limit_waits_total`` and ``oao_rate_limit_wait_seconds_total`` (by limiter
    key), ``oao_policy_violations_total``."""

    def before_node(self, node: NodeAttempt) -> None:
        metrics.ACTIVE_AGENTS.inc()
        node.state[self] = True

    def after_node(self, node: NodeAttempt) -> None:
        if node.state.pop(self, False):
            metrics.ACTIVE_AGENTS.dec()
        outcome, kind = node.outcome, node.agent_type
        if outcome in (None, "cancelled", "abandoned", "watchdog"):
            return
        if outcome == "stale" and isinstance(node.error, StaleAttemptError):
            metrics.STALE_WRITES.inc()  # a fenced write was rejected mid-attempt
            metrics.EXECUTIONS.labels("stale", kind).inc()
            return
        if outcome == "stale":
            metrics.STALE_WRITES.inc()
        elif outcome == "retry":
            metrics.RETRIES.labels("node").inc()
        metrics.EXECUTIONS.labels(outcome, kind).inc()
        metrics.EXECUTION_SECONDS.labels(kind).observe(time.monotonic() - node.started)

    def after_step(self, step: StepInfo, usage: Usage) -> None:
        if step.replayed:
            metrics.STEPS.labels(step.kind, "replayed").inc()
            return
        if step.error is not None:
            return
        metrics.STEPS.labels(step.kind, "executed").inc()
        metrics.STEP_SECONDS.labels(step.kind).observe(step.duration_ms / 1000)
        if step.kind == "llm":
            metrics.TOKENS.labels(step.name, "input").inc(step.tokens_in)
            metrics.TOKENS.labels(step.name, "output").inc(step.tokens_out)
            if step.cost_usd:
                metrics.COST_USD.labels(step.name).inc(step.cost_usd)

    def after_call(self, call: CallTry, error: BaseException | None) -> None:
        if call.step.kind == "tool" and call.made:
            metrics.TOOL_CALLS.labels(call.step.name, "ok" if error is None else "error").inc()

    def on_event(self, node: NodeAttempt, type_: str, data: dict[str, Any]) -> None:
        if type_ == EventType.RATE_LIMIT_WAIT:
            key = str(data.get("key", "?"))
            metrics.RATE_LIMIT_WAITS.labels(key).inc()
            metrics.RATE_LIMIT_WAIT_SECONDS.labels(key).inc(float(data.get("wait_s") or 0.0))
        elif type_ == EventType.STEP_RETRIED:
            metrics.RETRIES.labels("step").inc()
        elif type_ == EventType.POLICY_VIOLATION:
            metrics.POLICY_VIOLATIONS.labels(data.get("rule", "?"), data.get("scope", "node")).inc()


class Builtins:
    """The worker-wide built-in middleware instances (one set per worker)."""

    def __init__(self, broker: Any, limiter: RateLimiter, breaker: CircuitBreaker) -> None:
        self.metrics = Metrics()
        self.retries = Retries()
        self.timeouts = Timeouts()
        self.costs = Costs()
        self.run_budgets = RunBudgets(broker)
        self.rate_limits = RateLimits(limiter)
        self.circuit_breakers = CircuitBreakers(breaker)


def node_policy(node: NodeAttempt) -> StrictPolicy | None:
    """The node's :class:`StrictPolicy` (None before the spec is loaded)."""
    if node.policy is None or node.agent_spec is None:
        return None
    agent = node.agent_spec
    return StrictPolicy(node.policy, agent.tools, agent.deny_tools)


def compose(
    builtins: Builtins,
    *,
    node_policy: StepMiddleware | None = None,
    observers: Sequence[StepMiddleware] = (),
    policies: Iterable[StepMiddleware] = (),
) -> list[StepMiddleware]:
    """The chain of one attempt, outermost first: ``Metrics``, then ``observers``
    (event listeners; tracing goes here), ``Retries``, ``Timeouts``, ``Costs``, the
    node's ``node_policy`` (its :class:`StrictPolicy`), ``policies`` (plugin
    middleware: worker-wide, then the spec's), ``RunBudgets``, ``RateLimits``,
    ``CircuitBreakers``."""
    b = builtins
    return [
        b.metrics,
        *observers,
        b.retries,
        b.timeouts,
        b.costs,
        *([node_policy] if node_policy is not None else []),
        *policies,
        b.run_budgets,
        b.rate_limits,
        b.circuit_breakers,
    ]
