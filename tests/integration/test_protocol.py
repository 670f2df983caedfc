"""The queue protocol against a real server: submit, claim, complete, dependents,
concurrency, retries, policy, fencing, handback, reaper, cancel."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from oao_testkit import fleet, make_spec, of_type, run_spec, wait_until

from oao_common.broker import Broker
from oao_common.keys import job_id
from oao_scheduler.progress import wait_for_run
from oao_scheduler.reaper import Reaper
from oao_scheduler.submit import submit_spec


async def test_submit_writes_run_and_pushes_roots_only(broker: Broker) -> None:
    spec = make_spec(
        [
            {"id": "a", "agent": "noop"},
            {"id": "b", "agent": "noop", "depends_on": ["a"]},
            {"id": "c", "agent": "noop", "queue": "other"},
        ]
    )
    s = await submit_spec(broker, spec)
    run = await broker.get_run(s.run_id)
    assert run["status"] == "PENDING" and run["nodes_total"] == "3"
    assert run["exec_hash"] == s.exec_hash
    r = broker.redis
    assert await r.lrange(broker.keys.queue("default"), 0, -1) == [job_id(s.run_id, "a")]
    assert await r.lrange(broker.keys.queue("other"), 0, -1) == [job_id(s.run_id, "c")]
    nodes = {n["id"]: n for n in await broker.get_nodes(s.run_id, ["a", "b", "c"])}
    assert nodes["b"]["status"] == "PENDING" and nodes["b"]["pending"] == "1"
    assert next(e.type for e in await broker.events(s.run_id)) == "RUN_SUBMITTED"


async def test_idempotency_key_returns_first_run(broker: Broker) -> None:
    spec = make_spec([{"id": "a", "agent": "noop"}])
    first = await submit_spec(broker, spec, idempotency_key="k1")
    second = await submit_spec(broker, spec, idempotency_key="k1")
    assert first.created and not second.created and second.run_id == first.run_id
    assert await broker.redis.llen(broker.keys.queue("default")) == 1


async def test_claim_and_complete_release_dependents(broker: Broker) -> None:
    spec = make_spec(
        [
            {"id": "a", "agent": "noop"},
            {"id": "b", "agent": "noop", "depends_on": ["a"]},
            {"id": "c", "agent": "noop", "depends_on": ["a", "b"]},
        ]
    )
    s = await submit_spec(broker, spec)
    [c] = await broker.claim("w1", "default", 6)
    assert (c.node_id, c.attempt) == ("a", 1)
    assert await broker.redis.lrange(broker.keys.active("w1"), 0, -1) == [c.job]
    assert (await broker.get_run(s.run_id))["status"] == "RUNNING"
    assert await broker.complete("w1", c, "A-out")
    assert await broker.redis.llen(broker.keys.active("w1")) == 0
    # b released, c still waits for b
    [cb] = await broker.claim("w1", "default", 6)
    assert cb.node_id == "b" and cb.dep_outputs == {"a": "A-out"}
    nodes = {n["id"]: n for n in await broker.get_nodes(s.run_id, ["c"])}
    assert nodes["c"]["status"] == "PENDING" and nodes["c"]["pending"] == "1"
    assert await broker.complete("w1", cb, {"b": 1})
    [cc] = await broker.claim("w1", "default", 6)
    assert cc.dep_outputs == {"a": "A-out", "b": {"b": 1}}
    assert await broker.complete("w1", cc, None)
    run = await broker.get_run(s.run_id)
    assert run["status"] == "SUCCEEDED" and run["nodes_done"] == "3"
    assert of_type(await broker.events(s.run_id), "RUN_SUCCEEDED")


async def test_dag_runs_in_topological_order(broker: Broker) -> None:
    # diamond plus a tail: a -> (b, c) -> d -> e
    spec = make_spec(
        [
            {"id": "a", "agent": "noop"},
            {"id": "b", "agent": "noop", "depends_on": ["a"]},
            {"id": "c", "agent": "noop", "depends_on": ["a"]},
            {"id": "d", "agent": "noop", "depends_on": ["b", "c"]},
            {"id": "e", "agent": "noop", "depends_on": ["d"]},
        ]
    )
    rid = await run_spec(broker, spec, workers=2)
    events = await broker.events(rid)
    assert (await broker.get_run(rid))["status"] == "SUCCEEDED"
    started = {e.node: e.id for e in of_type(events, "NODE_STARTED")}
    done = {e.node: e.id for e in of_type(events, "NODE_SUCCEEDED")}
    sid = lambda x: tuple(int(p) for p in x.split("-"))  # noqa: E731
    for node in spec.nodes:
        for dep in node.depends_on:
            assert sid(done[dep]) < sid(started[node.id]), (dep, node.id)


async def test_parallel_branches_overlap(broker: Broker) -> None:
    spec = make_spec(
        [
            {"id": "root", "agent": "noop"},
            {"id": "x", "agent": "sleeper", "task": "0.3", "depends_on": ["root"]},
            {"id": "y", "agent": "sleeper", "task": "0.3", "depends_on": ["root"]},
        ]
    )
    rid = await run_spec(broker, spec, workers=1, concurrency=2)
    ev = await broker.events(rid)
    sx, sy = (of_type(ev, "NODE_STARTED", node=n)[0].ts_ms for n in "xy")
    ex, ey = (of_type(ev, "NODE_SUCCEEDED", node=n)[0].ts_ms for n in "xy")
    assert sx < ey and sy < ex  # the two intervals overlap on one worker


async def test_transient_failure_retries_with_backoff(broker: Broker) -> None:
    spec = make_spec(
        [{"id": "f", "agent": "flaky", "task": f"{broker.keys.prefix}:2"}],
        defaults={"retry": {"max_retries": 3, "retry_delay_s": 0.1, "backoff": 2.0, "jitter": False}},
    )
    rid = await run_spec(broker, spec)
    [node] = await broker.get_nodes(rid, ["f"])
    assert node["status"] == "SUCCEEDED" and node["retries"] == "2" and node["attempt"] == "3"
    assert json.loads(node["output"]) == "ok after 3 calls"
    ev = await broker.events(rid)
    delays = [e.data["delay_ms"] for e in of_type(ev, "NODE_RETRY_SCHEDULED")]
    assert delays == [100, 200]
    assert of_type(ev, "NODE_RETRY_SCHEDULED")[0].data["error"]["type"] == "ConnectionError"


async def test_retries_exhausted_fail_node_and_skip_dependents(broker: Broker) -> None:
    spec = make_spec(
        [
            {"id": "bad", "agent": "broken"},
            {"id": "after", "agent": "noop", "depends_on": ["bad"]},
            {"id": "free", "agent": "noop"},
        ],
        defaults={"retry": {"max_retries": 1, "retry_delay_s": 0.05, "jitter": False}},
    )
    rid = await run_spec(broker, spec)
    nodes = {n["id"]: n for n in await broker.get_nodes(rid, ["bad", "after", "free"])}
    assert nodes["bad"]["status"] == "FAILED" and nodes["bad"]["retries"] == "1"
    assert json.loads(nodes["bad"]["error"])["type"] == "ValueError"
    assert nodes["after"]["status"] == "SKIPPED"
    assert nodes["free"]["status"] == "SUCCEEDED"
    run = await broker.get_run(rid)
    assert run["status"] == "FAILED" and run["nodes_failed"] == "1" and run["nodes_done"] == "3"


async def test_policy_violation_is_not_retried(broker: Broker) -> None:
    spec = make_spec(
        [{"id": "loop", "agent": "runaway"}],
        agents={"runaway": {"kind": "python", "entrypoint": "examples.agents:runaway"}},
        models={"m": {"provider": "scripted", "replies": ["word " * 50]}},
        defaults={
            "policy": {"max_tokens": 300, "max_steps": 100},
            "retry": {"max_retries": 3, "retry_delay_s": 0.01},
        },
    )
    rid = await run_spec(broker, spec)
    [node] = await broker.get_nodes(rid, ["loop"])
    assert node["status"] == "FAILED" and node["retries"] == "0" and node["attempt"] == "1"
    err = json.loads(node["error"])
    assert err["rule"] == "max_tokens" and err["limit"] == 300 and err["value"] > 300
    assert err["reason"].startswith("PolicyViolation: Max Token Limit Exceeded")
    ev = await broker.events(rid)
    [pv] = of_type(ev, "POLICY_VIOLATION")
    assert pv.data["rule"] == "max_tokens"
    assert len(of_type(ev, "NODE_STARTED")) == 1 and not of_type(ev, "NODE_RETRY_SCHEDULED")


async def test_timeout_is_a_policy_violation(broker: Broker) -> None:
    spec = make_spec([{"id": "s", "agent": "sleeper", "task": "5", "policy": {"timeout_s": 0.2}}])
    rid = await run_spec(broker, spec)
    [node] = await broker.get_nodes(rid, ["s"])
    assert node["status"] == "FAILED" and json.loads(node["error"])["rule"] == "timeout_s"


async def test_stale_completion_is_rejected(broker: Broker) -> None:
    spec = make_spec([{"id": "a", "agent": "noop"}, {"id": "b", "agent": "noop", "depends_on": ["a"]}])
    s = await submit_spec(broker, spec)
    await broker.heartbeat("zombie", 0.05)
    [old] = await broker.claim("zombie", "default", 1)
    await wait_until(lambda: broker.redis.exists(broker.keys.heartbeat("zombie")), 0, 5, "expiry")
    res = await broker.reap("zombie", max_requeues=5)
    assert res is not None and res.requeued == 1
    [new] = await broker.claim("fresh", "default", 1)
    assert new.attempt == old.attempt + 1
    assert not await broker.complete("zombie", old, "zombie-output")
    assert not await broker.record_step("zombie", old, 1, {"x": 1})
    assert await broker.complete("fresh", new, "fresh-output")
    [a] = await broker.get_nodes(s.run_id, ["a"])
    assert json.loads(a["output"]) == "fresh-output" and a["attempt"] == "2"
    ev = await broker.events(s.run_id)
    stale = of_type(ev, "STALE_ATTEMPT_REJECTED")
    assert [e.data["write"] for e in stale] == ["complete", "record_step"]
    assert stale[0].data["current_attempt"] == 2
    assert await broker.redis.lrange(broker.keys.queue("default"), 0, -1) == [job_id(s.run_id, "b")]


async def test_reaper_requeues_dead_worker_jobs_once(broker: Broker) -> None:
    spec = make_spec([{"id": f"n{i}", "agent": "noop"} for i in range(3)])
    s = await submit_spec(broker, spec)
    await broker.heartbeat("dead", 0.05)
    claimed = await broker.claim("dead", "default", 2)
    assert len(claimed) == 2
    await wait_until(lambda: broker.redis.exists(broker.keys.heartbeat("dead")), 0, 5, "expiry")
    reapers = [Reaper(broker, heartbeat_ttl_s=0.05, max_requeues=5) for _ in range(5)]
    results = await asyncio.gather(*(r.tick() for r in reapers))
    assert sum(len(r) for r in results) == 1  # exactly one reaper acted
    q = await broker.redis.lrange(broker.keys.queue("default"), 0, -1)
    assert sorted(q) == sorted(job_id(s.run_id, f"n{i}") for i in range(3))
    assert q[-1] == claimed[0].job  # requeued jobs go to the front (popped first)
    assert not await broker.redis.exists(broker.keys.active("dead"))
    assert await broker.redis.zscore(broker.keys.workers, "dead") is None
    nodes = await broker.get_nodes(s.run_id, [c.node_id for c in claimed])
    assert all(n["status"] == "READY" and n["requeues"] == "1" and "lease" not in n for n in nodes)
    assert len(of_type(await broker.events(s.run_id), "NODE_REQUEUED")) == 2


async def test_live_worker_is_not_reaped(broker: Broker) -> None:
    await broker.heartbeat("alive", 30)
    assert await broker.reap("alive", 5) is None
    assert await broker.redis.zscore(broker.keys.workers, "alive") is not None


@pytest.mark.parametrize("skew_s", [3600.0, -3600.0])
async def test_heartbeat_index_is_on_the_server_clock(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, skew_s: float
) -> None:
    """A worker whose clock is an hour off beats on the server's clock: its index entry
    holds the server time of the beat. A fast clock must not hide a dead worker from
    the reaper (the old index, on the worker's clock, kept it "fresh" for an hour and
    its jobs stranded); a slow one must not make a live worker look stale."""
    s = await submit_spec(broker, make_spec([{"id": "a", "agent": "noop"}]))
    real_time = time.time
    with monkeypatch.context() as m:
        m.setattr(time, "time", lambda: real_time() + skew_s)  # this process' clock only
        await broker.heartbeat("skewed", 0.3)
        [job] = await broker.claim("skewed", "default", 1)
    sec, usec = await broker.redis.time()
    score = await broker.redis.zscore(broker.keys.workers, "skewed")
    assert score is not None and abs(score - (sec + usec / 1e6)) < 5, (score, sec)
    reaper = Reaper(broker, heartbeat_ttl_s=0.3, max_requeues=5)
    if skew_s < 0:  # alive: the index does not call it stale
        assert "skewed" not in await broker.stale_workers(5.0)
    await wait_until(lambda: broker.redis.exists(broker.keys.heartbeat("skewed")), 0, 5, "expiry")
    reaped = await wait_until(reaper.tick, bool, 5, "the reaper to find the dead worker")
    assert [(r.worker_id, r.requeued) for r in reaped] == [("skewed", 1)]
    assert await broker.redis.lrange(broker.keys.queue("default"), 0, -1) == [job.job]
    assert job.run_id == s.run_id


async def test_live_worker_reconciles_a_job_it_is_not_running(broker: Broker) -> None:
    """A job sits RUNNING in a live worker's active list, and the worker saw no Redis
    error to tell it so (a write lost without a broken connection, a claim made under
    its id by another client): no reaper will ever touch it, as the worker is alive.
    The worker's periodic reconciliation must hand it back, and then run it."""
    nodes = [{"id": "busy", "agent": "sleeper", "task": "1", "priority": 9}, {"id": "a", "agent": "noop"}]
    s = await submit_spec(broker, make_spec(nodes))
    async with fleet(broker, concurrency=1, reconcile_every_s=0.3) as [w]:
        # While its one slot runs "busy" (claimed first: higher band), "a" is taken
        # under the worker's id behind its back.
        await wait_until(lambda: node_status(broker, s.run_id, "busy"), "RUNNING", 10, "busy to run")
        [phantom] = await broker.claim(w.id, "default", 1)
        assert phantom.node_id == "a"
        assert await wait_for_run(broker, s.run_id, interval_s=0.02, timeout_s=10) == "SUCCEEDED"
    events = of_type(await broker.events(s.run_id), "NODE_HANDED_BACK", "NODE_SUCCEEDED", node="a")
    assert [(e.type, e.attempt) for e in events] == [
        ("NODE_HANDED_BACK", phantom.attempt),
        ("NODE_SUCCEEDED", phantom.attempt + 1),
    ]


