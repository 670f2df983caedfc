"""Loop supervision (oao_common/supervise.py): a process whose long-lived loop ends
stops the others and says which one ended, so that ``serve`` exits 5 and a supervisor
restarts it, never leaving a half-alive process."""

from __future__ import annotations

import asyncio

import pytest

from oao_common.errors import LoopDied
from oao_common.supervise import supervise


async def _until(stop: asyncio.Event, ended: list[str], name: str) -> None:
    try:
        await stop.wait()
    finally:
        ended.append(name)


async def test_a_loop_that_raises_stops_the_others_and_is_named() -> None:
    stop, ended = asyncio.Event(), []

    async def broken() -> None:
        await asyncio.sleep(0.01)
        raise KeyError("bug")

    loops = {"reaper": _until(stop, ended, "reaper"), "escalation": broken()}
    with pytest.raises(LoopDied, match=r"the escalation loop ended: KeyError: 'bug'"):
        await asyncio.wait_for(supervise(loops, stop), 5)
    assert stop.is_set() and ended == ["reaper"]


async def test_a_loop_that_returns_early_counts_as_dead() -> None:
    stop, ended = asyncio.Event(), []

    async def quits() -> None:
        return None

    loops = {"retention": quits(), "reaper": _until(stop, ended, "reaper")}
    with pytest.raises(LoopDied, match="the retention loop ended: returned early"):
        await asyncio.wait_for(supervise(loops, stop), 5)
    assert ended == ["reaper"]


async def test_a_requested_stop_ends_every_loop_quietly() -> None:
    stop, ended = asyncio.Event(), []
    loops = {n: _until(stop, ended, n) for n in ("reaper", "escalation")}
    task = asyncio.create_task(supervise(loops, stop))
    await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 5)  # no LoopDied
    assert sorted(ended) == ["escalation", "reaper"]
