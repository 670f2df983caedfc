"""Failover under Sentinel: a real primary, replica and three Sentinels (sentinelkit),
real ``oao-worker`` / ``oao-scheduler serve`` processes on a ``redis+sentinel://`` URL.

The primary is SIGKILLed (or demoted by ``SENTINEL FAILOVER``) in the middle of a run;
the run must finish SUCCEEDED on the promoted replica, every node completed once and no
job left in any list, although the failover may have lost acknowledged writes
(docs/guarantees.md, "Failover (Sentinel)"). Skipped when the ``redis-server`` /
``redis-sentinel`` binaries are missing (Debian packages of the same names).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from chaos.chaoskit import read_ledger
from proc import start_serve, start_worker, stop
from sentinelkit import SentinelCluster, missing_binaries

from oao_common.broker import Broker
from oao_common.connection import connect
from oao_common.keys import job_id
from oao_common.spec import parse_spec
from oao_scheduler.progress import wait_for_run
from oao_scheduler.submit import submit_spec

pytestmark = [
    pytest.mark.sentinel,
    pytest.mark.skipif(
        bool(missing_binaries()),
        reason=f"needs {' and '.join(missing_binaries())} on PATH "
        "(Debian: apt-get install redis-server redis-sentinel)",
    ),
]

NODES = 50
WIDTH = 5  # nodes per layer: 10 layers, so the run is still going when the primary dies


def failover_spec(seed: int) -> str:
    """NODES nodes in layers of WIDTH, each depending on 1-2 nodes of the layer before;
    each node: model call (30 ms), side effect, model call, side effect (~80 ms)."""
    rng = random.Random(seed)
    nodes = []
    for i in range(NODES):
        layer = i // WIDTH
        deps: list[str] = []
        if layer:
            prev = range((layer - 1) * WIDTH, layer * WIDTH)
            deps = [f"n{j}" for j in sorted(rng.sample(list(prev), rng.choice([1, 2])))]
        nodes.append({"id": f"n{i}", "agent": "a", "depends_on": deps})
    doc = {
        "name": "failover",
        "defaults": {
            "policy": {"max_steps": 20, "timeout_s": 60},
            "retry": {"max_retries": 3, "retry_delay_s": 0.1},
        },
        "models": {"m": {"provider": "scripted", "reply_delay_s": 0.03, "replies": ["ok"]}},
        "agents": {
            "a": {
                "kind": "python",
                "entrypoint": "oao_test_agents:chaos_agent",
                "model": "m",
                "tools": ["ext"],
            }
        },
        "tools": {"ext": {"entrypoint": "oao_test_agents:ext_ledger", "idempotent": True}},
        "nodes": nodes,
    }
    return yaml.safe_dump(doc)


async def stranded(broker: Broker, run_id: str, logs: str) -> list[dict[str, Any]]:
    """Nodes a lost write left behind: not terminal, and either RUNNING in the active
    list of a worker whose log says it finished that attempt, or in no list at all."""
    run = await broker.get_run(run_id)
    nodes = await broker.get_nodes(run_id, run["node_ids"].split(","))
    listed: dict[str, str] = {}
    for w in await broker.workers():
        for job in w["active"]:
            listed[job] = f"active list of {w['id']} (alive={w['alive']})"
    for key in broker.keys.ready_lists(["default"]):
        for job in await broker.redis.lrange(key, 0, -1):
            listed[job] = f"ready list {key}"
    for job in await broker.redis.zrange(broker.keys.delayed, 0, -1):
        listed[job] = "delayed set"
    out = []
    waiting = 0
    for n in nodes:
        if n.get("status") in ("SUCCEEDED", "FAILED", "CANCELLED"):
            continue
        if n.get("status") == "PENDING" and job_id(run_id, n["id"]) not in listed:
            waiting += 1  # waits for a dependency: a consequence, not a cause
            continue
        finished = [
            json.loads(line).get("event")
            for line in logs.splitlines()
            if f'"node_id": "{n["id"]}"' in line and f'"attempt": {n.get("attempt")}' in line
        ]
        where = listed.get(job_id(run_id, n["id"]), "no list")
        out.append(
            {
                "node": n["id"],
                "status": n.get("status"),
                "attempt": n.get("attempt"),
                "lease": n.get("lease"),
                "where": where,
                "worker_log_says": [e for e in finished if e and e.startswith("node.")],
            }
        )
    return [*out, {"pending_on_dependencies": waiting}]


def _last_error(log: Path) -> str:
    """The last line of ``log`` that names an exception (a traceback's last line)."""
    lines = [x for x in log.read_text(errors="replace").splitlines() if "Error" in x or "error" in x]
    return lines[-1][:300] if lines else "(no error in its log)"


async def check_converged(broker: Broker, run_id: str, ledger: Path) -> dict[str, Any]:
    """What must hold after a failover that lost acknowledged writes (a rewind).

    ``check_invariants`` assumes nothing acknowledged is ever lost; after a rewind a
    recorded step may legitimately run again (its record was lost), even under the same
    attempt *number* (only fencing tokens are never reissued). What remains: every node
    SUCCEEDED with exactly one ``NODE_SUCCEEDED`` in the surviving log, no job in any
    list, every surviving tool record matches an execution of its idempotency key; the
    executions repeated by the rewind are counted (all of them idempotent tools here).
    """
    run = await broker.get_run(run_id)
    node_ids = run["node_ids"].split(",")
    nodes = await broker.get_nodes(run_id, node_ids)
    bad = [(n["id"], n.get("status"), n.get("error")) for n in nodes if n.get("status") != "SUCCEEDED"]
    assert not bad, bad[:5]
    assert run["status"] == "SUCCEEDED"
    r = broker.redis
    leftovers: list[str] = []
    async for k in r.scan_iter(match=f"{broker.keys.prefix}:q:*"):
        if await r.type(k) == "list":
            leftovers += await r.lrange(k, 0, -1)
    async for k in r.scan_iter(match=f"{broker.keys.prefix}:w:*:active"):
        leftovers += await r.lrange(k, 0, -1)
    leftovers += await r.zrange(broker.keys.delayed, 0, -1)
    leftovers += await r.lrange(broker.keys.parked(run_id), 0, -1)
    assert not leftovers, leftovers[:5]
    events = await broker.events(run_id)
    succeeded = Counter(e.node for e in events if e.type == "NODE_SUCCEEDED")
    assert all(succeeded[n] == 1 for n in node_ids), [n for n in node_ids if succeeded[n] != 1]
    runs_of = Counter(key for key, _a, _step, _label in read_ledger(ledger))
    steps = await broker.get_steps(run_id)
    tools = [rec for k, rec in steps.items() if not k.endswith(":started") and rec["kind"] == "tool"]
    assert all(runs_of[rec["idempotency_key"]] >= 1 for rec in tools)
    return {
        "nodes": len(node_ids),
        "recorded_tool_steps": len(tools),
        "tool_calls_repeated": sum(runs_of[rec["idempotency_key"]] - 1 for rec in tools),
        "requeued_or_handed_back": sum(1 for e in events if e.type in ("NODE_REQUEUED", "NODE_HANDED_BACK")),
        "stale_rejected": sum(1 for e in events if e.type == "STALE_ATTEMPT_REJECTED"),
    }


async def run_through_failover(
    tmp_path: Path, prefix: str, how: str, min_replicas_to_write: int = 0, replicas: int = 1
) -> dict[str, Any]:
    """Start the cluster and the fleet, submit the run, fail the primary over mid-run
    (``kill``: SIGKILL; ``demote``: ``SENTINEL FAILOVER``, the old primary stays up as
    a replica), wait for the run, check the invariants; returns figures."""
    ledger = tmp_path / "ledger.txt"
    env = {"OAO_TEST_LEDGER": str(ledger)}
    with SentinelCluster(
        tmp_path / "redis", min_replicas_to_write=min_replicas_to_write, replicas=replicas
    ) as cluster:
        url = cluster.url
        serve = start_serve(url, prefix, "--reaper-interval", "0.2", log=tmp_path / "serve.log")
        workers = [
            start_worker(url, prefix, "--concurrency", "2", extra_env=env, log=tmp_path / f"w{i}.log")
            for i in range(3)
        ]
        r = connect(url)
        broker = Broker(r, prefix)
        closers = [r]
        try:
            deadline = time.monotonic() + 20
            while sum(1 for w in await broker.workers() if w["alive"]) < 3:
                assert time.monotonic() < deadline, "workers did not start"
                assert all(w.poll() is None for w in workers), "a worker exited"
                await asyncio.sleep(0.05)
            s = await submit_spec(broker, parse_spec(failover_spec(seed=11), "failover"))
            run_key = broker.keys.run(s.run_id)
            while int(await r.hget(run_key, "nodes_done") or 0) < 8:
                assert time.monotonic() < deadline, "the run made no progress before the failover"
                await asyncio.sleep(0.02)
            old = cluster.primary_port
            done_before = int(await r.hget(run_key, "nodes_done") or 0)
            t0 = time.monotonic()
            if how == "kill":
                cluster.kill(old)
            else:
                cluster.client(cluster.sentinel_ports[0]).sentinel_failover("oao")
            new = await asyncio.to_thread(cluster.wait_failover, old, 20.0)
            promoted_s = time.monotonic() - t0
            # Read the promoted replica itself: until Sentinel demotes the old primary, a
            # client still connected to it would see a state that is about to be discarded.
            primary = connect(f"redis://127.0.0.1:{new}/{cluster.db}")
            direct = Broker(primary, prefix)
            try:
                status = await wait_for_run(direct, s.run_id, interval_s=0.1, timeout_s=30)
            except TimeoutError:
                logs = "".join(p.read_text() for p in tmp_path.glob("w*.log"))
                died = [
                    f"{name} exited {p.returncode}: " + _last_error(tmp_path / f"{name}.log")
                    for name, p in [("serve", serve), *((f"w{i}", w) for i, w in enumerate(workers))]
                    if p.poll() is not None
                ]
                assert not died, f"processes died during the failover: {died}"
                left = await stranded(direct, s.run_id, logs)
                pytest.fail(
                    "the run did not finish within 30 s of the failover. Writes the old primary "
                    "acknowledged were lost with it: a node its worker completed there is RUNNING "
                    "again in that live worker's active list, and only a worker that reconciles "
                    "its active list hands it back. Nodes left behind: "
                    f"{json.dumps(left, indent=1)}"
                )
            finally:
                closers.append(primary)
            took_s = time.monotonic() - t0
            assert status == "SUCCEEDED"
            assert (await primary.info("replication"))["role"] == "master"
            assert done_before < NODES, "the failover happened after the run"
            # Not chaoskit.check_invariants: a failover may lose acknowledged writes (the
            # demotion window always does; a SIGKILL only the last unreplicated ones).
            figures = await check_converged(direct, s.run_id, ledger)
            logs = "".join(p.read_text() for p in tmp_path.glob("*.log"))
            assert all(w.poll() is None for w in workers), "a worker died during the failover"
            assert serve.poll() is None, "serve died during the failover"
            return {
                **figures,
                "nodes_done_at_failover": done_before,
                "promoted_after_s": round(promoted_s, 2),
                "run_done_after_s": round(took_s, 2),
                "workers_saw_errors": logs.count("redis.write_retrying") + logs.count("redis_unavailable"),
                "refused_writes_logged": logs.count("NOREPLICAS"),
            }
        finally:
            stop(serve, *workers)
            for c in closers:
                await c.aclose()


async def test_primary_sigkill_mid_run(tmp_path: Path, prefix: str) -> None:
    """SIGKILL the primary mid-run: Sentinel promotes the replica, every OAO process
    rediscovers it, and the run completes SUCCEEDED with no job left in any list."""
    figures = await run_through_failover(tmp_path, prefix, "kill")
    print("sentinel kill figures:", json.dumps(figures))


async def test_primary_demoted_mid_run(tmp_path: Path, prefix: str) -> None:
    """``SENTINEL FAILOVER`` mid-run: the old primary stays up and accepts writes until
    Sentinel demotes it, so the writes of that window (completions among them) are lost;
    workers move to the new primary, reconcile their active lists, and the run
    completes SUCCEEDED."""
    figures = await run_through_failover(tmp_path, prefix, "demote")
    print("sentinel demote figures:", json.dumps(figures))


async def test_primary_demoted_mid_run_with_min_replicas_to_write(tmp_path: Path, prefix: str) -> None:
    """``min-replicas-to-write 1`` with one replica: the old primary refuses writes
    (``NOREPLICAS``) as soon as the promoted replica leaves it, and so does the new one
    until the old primary rejoins as its replica. Writes wait instead of being lost; the
    run completes SUCCEEDED once Sentinel has reconfigured the old primary."""
    figures = await run_through_failover(tmp_path, prefix, "demote", min_replicas_to_write=1)
    print("sentinel demote (min-replicas-to-write 1) figures:", json.dumps(figures))
    assert figures["refused_writes_logged"] > 0, "no process saw a NOREPLICAS refusal"


async def test_pool_leaves_a_demoted_primary_that_is_still_up(tmp_path: Path) -> None:
    """After ``SENTINEL FAILOVER`` the old primary keeps accepting writes until Sentinel
    reconfigures it (~10 s). The pool re-asks the Sentinels every ``recheck_s`` and
    moves every connection, idle or in use, to the new primary before that."""
    with SentinelCluster(tmp_path / "redis") as cluster:
        r = connect(cluster.url, max_connections=4)
        try:
            await asyncio.gather(*(r.set(f"k{i}", "before") for i in range(8)))
            old = cluster.primary_port
            assert cluster.client(old).get("k0") == "before"
            cluster.client(cluster.sentinel_ports[0]).sentinel_failover("oao")
            new = await asyncio.to_thread(cluster.wait_failover, old, 20.0)
            deadline = time.monotonic() + 10
            while cluster.client(new).get("probe") is None:
                assert time.monotonic() < deadline, "writes never reached the new primary"
                await r.set("probe", "1")
                await asyncio.sleep(0.05)
            assert cluster.client(old).info("replication")["role"] == "master", (
                "Sentinel demoted the old primary first: the pool did not move by itself"
            )
            # 8 concurrent writers through a pool of 4: they wait for connections
            await asyncio.gather(*(r.set(f"k{i}", "after") for i in range(8)))
            assert cluster.client(new).mget([f"k{i}" for i in range(8)]) == ["after"] * 8
            pool = r.connection_pool
            ports = {c.port for c in (*pool._available_connections, *pool._in_use_connections)}
            assert ports == {new}, ports
        finally:
            await r.aclose()


async def test_readonly_from_a_demoted_primary_rediscovers(tmp_path: Path) -> None:
    """A write on a pooled connection to a primary turned replica gets READONLY;
    redis-py's Sentinel connection drops it, asks the Sentinels again, and the retried
    write lands on the new primary without an error reaching the caller."""
    with SentinelCluster(tmp_path / "redis") as cluster:
        r = connect(cluster.url, max_connections=2)
        r.connection_pool.recheck_s = float("inf")  # only the READONLY path may move it
        try:
            await r.set("k", "before")
            old = cluster.primary_port
            cluster.client(cluster.sentinel_ports[0]).sentinel_failover("oao")
            new = await asyncio.to_thread(cluster.wait_failover, old, 20.0)
            cluster.client(old).replicaof("127.0.0.1", new)  # no client kill, unlike Sentinel
            await asyncio.to_thread(cluster.wait_replica_of, old, new, 20.0)
            await r.set("k", "after")
            assert cluster.client(new).get("k") == "after"
            assert {c.port for c in r.connection_pool._available_connections} == {new}
        finally:
            await r.aclose()