async def test_poison_job_is_dead_lettered(broker: Broker) -> None:
    spec = make_spec([{"id": "p", "agent": "noop"}])
    s = await submit_spec(broker, spec)
    for i in range(3):
        wid = f"victim{i}"
        await broker.heartbeat(wid, 0.05)
        if not await broker.claim(wid, "default", 1):
            break
        hb = broker.keys.heartbeat(wid)
        await wait_until(lambda hb=hb: broker.redis.exists(hb), 0, 5, "expiry")
        await broker.reap(wid, max_requeues=1)
    [p] = await broker.get_nodes(s.run_id, ["p"])
    assert p["status"] == "FAILED" and json.loads(p["error"])["reason"] == "poison"
    assert (await broker.get_run(s.run_id))["status"] == "FAILED"
    assert await broker.redis.llen(broker.keys.queue("default")) == 0


async def test_graceful_stop_hands_back_running_node(broker: Broker) -> None:
    spec = make_spec([{"id": "slow", "agent": "sleeper", "task": "30"}])
    s = await submit_spec(broker, spec)
    async with fleet(broker, reaper=False) as [w]:
        await wait_until(lambda: node_status(broker, s.run_id, "slow"), "RUNNING", 10, "slow to run")
        w.grace_period_s = 0.1
    [n] = await broker.get_nodes(s.run_id, ["slow"])
    assert n["status"] == "READY" and "lease" not in n and n["requeues"] == "0"
    assert await broker.redis.lrange(broker.keys.queue("default"), 0, -1) == [job_id(s.run_id, "slow")]
    assert of_type(await broker.events(s.run_id), "NODE_HANDED_BACK")
    assert await broker.redis.zscore(broker.keys.workers, w.id) is None


