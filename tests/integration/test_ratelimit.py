"""The fleet-wide rate limiter against a real server: all-or-nothing admission over
tiers, waits, reservation refunds, concurrency leases, penalties, two connections.

Assertions are on counts and states. Long windows (hour, day) keep refill negligible
during a test; refill itself is tested with 1-second windows (``Tiers`` of ``Bucket``)
through ``acquire_wait``, which loops until admitted whatever the machine's load.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from pydantic import ValidationError

from oao_common.broker import Broker
from oao_common.connection import connect
from oao_common.errors import PermanentError, TransientError
from oao_common.keys import Keys
from oao_common.ratelimit import (
    Bucket,
    RateLimiter,
    RateLimitSpec,
    RateLimitTimeout,
    RateLimitTooLarge,
    Reservation,
    Throttled,
    Tiers,
    retry_after_from_headers,
)

# Refill over a whole test run is below 0.01 of a unit for these day-long buckets.
TOL = 0.05


@pytest.fixture
def rl(broker: Broker) -> RateLimiter:
    return RateLimiter(broker.redis, broker.keys)


@pytest.fixture
async def rl2(redis_url: str, prefix: str) -> AsyncIterator[RateLimiter]:
    """A second connection with the same prefix: another worker process."""
    r = connect(redis_url)
    try:
        yield RateLimiter(r, Keys(prefix))
    finally:
        await r.aclose()


def test_spec_maps_tiers_to_windows() -> None:
    t = RateLimitSpec(rpm=10, rph=100, rpd=1000, tpm=5000, tpd=90000, max_concurrent=4).tiers()
    assert [(b.name, b.unit, b.limit, b.window_s) for b in t.buckets] == [
        ("rpm", "requests", 10, 60.0),
        ("rph", "requests", 100, 3600.0),
        ("rpd", "requests", 1000, 86400.0),
        ("tpm", "tokens", 5000, 60.0),
        ("tpd", "tokens", 90000, 86400.0),
    ]
    assert t.max_concurrent == 4
    assert RateLimitSpec().tiers() == Tiers()
    with pytest.raises(ValidationError):
        RateLimitSpec(rpx=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        RateLimitSpec(rpm=0)


async def test_exactly_the_limit_is_admitted_of_concurrent_calls(rl: RateLimiter) -> None:
    spec = RateLimitSpec(rph=10)
    results = await asyncio.gather(*(rl.acquire("model:m", spec) for _ in range(50)))
    admitted = [r for r in results if isinstance(r, Reservation)]
    throttled = [r for r in results if isinstance(r, Throttled)]
    assert len(admitted) == 10 and len(throttled) == 40
    assert all(t.blocked_by == ("rph",) and 0 < t.wait_s <= 3600 for t in throttled)


async def test_all_tiers_or_none(rl: RateLimiter) -> None:
    spec = RateLimitSpec(rpd=5, tpd=100)
    assert isinstance(await rl.acquire("m", spec, tokens=80), Reservation)
    t = await rl.acquire("m", spec, tokens=50)
    assert isinstance(t, Throttled) and t.blocked_by == ("tpd",)
    s = await rl.state("m", spec)
    assert s.levels["rpd"] == pytest.approx(4, abs=TOL)  # the refused call took no request
    assert s.levels["tpd"] == pytest.approx(20, abs=TOL)
    assert isinstance(await rl.acquire("m", spec, tokens=20), Reservation)


async def test_wait_is_the_longest_over_blocking_tiers(rl: RateLimiter) -> None:
    tiers = Tiers((Bucket("a", "requests", 1, 10.0), Bucket("b", "requests", 1, 100.0)))
    assert isinstance(await rl.acquire("m", tiers), Reservation)
    t = await rl.acquire("m", tiers)
    assert isinstance(t, Throttled) and t.blocked_by == ("a", "b")
    assert 10 < t.wait_s <= 100


async def test_settle_refunds_unused_tokens_and_release_refunds_all(rl: RateLimiter) -> None:
    spec = RateLimitSpec(rpd=100, tpd=1000)
    res = await rl.acquire("m", spec, tokens=600)
    assert isinstance(res, Reservation)
    assert (await rl.state("m", spec)).levels["tpd"] == pytest.approx(400, abs=TOL)
    await rl.settle(res, actual_tokens=100)
    assert (await rl.state("m", spec)).levels["tpd"] == pytest.approx(900, abs=TOL)
    await rl.settle(res, actual_tokens=0)  # a second settle is a no-op
    await rl.release(res)
    assert (await rl.state("m", spec)).levels["tpd"] == pytest.approx(900, abs=TOL)

    res = await rl.acquire("m", spec, tokens=300)
    assert isinstance(res, Reservation)
    await rl.release(res)
    s = await rl.state("m", spec)
    assert s.levels["tpd"] == pytest.approx(900, abs=TOL)
    assert s.levels["rpd"] == pytest.approx(98, abs=TOL)  # failed calls still count as requests

    res = await rl.acquire("m", spec, tokens=300)
    assert isinstance(res, Reservation)
    await rl.release(res, call_made=False)  # never attempted: the request comes back too
    s = await rl.state("m", spec)
    assert s.levels["tpd"] == pytest.approx(900, abs=TOL)
    assert s.levels["rpd"] == pytest.approx(98, abs=TOL)


async def test_refund_is_capped_at_capacity(rl: RateLimiter) -> None:
    tiers = Tiers((Bucket("tps", "tokens", 100, 0.2),))
    res = await rl.acquire("m", tiers, tokens=50)
    assert isinstance(res, Reservation)
    await asyncio.sleep(0.3)  # longer than the window: the bucket is full again
    await rl.release(res)
    assert (await rl.state("m", tiers)).levels["tps"] == 100


async def test_settle_above_reservation_charges_the_difference(rl: RateLimiter) -> None:
    spec = RateLimitSpec(tpd=1000)
    res = await rl.acquire("m", spec, tokens=100)
    assert isinstance(res, Reservation)
    await rl.settle(res, actual_tokens=150)
    assert (await rl.state("m", spec)).levels["tpd"] == pytest.approx(850, abs=TOL)


async def test_too_large_a_call_is_permanent(rl: RateLimiter) -> None:
    with pytest.raises(RateLimitTooLarge) as ei:
        await rl.acquire("m", RateLimitSpec(tpm=100, rpm=10), tokens=101)
    assert isinstance(ei.value, PermanentError) and ei.value.bucket == "tpm"


async def test_bucket_refills_over_its_window(rl: RateLimiter) -> None:
    tiers = Tiers((Bucket("rps", "requests", 5, 1.0),))
    got = await asyncio.gather(*(rl.acquire("m", tiers) for _ in range(6)))
    assert sum(isinstance(r, Reservation) for r in got) == 5
    [t] = [r for r in got if isinstance(r, Throttled)]
    assert 0 < t.wait_s <= 0.2  # one unit of 5 per second: at most 1/5 s away
    waits: list[float] = []
    for _ in range(3):  # 3 more: each needs a refill
        res = await rl.acquire_wait("m", tiers, max_wait_s=10, on_wait=waits.append)
        assert isinstance(res, Reservation)
    assert all(0 < w <= 0.2 for w in waits)


async def test_acquire_wait_calls_on_wait_and_retries(rl: RateLimiter) -> None:
    tiers = Tiers(max_concurrent=1)
    holder = await rl.acquire("m", tiers)
    assert isinstance(holder, Reservation)
    waits: list[float] = []

    async def on_wait(wait_s: float) -> None:
        waits.append(wait_s)
        await rl.settle(holder, 0)  # the holder finishes while we wait

    res = await rl.acquire_wait("m", tiers, max_wait_s=10, on_wait=on_wait)
    assert isinstance(res, Reservation) and res.holds_slot
    assert len(waits) >= 1 and all(0 < w <= rl.concurrency_poll_s for w in waits)
    assert (await rl.state("m", tiers)).in_flight == 1


async def test_acquire_wait_times_out_without_taking(rl: RateLimiter) -> None:
    spec = RateLimitSpec(rph=1, tpd=100)
    assert isinstance(await rl.acquire("m", spec, tokens=10), Reservation)
    called: list[float] = []
    with pytest.raises(RateLimitTimeout) as ei:
        await rl.acquire_wait("m", spec, tokens=10, max_wait_s=0.5, on_wait=called.append)
    e = ei.value
    assert isinstance(e, TransientError) and e.blocked_by == ("rph",)
    assert e.retry_after_s is not None and 0.5 < e.retry_after_s <= 3600
    assert called == []  # it gave up at once: the wait was longer than its patience
    assert (await rl.state("m", spec)).levels["tpd"] == pytest.approx(90, abs=TOL)
    with pytest.raises(RateLimitTimeout):
        await rl.acquire_wait("m", spec, max_wait_s=0)


async def test_concurrency_cap_is_never_exceeded(rl: RateLimiter) -> None:
    tiers = RateLimitSpec(max_concurrent=3)
    burst = await asyncio.gather(*(rl.acquire("tool:t", tiers) for _ in range(10)))
    held = [r for r in burst if isinstance(r, Reservation)]
    assert len(held) == 3
    assert all(r.blocked_by == ("concurrency",) for r in burst if isinstance(r, Throttled))
    for r in held:
        await rl.release(r)

    in_flight = max_in_flight = done = 0

    async def caller() -> None:
        nonlocal in_flight, max_in_flight, done
        res = await rl.acquire_wait("tool:t", tiers, max_wait_s=30)
        in_flight += 1
        max_in_flight = max(max_in_flight, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        await rl.settle(res, 0)
        done += 1

    await asyncio.gather(*(caller() for _ in range(10)))
    assert done == 10 and 1 <= max_in_flight <= 3
    assert (await rl.state("tool:t", tiers)).in_flight == 0


async def test_slot_of_a_crashed_holder_expires(rl: RateLimiter) -> None:
    tiers = Tiers(max_concurrent=1)
    crashed = await rl.acquire("m", tiers)  # default lease: 300 s
    assert isinstance(crashed, Reservation)
    t = await rl.acquire("m", tiers)
    assert isinstance(t, Throttled) and t.blocked_by == ("concurrency",)
    # its last renewal gave it 0.2 s more; then the holder "crashes" (never settles)
    assert await rl.extend(crashed, lease_ttl_s=0.2)
    res = await rl.acquire_wait("m", tiers, max_wait_s=10)
    assert isinstance(res, Reservation)
    assert not await rl.extend(crashed)  # its lease is gone
    assert (await rl.state("m", tiers)).in_flight == 1

    short = await rl.acquire("n", tiers, lease_ttl_s=0.1)
    assert isinstance(short, Reservation)
    assert isinstance(await rl.acquire_wait("n", tiers, max_wait_s=10), Reservation)


async def test_penalize_blocks_admissions(rl: RateLimiter) -> None:
    spec = RateLimitSpec(rpd=100)
    await rl.penalize("provider:p", 3600)
    await rl.penalize("provider:p", 1)  # a shorter penalty does not cut a longer one
    t = await rl.acquire("provider:p", spec)
    assert isinstance(t, Throttled) and t.blocked_by == ("penalty",)
    assert 1 < t.wait_s <= 3600
    s = await rl.state("provider:p", spec)
    assert 1 < s.penalty_s <= 3600 and s.levels["rpd"] == pytest.approx(100, abs=TOL)

    await rl.penalize("provider:q", 0.2)
    res = await rl.acquire_wait("provider:q", spec, max_wait_s=10)
    assert isinstance(res, Reservation)


async def test_two_connections_share_the_limit(rl: RateLimiter, rl2: RateLimiter) -> None:
    spec = RateLimitSpec(rph=10, max_concurrent=20)
    results = await asyncio.gather(
        *(rl.acquire("model:m", spec) for _ in range(15)),
        *(rl2.acquire("model:m", spec) for _ in range(15)),
    )
    admitted = [r for r in results if isinstance(r, Reservation)]
    assert len(admitted) == 10
    assert (await rl2.state("model:m", spec)).in_flight == 10
    for r in admitted[:5]:
        await rl2.settle(r, 0)  # another worker may settle: the lease id is what counts
    assert (await rl.state("model:m", spec)).in_flight == 5

    await rl.penalize("provider:p", 3600)
    t = await rl2.acquire("provider:p", RateLimitSpec())
    assert isinstance(t, Throttled) and t.blocked_by == ("penalty",)


async def test_limiter_keys_expire_when_idle(rl: RateLimiter, broker: Broker) -> None:
    spec = RateLimitSpec(rpm=10, max_concurrent=2)
    res = await rl.acquire("m", spec, lease_ttl_s=5)
    assert isinstance(res, Reservation)
    assert 0 < await broker.redis.pttl(broker.keys.ratelimit("m")) <= 2 * 60_000 + 1000
    assert 0 < await broker.redis.pttl(broker.keys.ratelimit_slots("m")) <= 5000 + 1000


def test_retry_after_from_headers() -> None:
    assert retry_after_from_headers({"Retry-After": "7"}) == 7
    assert retry_after_from_headers({"retry-after-ms": "250", "retry-after": "1"}) == 0.25
    assert (
        retry_after_from_headers(
            {"Retry-After": "Wed, 21 Oct 2015 07:28:30 GMT", "Date": "Wed, 21 Oct 2015 07:28:00 GMT"}
        )
        == 30
    )
    h = {
        "x-ratelimit-remaining-requests": "5",
        "x-ratelimit-reset-requests": "20ms",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "6m0.5s",
    }
    assert retry_after_from_headers(h) == 360.5
    h["x-ratelimit-remaining-tokens"] = "10"
    assert retry_after_from_headers(h) == 360.5  # none exhausted: the longest reset
    assert retry_after_from_headers({"content-type": "application/json"}) is None
    assert retry_after_from_headers({"retry-after": "soon"}) is None
