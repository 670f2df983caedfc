"""Retention: the finished-runs index, prune.lua, the shared spec, serve --retention,
trimming the run-endings stream, and the prune command. Real servers throughout."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Callable
from typing import Any

from oao_testkit import fleet, make_spec, run_spec
from proc import cli, start_serve, stop

from oao_common.broker import Broker
from oao_common.spec import Spec
from oao_common.stored_spec import split_spec
from oao_scheduler.escalation import GROUP, Escalator
from oao_scheduler.progress import wait_for_run
from oao_scheduler.retention import Retention, escalation_floor, trim_endings
from oao_scheduler.submit import expand, submit_spec


async def keyspace(broker: Broker) -> set[str]:
    """Every key under the test's prefix (SCAN)."""
    return {k async for k in broker.redis.scan_iter(match=f"{broker.keys.prefix}:*", count=1000)}


def own_keys(keys: set[str], rid: str) -> set[str]:
    return {k for k in keys if "{" + rid + "}" in k}


def chatty_spec(name: str = "chatty") -> Spec:
    """Two nodes that call the model (steps ledger, events) under a run token budget
    (reservations)."""
    return make_spec(
        [{"id": "a", "agent": "chatty"}, {"id": "b", "agent": "chatty", "depends_on": ["a"]}],
        name=name,
        policy={"max_tokens": 100000},
    )


def topic_spec(topic: str) -> Spec:
    """One llm node whose output is ``topic=<inputs.topic>`` (so inputs reach the worker)."""
    return make_spec(
        [{"id": "x", "agent": "w"}],
        models={"m": {"provider": "scripted", "replies": ["topic={{ inputs.topic }}"]}},
        agents={"w": {"kind": "llm", "model": "m"}},
        inputs={"topic": topic},
    )