async def test_cancel_stops_run_and_rejects_late_completion(broker: Broker) -> None:
    spec = make_spec([{"id": "a", "agent": "noop"}, {"id": "b", "agent": "noop", "depends_on": ["a"]}])
    s = await submit_spec(broker, spec)
    [c] = await broker.claim("w", "default", 1)
    assert await broker.cancel(s.run_id) == 2
    assert await broker.cancel(s.run_id) == -1
    assert not await broker.complete("w", c, "late")
    nodes = await broker.get_nodes(s.run_id, ["a", "b"])
    assert [n["status"] for n in nodes] == ["CANCELLED", "CANCELLED"]
    assert (await broker.get_run(s.run_id))["status"] == "CANCELLED"
    assert await broker.redis.llen(broker.keys.active("w")) == 0  # late entry cleaned up


async def test_claim_drops_jobs_of_cancelled_runs(broker: Broker) -> None:
    spec = make_spec([{"id": "a", "agent": "noop"}])
    s = await submit_spec(broker, spec)
    await broker.cancel(s.run_id)
    assert await broker.claim("w", "default", 1) == []
    assert await broker.redis.llen(broker.keys.active("w")) == 0


async def test_fenced_writes_are_idempotent_when_retried(broker: Broker) -> None:
    """A write whose reply was lost is retried; the retry must change nothing."""
    spec = make_spec([{"id": "a", "agent": "noop"}, {"id": "b", "agent": "noop", "depends_on": ["a"]}])
    s = await submit_spec(broker, spec)
    [c] = await broker.claim("w", "default", 1)
    rec = {"kind": "tool", "request_hash": "h", "result": 1, "attempt": c.attempt}
    for _ in range(2):
        assert await broker.record_step("w", c, 1, rec, tokens_in=5, tokens_out=7, is_tool=True)
    for _ in range(2):
        assert await broker.complete("w", c, "out")
    run = await broker.get_run(s.run_id)
    assert (run["tokens_in"], run["tokens_out"], run["tool_calls"], run["steps"]) == ("5", "7", "1", "1")
    assert run["nodes_done"] == "1"
    assert await broker.redis.lrange(broker.keys.queue("default"), 0, -1) == [job_id(s.run_id, "b")]
    ev = await broker.events(s.run_id)
    assert len(of_type(ev, "NODE_SUCCEEDED")) == 1 and not of_type(ev, "STALE_ATTEMPT_REJECTED")
    [cb] = await broker.claim("w", "default", 1)
    assert await broker.fail("w", cb, {"type": "X"}, 5.0) == 2
    assert await broker.fail("w", cb, {"type": "X"}, 5.0) == 2
    [b] = await broker.get_nodes(s.run_id, ["b"])
    assert b["retries"] == "1" and await broker.redis.zcard(broker.keys.delayed) == 1


