"""Fleet-wide guards around every model and tool call: the distributed rate limiter,
then the circuit breaker (both shared through Redis, see ``oao_common/ratelimit.py``,
``oao_common/circuit.py`` and ADR 005).

Order: a call first waits for rate-limit capacity (reserving its worst-case tokens),
then asks the circuit for a permit; a refused permit gives the reservation back as
"never called". Afterwards the breaker hears the outcome (only the dependency's own
failures count: network errors, timeouts, 429, 5xx) and the limiter settles the
reservation with the tokens actually used; a ``Retry-After`` from the provider
penalizes the limiter so the whole fleet backs off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from oao_common import metrics
from oao_common.circuit import CircuitBreaker, CircuitBreakerSpec, CircuitOpenError, CircuitState
from oao_common.errors import TransientError
from oao_common.ratelimit import RateLimiter, RateLimitSpec, Reservation

T = TypeVar("T")

_STATE_VALUE = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}

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


class CallGuards:
    """One per worker process; shared by all its nodes."""

    def __init__(self, limiter: RateLimiter, breaker: CircuitBreaker, max_wait_s: float = DEFAULT_MAX_WAIT_S):
        self.limiter = limiter
        self.breaker = breaker
        self.max_wait_s = max_wait_s

    async def call(
        self,
        guard: Guard | None,
        tokens: int,
        fn: Callable[[], Awaitable[T]],
        used_tokens: Callable[[T], int],
        on_wait: Callable[[float], None],
    ) -> T:
        """Run ``fn`` under ``guard``. ``tokens``: worst-case tokens to reserve.

        Raises ``RateLimitTimeout`` (retriable) after waiting ``max_wait_s`` seconds for
        capacity, ``CircuitOpenError`` (retriable, with ``retry_after_s``) while the
        circuit is open, and whatever ``fn`` raises.
        """
        if guard is None or not guard.active:
            return await fn()
        res: Reservation | None = None
        if guard.rate_limit is not None:
            res = await self.limiter.acquire_wait(
                guard.key, guard.rate_limit, tokens=tokens, max_wait_s=self.max_wait_s, on_wait=on_wait
            )
        permit = None
        if guard.circuit_breaker is not None:
            try:
                permit = await self.breaker.before_call(guard.key, guard.circuit_breaker)
            except CircuitOpenError as e:
                metrics.CIRCUIT_REJECTIONS.labels(guard.key).inc()
                metrics.CIRCUIT_STATE.labels(guard.key).set(_STATE_VALUE.get(e.state, 2))
                if res is not None:
                    await self.limiter.release(res, call_made=False)
                raise
        try:
            out = await fn()
        except BaseException as e:
            with contextlib.suppress(Exception):
                if permit is not None:
                    st = await self.breaker.record(permit, not is_dependency_failure(e))
                    metrics.CIRCUIT_STATE.labels(guard.key).set(_STATE_VALUE.get(st, 0))
                if res is not None:
                    await self.limiter.release(res)
                hint = getattr(e, "retry_after_s", None)
                if guard.rate_limit is not None and isinstance(e, TransientError) and hint:
                    await self.limiter.penalize(guard.key, float(hint))
            raise
        if permit is not None:
            st = await self.breaker.record(permit, True)
            metrics.CIRCUIT_STATE.labels(guard.key).set(_STATE_VALUE.get(st, 0))
        if res is not None:
            await self.limiter.settle(res, used_tokens(out))
        return out
