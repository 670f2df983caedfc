"""Fleet-wide guards around every model and tool call, as two middleware: the
distributed rate limiter (:class:`RateLimits`), then the circuit breaker
(:class:`CircuitBreakers`), both shared through Redis (``oao_common/ratelimit.py``,
``oao_common/circuit.py``, ADR 005).

Order, per try of a call (``before_call`` in chain order, ``after_call`` in reverse):
a call first waits for rate-limit capacity (reserving its worst-case tokens), then
asks the circuit for a permit; a refused permit gives the reservation back as "never
called". Afterwards the breaker hears the outcome (only the dependency's own failures
count: network errors, timeouts, 429, 5xx) and the limiter settles the reservation with
the tokens actually used; a ``Retry-After`` from the provider penalizes the limiter so
the whole fleet backs off. Their refusals (``RateLimitTimeout``, ``CircuitOpenError``)
are not retried inside the step but by the node (``oao_worker/middleware.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from oao_common import metrics
from oao_common.circuit import CircuitBreaker, CircuitBreakerSpec, CircuitOpenError, CircuitState, Permit
from oao_common.errors import TransientError
from oao_common.events import EventType
from oao_common.ratelimit import RateLimiter, RateLimitSpec, Reservation

from .governance import CallTry, StepMiddleware

_STATE_VALUE = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}
"""``oao_circuit_state``'s value of each state."""

DEFAULT_MAX_WAIT_S = 60.0
"""Longest a call waits for rate-limit capacity before failing retriably (seconds)."""


@dataclass(frozen=True, slots=True)
class Guard:
    """The guards of one model or tool: limiter / breaker ``key`` and their settings."""

    key: str
    rate_limit: RateLimitSpec | None = None
    circuit_breaker: CircuitBreakerSpec | None = None

    @property
    def active(self) -> bool:
        return self.rate_limit is not None or self.circuit_breaker is not None


def is_dependency_failure(e: BaseException) -> bool:
    """Does ``e`` say the model / tool itself is unhealthy (as opposed to our policy)?"""
    return isinstance(e, (TransientError, ConnectionError, TimeoutError)) and not isinstance(
        e, CircuitOpenError
    )


def guard_of(call: CallTry) -> Guard | None:
    """The guard of the model (``model:<name>``) or tool (``tool:<name>``) a call
    reaches, from the run's runtime (``runtime.guards_of``); None if it has none."""
    step, node = call.step, call.node
    if node is None or node.runtime is None or step.kind not in ("llm", "tool"):
        return None
    return node.runtime.guards.get(f"{'model' if step.kind == 'llm' else 'tool'}:{step.name}")


class RateLimits(StepMiddleware):
    """Waits for fleet-wide rate-limit capacity before each try (up to ``max_wait_s``
    seconds, ``RATE_LIMIT_WAIT`` events; then ``RateLimitTimeout``, retriable by the
    node), settles the token reservation after it, and turns a provider's
    ``Retry-After`` into a penalty for the whole fleet. One per worker."""

    def __init__(self, limiter: RateLimiter, max_wait_s: float = DEFAULT_MAX_WAIT_S) -> None:
        self.limiter = limiter
        self.max_wait_s = max_wait_s

    async def before_call(self, call: CallTry) -> None:
        guard = guard_of(call)
        if guard is None or guard.rate_limit is None:
            return
        node = call.node

        def on_wait(wait_s: float) -> None:
            if node is not None:
                node.emit(EventType.RATE_LIMIT_WAIT, {"key": guard.key, "wait_s": round(wait_s, 3)})

        call.state[self] = await self.limiter.acquire_wait(
            guard.key, guard.rate_limit, tokens=call.tokens, max_wait_s=self.max_wait_s, on_wait=on_wait
        )

    async def after_call(self, call: CallTry, error: BaseException | None) -> None:
        res: Reservation | None = call.state.get(self)
        if res is None:
            return
        if error is None:
            await self.limiter.settle(res, call.used_tokens)
            return
        await self.limiter.release(res, call_made=call.made)
        hint = getattr(error, "retry_after_s", None)
        if call.made and isinstance(error, TransientError) and hint:
            await self.limiter.penalize(res.name, float(hint))


class CircuitBreakers(StepMiddleware):
    """Takes a circuit permit before each try (``CircuitOpenError`` while the circuit
    is open) and reports the try's outcome; only the dependency's own failures count
    (:func:`is_dependency_failure`). One per worker."""

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker

    async def before_call(self, call: CallTry) -> None:
        guard = guard_of(call)
        if guard is None or guard.circuit_breaker is None:
            return
        try:
            call.state[self] = await self.breaker.before_call(guard.key, guard.circuit_breaker)
        except CircuitOpenError as e:
            metrics.CIRCUIT_REJECTIONS.labels(guard.key).inc()
            metrics.CIRCUIT_STATE.labels(guard.key).set(_STATE_VALUE.get(e.state, 2))
            raise

    async def after_call(self, call: CallTry, error: BaseException | None) -> None:
        permit: Permit | None = call.state.get(self)
        if permit is None or not call.made:
            return
        state = await self.breaker.record(permit, error is None or not is_dependency_failure(error))
        metrics.CIRCUIT_STATE.labels(permit.key).set(_STATE_VALUE.get(state, 0))