async def until(cond: Callable[[], Any], what: str, timeout_s: float = 15.0) -> None:
    """Poll ``cond`` (a predicate, sync or async) every 50 ms until true; fail after
    ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while True:
        ok = cond()
        if inspect.isawaitable(ok):
            ok = await ok
        if ok:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_prune_removes_every_key_of_finished_runs_and_nothing_else(broker: Broker) -> None:
    done_a = await run_spec(broker, chatty_spec("a"))
    done_b = await run_spec(broker, make_spec([{"id": "x", "agent": "noop"}], name="b"))
    pending = (await submit_spec(broker, make_spec([{"id": "p", "agent": "noop"}], name="p"))).run_id
    k = broker.keys
    for rid in (done_a, done_b):
        finished_at = int((await broker.get_run(rid))["finished_at"])
        assert await broker.redis.zscore(k.done, rid) == finished_at
    assert await broker.redis.zscore(k.done, pending) is None

    before = await keyspace(broker)
    a_keys = own_keys(before, done_a)
    assert {k.run(done_a), k.events(done_a), k.steps(done_a), k.node(done_a, "a")} <= a_keys

    # an unfinished run is never deleted, even when named
    now = await broker.server_time_ms()
    r = await broker.prune_runs(now, run_ids=[pending])
    assert (r.runs, r.keys) == (0, 0)
    assert await keyspace(broker) == before

    r = await broker.prune_runs(now, run_ids=[done_a])
    assert r.runs == 1 and r.run_ids == [done_a]
    after = await keyspace(broker)
    assert after == before - a_keys - {k.spec(split_spec(chatty_spec("a"))[0])}
    assert r.keys == len(a_keys) + 1  # its keys and its spec (no other run used it)
    assert await broker.redis.zscore(k.runs, done_a) is None
    assert await broker.redis.zscore(k.done, done_a) is None
    assert await broker.get_run(done_a) == {} and await broker.events(done_a) == []

    # from the index: every finished run up to the cutoff, the pending one stays
    r = await broker.prune_runs(await broker.server_time_ms())
    assert r.run_ids == [done_b]
    left = await keyspace(broker)
    assert not own_keys(left, done_b)
    assert own_keys(left, pending) == own_keys(before, pending)
    assert await broker.redis.zrange(k.runs, 0, -1) == [pending]
    assert await broker.redis.zcard(k.done) == 0


async def test_prune_respects_the_cutoff(broker: Broker) -> None:
    rid = await run_spec(broker, make_spec([{"id": "x", "agent": "noop"}]))
    finished_at = int((await broker.get_run(rid))["finished_at"])
    assert (await broker.prune_runs(finished_at - 1)).runs == 0
    assert (await broker.prune_runs(finished_at - 1, run_ids=[rid])).runs == 0
    assert await broker.get_run(rid)
    assert (await broker.prune_runs(finished_at)).run_ids == [rid]


async def test_runs_share_one_stored_spec_with_a_reference_count(broker: Broker) -> None:
    base = topic_spec("a")
    other = base.model_copy(update={"inputs": {"topic": "b"}})
    spec_hash, body, _ = split_spec(base)
    assert split_spec(other)[0] == spec_hash  # inputs are not part of the stored spec
    rids = []
    async with fleet(broker):
        for spec in (base, other):
            s = await submit_spec(broker, spec)
            await wait_for_run(broker, s.run_id, interval_s=0.02, timeout_s=30)
            rids.append(s.run_id)
    k = broker.keys
    assert [x for x in await keyspace(broker) if x.startswith(k.prefix + ":spec:")] == [k.spec(spec_hash)]
    assert await broker.redis.hgetall(k.spec(spec_hash)) == {"json": body, "refs": "2"}
    for rid, topic in zip(rids, ("a", "b"), strict=True):
        run = await broker.get_run(rid)
        assert "spec" not in run and run["spec_hash"] == spec_hash
        spec_json, inputs_json, _ = await broker.get_spec_json(rid)
        assert spec_json is not None and json.loads(inputs_json or "") == {"topic": topic}
        assert Spec.from_stored_json(spec_json).inputs == {"topic": topic}
        assert [n["output"] for n in await broker.get_nodes(rid, ["x"])] == [json.dumps(f"topic={topic}")]

    now = await broker.server_time_ms()
    assert (await broker.prune_runs(now, run_ids=[rids[0]])).runs == 1
    assert await broker.redis.hget(k.spec(spec_hash), "refs") == "1"
    spec_json, _, _ = await broker.get_spec_json(rids[1])
    assert spec_json is not None and Spec.from_stored_json(spec_json).inputs == {"topic": "b"}
    assert (await broker.prune_runs(now, run_ids=[rids[1]])).runs == 1
    assert not await broker.redis.exists(k.spec(spec_hash))


async def test_runs_with_the_spec_in_their_hash_still_work(broker: Broker) -> None:
    """Runs submitted before specs were shared keep their spec in the run hash."""
    from oao_common.hashing import canonical_json

    spec = topic_spec("old")
    rid = "legacyrun1"
    fields, nodes, exec_hash, _ = expand(spec, rid)
    del fields["spec_hash"]
    fields["spec"] = canonical_json(spec.model_dump(mode="json"))
    async with fleet(broker):
        created, _ = await broker.submit(rid, fields, nodes, {"exec_hash": exec_hash})
        assert created
        assert await wait_for_run(broker, rid, interval_s=0.02, timeout_s=30) == "SUCCEEDED"
    spec_json, _, _ = await broker.get_spec_json(rid)
    assert spec_json == fields["spec"]
    assert [n["output"] for n in await broker.get_nodes(rid, ["x"])] == [json.dumps("topic=old")]
    r = await broker.prune_runs(await broker.server_time_ms(), run_ids=[rid])
    assert r.runs == 1 and not own_keys(await keyspace(broker), rid)


async def test_a_cancelled_run_enters_the_finished_runs_index(broker: Broker) -> None:
    s = await submit_spec(broker, make_spec([{"id": "a", "agent": "noop"}, {"id": "b", "agent": "noop"}]))
    assert await broker.redis.zscore(broker.keys.done, s.run_id) is None
    assert await broker.cancel(s.run_id) == 2
    run = await broker.get_run(s.run_id)
    assert run["status"] == "CANCELLED"
    assert await broker.redis.zscore(broker.keys.done, s.run_id) == int(run["finished_at"])
    r = await broker.prune_runs(int(run["finished_at"]))
    assert r.run_ids == [s.run_id] and not own_keys(await keyspace(broker), s.run_id)
    assert await broker.claim("w", "default", 2) == []  # queued jobs of a pruned run are dropped


async def test_a_failed_run_enters_the_finished_runs_index(broker: Broker) -> None:
    spec = make_spec([{"id": "bad", "agent": "broken"}], defaults={"retry": {"max_retries": 0}})
    rid = await run_spec(broker, spec)
    run = await broker.get_run(rid)
    assert run["status"] == "FAILED"
    assert await broker.redis.zscore(broker.keys.done, rid) == int(run["finished_at"])


async def test_stream_trimming_respects_the_escalation_group(broker: Broker) -> None:
    rids = [await run_spec(broker, make_spec([{"id": "x", "agent": "noop"}])) for _ in range(3)]
    r, key = broker.redis, broker.keys.finished
    ids = [eid for eid, _ in await r.xrange(key)]
    assert len(ids) == 3
    far = await broker.server_time_ms() + 60_000  # older-than bound that covers every entry

    # a group that has read nothing: every entry is still needed
    await r.xgroup_create(key, GROUP, id="0")
    floor = await escalation_floor(broker)
    assert str(floor) == ids[0]
    assert await trim_endings(broker, far, floor) == 0
    # first entry delivered, not acknowledged (pending): still needed
    await r.xreadgroup(GROUP, "c1", {key: ">"}, count=1)
    assert str(await escalation_floor(broker)) == ids[0]
    assert await trim_endings(broker, far, await escalation_floor(broker)) == 0
    # acknowledged, second delivered and pending: only the first may go
    await r.xack(key, GROUP, ids[0])
    await r.xreadgroup(GROUP, "c1", {key: ">"}, count=1)
    assert str(await escalation_floor(broker)) == ids[1]
    assert await trim_endings(broker, far, await escalation_floor(broker)) == 1
    assert [eid for eid, _ in await r.xrange(key)] == ids[1:]
    # runs whose ending is not handled are not pruned either, however old
    keeper = Retention(broker, retention_s=0.001)
    await asyncio.sleep(0.01)
    first, _ = await keeper.tick()
    assert first.runs <= 1  # only the first run's ending is handled
    assert all([await broker.get_run(x) for x in rids[1:]])
    # the escalator handles the rest: retention may trim and prune everything
    await Escalator(broker, reclaim_idle_s=0).poll()
    assert await escalation_floor(broker) is None
    pruned, trimmed = await keeper.tick()
    assert first.runs + pruned.runs == 3 and trimmed == 2
    assert await r.xlen(key) == 0
    left = await keyspace(broker)
    assert all(not own_keys(left, x) for x in rids)


async def test_retention_loop_survives_redis_errors(broker: Broker) -> None:
    """A Redis error in a pass is logged and retried: the loop keeps running."""
    await broker.redis.set(broker.keys.finished, "not a stream")  # XINFO now fails: WRONGTYPE
    keeper = Retention(broker, retention_s=0.001, interval_s=0.01)
    stop = asyncio.Event()
    task = asyncio.create_task(keeper.run(stop))
    await until(lambda: keeper.stats.failures >= 2, "two failed passes")
    assert not task.done()
    await broker.redis.delete(broker.keys.finished)
    async with fleet(broker):  # the run is pruned as soon as it ends (retention 1 ms)
        rid = (await submit_spec(broker, make_spec([{"id": "x", "agent": "noop"}]))).run_id
        await until(lambda: _empty(broker, rid), "the run to end and be pruned")
    assert keeper.stats.runs == 1
    stop.set()
    await asyncio.wait_for(task, 5)


async def _empty(broker: Broker, rid: str) -> bool:
    return not own_keys(await keyspace(broker), rid)


async def _xlen_is(broker: Broker, n: int) -> bool:
    return int(await broker.redis.xlen(broker.keys.finished)) == n


async def test_serve_with_retention_prunes_finished_runs(redis_url: str, prefix: str, broker: Broker) -> None:
    serve = start_serve(redis_url, prefix, "--retention", "1s")
    try:
        rid = await run_spec(broker, chatty_spec())
        pending_spec = make_spec([{"id": "p", "agent": "noop"}])
        unfinished = (await submit_spec(broker, pending_spec)).run_id
        assert own_keys(await keyspace(broker), rid)
        await until(lambda: _empty(broker, rid), "serve to prune the finished run")
        await until(lambda: _xlen_is(broker, 0), "serve to trim the handled run ending")
        assert serve.poll() is None
        assert (await broker.get_run(unfinished))["status"] == "PENDING"
        assert own_keys(await keyspace(broker), unfinished)
        assert await broker.redis.hget(broker.keys.spec(split_spec(pending_spec)[0]), "refs") == "1"
    finally:
        stop(serve)


def test_serve_rejects_a_bad_retention(redis_url: str, prefix: str) -> None:
    r = cli("serve", "--redis-url", redis_url, "--prefix", prefix, "--retention", "3 weeks")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: --retention: '3 weeks' is not a duration (e.g. 90s, 30m, 12h, 3d, or seconds)"
    ]


async def test_prune_command(redis_url: str, prefix: str, broker: Broker) -> None:
    ok = await run_spec(broker, chatty_spec())
    failed = await run_spec(
        broker, make_spec([{"id": "bad", "agent": "broken"}], defaults={"retry": {"max_retries": 0}})
    )
    legacy = await run_spec(broker, make_spec([{"id": "x", "agent": "noop"}], name="legacy"))
    await broker.redis.zrem(broker.keys.done, legacy)  # as if it ended before the index existed
    pending = (await submit_spec(broker, make_spec([{"id": "p", "agent": "noop"}]))).run_id
    before = await keyspace(broker)
    where = ("--redis-url", redis_url, "--prefix", prefix)

    r = cli("prune", *where, "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    dry = json.loads(r.stdout)
    assert dry["dry_run"] is True and dry["runs"] == 3 and dry["sampled"] == 3
    assert dry["keys"] == sum(len(own_keys(before, x)) for x in (ok, failed, legacy))
    assert dry["bytes"] > 0 and dry["indexed"] == 0
    assert await keyspace(broker) == before  # nothing deleted, nothing indexed

    r = cli("prune", *where, "--older-than", "1h", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["runs"] == 0
    assert json.loads(r.stdout)["indexed"] == 1
    assert await broker.redis.zscore(broker.keys.done, legacy) is not None  # indexed now

    r = cli("prune", *where, "--status", "failed", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (
        out["runs"] == 1
        and out["statuses"] == ["FAILED"]
        and out["keys"] == len(own_keys(before, failed)) + 1
    )
    assert not own_keys(await keyspace(broker), failed) and own_keys(await keyspace(broker), ok)

    r = cli("prune", *where)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("deleted 2 finished runs: ")
    left = await keyspace(broker)
    assert not own_keys(left, ok) and not own_keys(left, legacy)
    assert own_keys(left, pending) == own_keys(before, pending)

    r = cli("prune", *where, "--status", "RUNNING")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "not a finished run state" in r.stderr
    r = cli("prune", *where, "--older-than", "-5m")
    assert r.returncode == 2 and r.stderr.startswith("error: --older-than:")


def test_prune_command_without_redis_exits_3() -> None:
    r = cli("prune", "--redis-url", "redis://127.0.0.1:1/0")
    assert r.returncode == 3 and len(r.stderr.strip().splitlines()) == 1