async def test_claim_takes_priority_bands_in_order(broker: Broker) -> None:
    spec = make_spec(
        [
            {"id": "low", "agent": "noop", "priority": 1},
            {"id": "normal", "agent": "noop", "priority": 5},
            {"id": "high", "agent": "noop", "priority": 9, "critical": False},
            {"id": "high2", "agent": "noop", "priority": 10, "critical": False},
        ]
    )
    s = await submit_spec(broker, spec)
    assert await broker.redis.llen(broker.keys.ready("default", "high")) == 2
    assert await broker.redis.llen(broker.keys.ready("default", "low")) == 1
    claimed = await broker.claim("w", "default", 3)
    assert [c.node_id for c in claimed] == ["high", "high2", "normal"]  # FIFO within a band
    assert [c.node_id for c in await broker.claim("w", "default", 3)] == ["low"]
    assert (await broker.get_run(s.run_id))["status"] == "RUNNING"


async def test_worker_queues_are_claimed_in_order(broker: Broker) -> None:
    spec = make_spec(
        [
            {"id": "d1", "agent": "noop"},
            {"id": "g1", "agent": "noop", "queue": "gpu"},
            {"id": "d2", "agent": "noop"},
            {"id": "g2", "agent": "noop", "queue": "gpu", "priority": 1},
            {"id": "x", "agent": "noop", "queue": "other"},
        ]
    )
    await submit_spec(broker, spec)
    claimed = await broker.claim("w", ["gpu", "default"], 10)
    assert [c.node_id for c in claimed] == ["g1", "g2", "d1", "d2"]  # never "other"
    assert await broker.redis.llen(broker.keys.queue("other")) == 1


async def test_idle_worker_wakes_on_push_and_serves_several_queues(broker: Broker) -> None:
    async with fleet(broker, queues=["gpu", "default"]) as [w]:
        await asyncio.sleep(0.3)  # the worker is idle, blocked on its wake lists
        spec = make_spec([{"id": "a", "agent": "noop"}, {"id": "b", "agent": "noop", "queue": "gpu"}])
        s = await submit_spec(broker, spec)
        from oao_scheduler.progress import wait_for_run

        assert await wait_for_run(broker, s.run_id, interval_s=0.02, timeout_s=10) == "SUCCEEDED"
        # the run's end event is read as soon as complete.lua ran; the worker counts its
        # completion when the script's reply reaches it
        await wait_until(lambda: w.completed, 2, 5, "the worker to count both completions")


async def node_status(broker: Broker, rid: str, nid: str) -> str | None:
    return (await broker.get_nodes(rid, [nid]))[0].get("status")
