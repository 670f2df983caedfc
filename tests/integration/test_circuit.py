"""The fleet-wide circuit breaker against a real server: trip on the failure ratio,
fail fast while open, half-open probes, close on a probe success, reopen on a probe
failure, probe leases, stale outcomes, two connections.

Assertions are on states and counts. An "open" state is asserted only under a
cool-down of an hour; half-open tests use short cool-downs and poll the state (a read
that changes nothing) until the server's clock has passed them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from pydantic import ValidationError

from oao_common.broker import Broker
from oao_common.circuit import (
    CircuitBreaker,
    CircuitBreakerSpec,
    CircuitOpenError,
    CircuitState,
    Permit,
)
from oao_common.connection import connect
from oao_common.errors import TransientError
from oao_common.keys import Keys

LONG = CircuitBreakerSpec(min_calls=4, failure_ratio=0.5, cool_down_s=3600)
# One failure trips it; a short cool-down so tests can reach half_open.
SHORT = CircuitBreakerSpec(min_calls=1, failure_ratio=1.0, cool_down_s=0.2, half_open_probes=2)


@pytest.fixture
def cb(broker: Broker) -> CircuitBreaker:
    return CircuitBreaker(broker.redis, broker.keys)


@pytest.fixture
async def cb2(redis_url: str, prefix: str) -> AsyncIterator[CircuitBreaker]:
    """A second connection with the same prefix: another worker process."""
    r = connect(redis_url)
    try:
        yield CircuitBreaker(r, Keys(prefix))
    finally:
        await r.aclose()


async def outcome(cb: CircuitBreaker, key: str, spec: CircuitBreakerSpec, ok: bool) -> CircuitState:
    return await cb.record(await cb.before_call(key, spec), ok)


async def trip(cb: CircuitBreaker, key: str, spec: CircuitBreakerSpec) -> None:
    for _ in range(spec.min_calls):
        await outcome(cb, key, spec, False)
    assert (await cb.status(key, spec)).state is CircuitState.OPEN


async def until_half_open(cb: CircuitBreaker, key: str, spec: CircuitBreakerSpec) -> None:
    for _ in range(200):
        s = await cb.status(key, spec)
        if s.state is CircuitState.HALF_OPEN:
            return
        await asyncio.sleep(max(0.01, s.retry_after_s))
    raise AssertionError("circuit never went half-open")


def test_spec_defaults_and_validation() -> None:
    s = CircuitBreakerSpec()
    assert (s.failure_ratio, s.window_s, s.min_calls, s.cool_down_s, s.half_open_probes) == (
        0.5,
        60,
        10,
        30,
        1,
    )
    with pytest.raises(ValidationError):
        CircuitBreakerSpec(threshold=0.5)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        CircuitBreakerSpec(failure_ratio=0)


async def test_opens_after_threshold_and_fails_fast(cb: CircuitBreaker) -> None:
    assert await outcome(cb, "model:m", LONG, True) is CircuitState.CLOSED
    assert await outcome(cb, "model:m", LONG, True) is CircuitState.CLOSED
    assert await outcome(cb, "model:m", LONG, False) is CircuitState.CLOSED  # 3 calls < min_calls
    s = await cb.status("model:m", LONG)
    assert (s.state, s.calls, s.failures, s.generation) == (CircuitState.CLOSED, 3, 1, 0)
    assert await outcome(cb, "model:m", LONG, False) is CircuitState.OPEN  # 2 of 4 failed
    s = await cb.status("model:m", LONG)
    assert s.state is CircuitState.OPEN and s.generation == 1 and 60 < s.retry_after_s <= 3600
    for _ in range(3):
        with pytest.raises(CircuitOpenError) as ei:
            await cb.before_call("model:m", LONG)
        e = ei.value
        assert isinstance(e, TransientError) and e.state is CircuitState.OPEN and e.key == "model:m"
        assert e.retry_after_s is not None and 60 < e.retry_after_s <= 3600
        assert "model:m" in str(e) and "open" in str(e)
    assert (await cb.status("other", LONG)).state is CircuitState.CLOSED  # per key


async def test_min_calls_and_ratio(cb: CircuitBreaker) -> None:
    spec = CircuitBreakerSpec(min_calls=10, failure_ratio=0.5, cool_down_s=3600)
    for _ in range(4):
        assert await outcome(cb, "k", spec, False) is CircuitState.CLOSED  # below min_calls
    for _ in range(6):
        assert await outcome(cb, "k", spec, True) is CircuitState.CLOSED  # 4 of 10 < 0.5
    assert await outcome(cb, "k", spec, False) is CircuitState.CLOSED  # 5 of 11
    assert await outcome(cb, "k", spec, False) is CircuitState.OPEN  # 6 of 12


async def test_outcomes_leave_the_rolling_window(cb: CircuitBreaker) -> None:
    spec = CircuitBreakerSpec(min_calls=2, failure_ratio=0.5, window_s=0.3, cool_down_s=3600)
    assert await outcome(cb, "k", spec, False) is CircuitState.CLOSED
    await asyncio.sleep(0.4)  # longer than the window: that failure is out
    assert (await cb.status("k", spec)).calls == 0
    assert await outcome(cb, "k", spec, False) is CircuitState.CLOSED
    s = await cb.status("k", spec)
    assert (s.calls, s.failures) == (1, 1)


async def test_one_trip_for_many_concurrent_failures(cb: CircuitBreaker) -> None:
    permits = await asyncio.gather(*(cb.before_call("k", LONG) for _ in range(20)))
    assert all(not p.probe and p.generation == 0 for p in permits)
    await asyncio.gather(*(cb.record(p, False) for p in permits))
    s = await cb.status("k", LONG)
    assert s.state is CircuitState.OPEN and s.generation == 1


async def test_outcomes_of_calls_from_before_a_trip_are_ignored(cb: CircuitBreaker) -> None:
    early = await cb.before_call("k", LONG)
    await trip(cb, "k", LONG)
    assert await cb.record(early, True) is CircuitState.OPEN
    assert await cb.record(early, False) is CircuitState.OPEN
    assert (await cb.status("k", LONG)).generation == 1


async def test_half_open_admits_exactly_the_probes_and_a_success_closes(cb: CircuitBreaker) -> None:
    await trip(cb, "tool:t", SHORT)
    await until_half_open(cb, "tool:t", SHORT)
    results = await asyncio.gather(
        *(cb.before_call("tool:t", SHORT) for _ in range(6)), return_exceptions=True
    )
    probes = [r for r in results if isinstance(r, Permit)]
    rejected = [r for r in results if isinstance(r, CircuitOpenError)]
    assert len(probes) == 2 and len(rejected) == 4
    assert all(p.probe and p.generation == 1 for p in probes)
    assert all(e.state is CircuitState.HALF_OPEN and (e.retry_after_s or 0) > 0 for e in rejected)
    assert "tool:t" in str(rejected[0])
    s = await cb.status("tool:t", SHORT)
    assert s.state is CircuitState.HALF_OPEN and s.probes_in_flight == 2

    assert await cb.record(probes[0], True) is CircuitState.CLOSED
    # the other probe's late failure cannot reopen the closed circuit
    assert await cb.record(probes[1], False) is CircuitState.CLOSED
    p = await cb.before_call("tool:t", SHORT)
    assert not p.probe
    s = await cb.status("tool:t", SHORT)
    assert (s.state, s.calls, s.failures, s.generation) == (CircuitState.CLOSED, 0, 0, 1)


async def test_probe_failure_reopens(cb: CircuitBreaker) -> None:
    await trip(cb, "k", SHORT)
    await until_half_open(cb, "k", SHORT)
    # The cool-down of a new trip is the one of the spec it is recorded with; an hour
    # here, so "open" can be asserted however slow the machine is.
    probe = await cb.before_call("k", LONG)
    assert probe.probe
    assert await cb.record(probe, False) is CircuitState.OPEN
    with pytest.raises(CircuitOpenError) as ei:
        await cb.before_call("k", LONG)
    assert ei.value.state is CircuitState.OPEN and (ei.value.retry_after_s or 0) > 60
    assert (await cb.status("k", LONG)).generation == 2


async def test_probe_of_a_crashed_worker_expires(cb: CircuitBreaker) -> None:
    spec = CircuitBreakerSpec(min_calls=1, failure_ratio=1.0, cool_down_s=0.2, probe_ttl_s=0.2)
    await trip(cb, "k", spec)
    await until_half_open(cb, "k", spec)
    lost = await cb.before_call("k", spec)  # its worker dies: never recorded
    assert lost.probe
    for _ in range(200):
        try:
            probe = await cb.before_call("k", spec)
            break
        except CircuitOpenError as e:
            assert e.state is CircuitState.HALF_OPEN
            assert e.retry_after_s is not None and 0 < e.retry_after_s <= 0.2
            await asyncio.sleep(e.retry_after_s)
    else:
        raise AssertionError("the lost probe's slot never freed")
    assert probe.probe and probe.permit_id != lost.permit_id
    assert await cb.record(probe, True) is CircuitState.CLOSED


async def test_state_is_shared_between_connections(cb: CircuitBreaker, cb2: CircuitBreaker) -> None:
    # outcomes add up: neither worker alone reaches min_calls
    assert await outcome(cb, "provider:p", LONG, False) is CircuitState.CLOSED
    assert await outcome(cb2, "provider:p", LONG, False) is CircuitState.CLOSED
    assert await outcome(cb, "provider:p", LONG, True) is CircuitState.CLOSED
    assert await outcome(cb2, "provider:p", LONG, True) is CircuitState.OPEN
    with pytest.raises(CircuitOpenError):
        await cb.before_call("provider:p", LONG)
    with pytest.raises(CircuitOpenError):
        await cb2.before_call("provider:p", LONG)

    # a probe taken by one worker is counted for all; its success closes it for all
    await trip(cb, "tool:t", SHORT)
    await until_half_open(cb2, "tool:t", SHORT)
    spec1 = SHORT.model_copy(update={"half_open_probes": 1})
    probe = await cb.before_call("tool:t", spec1)
    with pytest.raises(CircuitOpenError) as ei:
        await cb2.before_call("tool:t", spec1)
    assert ei.value.state is CircuitState.HALF_OPEN
    assert await cb.record(probe, True) is CircuitState.CLOSED
    assert not (await cb2.before_call("tool:t", spec1)).probe


async def test_circuit_key_expires_when_idle(cb: CircuitBreaker, broker: Broker) -> None:
    await outcome(cb, "k", LONG, True)
    assert 0 < await broker.redis.pttl(broker.keys.circuit("k")) <= 60_000 + 2000
    await trip(cb, "k2", LONG)
    assert await broker.redis.pttl(broker.keys.circuit("k2")) > 3600_000
