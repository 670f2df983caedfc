"""Fleet-wide circuit breakers, one per model, provider or tool, shared through Redis.

A worker asks :meth:`CircuitBreaker.before_call` for a :class:`Permit` before calling
a dependency and reports the outcome with :meth:`CircuitBreaker.record`. The state
lives in one Redis hash per key and changes only inside ``oao_common/lua/circuit.lua``,
so every worker of the fleet trips, waits and probes together: once a provider is
down, the whole fleet stops hammering it, not each worker after its own ten failures.

State machine (Nygard, *Release It!*, 2nd ed., ch. 5 "Circuit Breaker"; the rolling
window and half-open probe count follow Resilience4j's ``CircuitBreaker``):

* ``closed``: calls pass; outcomes are counted in a rolling window of ``window_s``
  seconds, kept as :data:`WINDOW_BUCKETS` buckets of ``window_s / WINDOW_BUCKETS``
  (the window is the current bucket and the ones before it, so it spans between
  ``window_s * (N-1)/N`` and ``window_s``). When the window holds at least
  ``min_calls`` calls and ``failures / calls >= failure_ratio``, the circuit opens.
* ``open``: calls fail fast with :class:`CircuitOpenError` until ``cool_down_s`` has
  passed since the trip; then the next call turns it ``half_open``.
* ``half_open``: up to ``half_open_probes`` calls at once are admitted as probes; the
  others fail fast. A probe success closes the circuit (window reset); a probe failure
  opens it again for a new cool-down. A probe whose worker crashed stops holding its
  slot after ``probe_ttl_s``.

Outcomes of calls admitted before a trip are ignored once the circuit has opened (a
generation number in the permit), so stragglers cannot close or reopen it. All times
are the Redis server's clock.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from .errors import TransientError
from .keys import Keys
from .limits import PositiveCount, PositiveDelayS, Ratio
from .scripts import Scripts

#: Buckets of the rolling window of a closed circuit.
WINDOW_BUCKETS = 60


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreakerSpec(BaseModel):
    """When a circuit opens and how it recovers.

    ``failure_ratio`` (0..1]: share of failed calls in the window that opens it, once
    the window holds ``min_calls`` calls; ``window_s``: rolling window (seconds);
    ``cool_down_s``: how long it stays open before probing (seconds);
    ``half_open_probes``: probe calls admitted at once when half-open;
    ``probe_ttl_s``: after this long a probe that never reported stops holding its slot.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    failure_ratio: Annotated[Ratio, Field(gt=0)] = 0.5
    window_s: PositiveDelayS = 60.0
    min_calls: PositiveCount = 10
    cool_down_s: PositiveDelayS = 30.0
    half_open_probes: PositiveCount = 1
    probe_ttl_s: PositiveDelayS = 120.0


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave to call the dependency behind circuit ``key``; pass it to
    :meth:`CircuitBreaker.record` once. ``probe`` is true for a half-open probe;
    ``generation`` counts the circuit's trips when it was issued."""

    key: str
    probe: bool
    generation: int
    permit_id: str
    spec: CircuitBreakerSpec


@dataclass(frozen=True, slots=True)
class CircuitStatus:
    """A read of circuit ``key``: ``calls`` and ``failures`` in the window (closed
    only), ``retry_after_s`` until a call could be admitted (0 if now),
    ``probes_in_flight`` (half-open), ``generation`` (number of trips)."""

    key: str
    state: CircuitState
    calls: int
    failures: int
    retry_after_s: float
    probes_in_flight: int
    generation: int


class CircuitOpenError(TransientError):
    """Circuit ``key`` rejected the call without making it. Retriable:
    ``retry_after_s`` (seconds) is the time until it goes half-open (``state`` open)
    or until a probe slot may free (``state`` half_open, all probes in flight)."""

    def __init__(self, key: str, state: CircuitState, retry_after_s: float) -> None:
        self.key = key
        self.state = state
        what = "probing (all probe slots in use)" if state is CircuitState.HALF_OPEN else "open"
        super().__init__(
            f"circuit {key!r} is {what}: call rejected without trying; retry in {retry_after_s:.2f} s",
            retry_after_s=retry_after_s,
        )


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class CircuitBreaker:
    """Fleet-wide circuit breakers of one Redis connection (``decode_responses=True``)."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = Scripts(redis, keys)

    async def _call(
        self, key: str, op: str, spec: CircuitBreakerSpec, pid: str, *extra: str | int
    ) -> list[Any]:
        argv = [
            op,
            pid,
            repr(spec.failure_ratio),
            _ms(spec.window_s),
            WINDOW_BUCKETS,
            spec.min_calls,
            _ms(spec.cool_down_s),
            spec.half_open_probes,
            _ms(spec.probe_ttl_s),
            *extra,
        ]
        return list(await self.scripts.call("circuit", [self.keys.circuit(key)], argv))

    async def before_call(self, key: str, spec: CircuitBreakerSpec | None = None) -> Permit:
        """A permit to call the dependency behind ``key`` (closed: a plain call;
        half-open: a probe, if a probe slot is free).

        Raises :class:`CircuitOpenError` (retriable, with ``retry_after_s``) when the
        circuit is open or all half-open probe slots are taken.
        """
        spec = spec or CircuitBreakerSpec()
        pid = secrets.token_hex(8)
        r = await self._call(key, "before", spec, pid)
        if r[0] == 1:
            return Permit(key, r[1] == "probe", int(r[2]), pid, spec)
        raise CircuitOpenError(key, CircuitState(r[1]), int(r[2]) / 1000)

    async def record(self, permit: Permit, success: bool) -> CircuitState:
        """Report the outcome of the call made under ``permit``; returns the circuit's
        state afterwards. Count as failures only the dependency's faults (timeouts,
        connection errors, 5xx, 429), not the caller's (4xx, policy violations)."""
        r = await self._call(
            permit.key,
            "record",
            permit.spec,
            permit.permit_id,
            "probe" if permit.probe else "call",
            permit.generation,
            "1" if success else "0",
        )
        return CircuitState(r[0])

    async def status(self, key: str, spec: CircuitBreakerSpec | None = None) -> CircuitStatus:
        """Read circuit ``key`` without changing it (as of now, server time)."""
        spec = spec or CircuitBreakerSpec()
        state, calls, failures, wait_ms, probes, gen = await self._call(key, "peek", spec, "")
        return CircuitStatus(
            key, CircuitState(state), int(calls), int(failures), int(wait_ms) / 1000, int(probes), int(gen)
        )
