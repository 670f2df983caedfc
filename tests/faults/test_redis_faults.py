"""Redis faults against real OAO processes, each test on its own embedded Valkey.

The faults a production Redis really has: ``maxmemory`` reached under ``noeviction``
(OOM replies), a demoted primary (READONLY replies), a reply lost on the wire (the
client re-sends the command: a TCP proxy in ``redis_fault_kit.py`` swallows it), a
restart that lost acknowledged writes (the data goes back in time), a pod restarted
under the same worker id, a worker killed in the middle of a budgeted model call, a
blip while a fresh worker loads a run's spec, and a restart while ``submit --wait``
polls the run. The guarantees at stake are in docs/guarantees.md (convergence after
faults, stranded jobs, exactly-once completion).

Every wait has a deadline; the fault windows are the only fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from proc import BIN, ROOT, env, start_serve, start_worker, stop
from redis import exceptions as redis_exc
from redis.asyncio import Redis
from redis_fault_kit import (
    HERE,
    FaultProxy,
    check_run_succeeded,
    free_port,
    live_workers,
    read_logs,
    wait_run_end,
    wait_until,
)

from oao_common.broker import Broker
from oao_common.connection import EmbeddedServer, connect
from oao_common.spec import Spec, parse_spec
from oao_scheduler.submit import submit_spec

pytestmark = pytest.mark.chaos

APP_DIR = ("--app-dir", str(HERE))


def spec_of(nodes: list[dict[str, Any]], **extra: Any) -> Spec:
    """A spec with the test agents (sleeper, one_call, and this directory's agents);
    ``agents_extra`` adds agents, other keywords are top-level spec fields."""
    doc: dict[str, Any] = {
        "name": extra.pop("name", "faults"),
        "models": extra.pop("models", {"m": {"provider": "scripted", "replies": ["ok"]}}),
        "agents": {
            "sleeper": {"kind": "python", "entrypoint": "oao_test_agents:sleeper"},
            "one": {"kind": "python", "entrypoint": "oao_test_agents:one_call", "model": "m"},
            "ledger": {"kind": "python", "entrypoint": "redis_fault_agents:ledger_sleeper"},
            "slow_first": {"kind": "python", "entrypoint": "redis_fault_agents:slow_first_attempt"},
            **extra.pop("agents_extra", {}),
        },
        "tools": extra.pop("tools", {}),
        "nodes": nodes,
    }
    doc.update(extra)
    return parse_spec(yaml.safe_dump(doc), "faults")


def sleepers(n: int, seconds: float, agent: str = "sleeper") -> list[dict[str, Any]]:
    return [{"id": f"n{i}", "agent": agent, "task": str(seconds)} for i in range(n)]


async def wait_port_closed(port: int, timeout_s: float) -> None:
    """Wait until nothing accepts connections on 127.0.0.1:``port`` (the server is gone)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return
        w.close()
        assert time.monotonic() < deadline, f"the server on port {port} did not stop"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def client(url: str, prefix: str) -> AsyncIterator[Broker]:
    r = connect(url)
    try:
        yield Broker(r, prefix)
    finally:
        await r.aclose()


async def stop_all(*procs: subprocess.Popen[bytes] | None) -> None:
    """Stop processes off the event loop (a proxy on this loop must keep serving them)."""
    await asyncio.to_thread(stop, *[p for p in procs if p is not None])


def alive(*procs: subprocess.Popen[bytes]) -> list[int | None]:
    return [p.poll() for p in procs]


async def nodes_done(broker: Broker, run_id: str) -> int:
    return int(await broker.redis.hget(broker.keys.run(run_id), "nodes_done") or 0)


# ---------------------------------------------------------------- 1, 2: error replies


async def _error_reply_episode(
    tmp_path: Path,
    prefix: str,
    inject: Callable[[Redis], Awaitable[None]],
    restore: Callable[[Redis], Awaitable[None]],
    code: str,
) -> None:
    """30 nodes on 2 worker processes and serve; the server answers every write with
    ``code`` for 3 s while nodes are claimed and completed. Everything must survive,
    say so in its log, and finish the run cleanly."""
    with EmbeddedServer() as server:
        url = server.url
        serve = start_serve(
            url, prefix, "--reaper-interval", "0.5", "--heartbeat-ttl", "8", log=tmp_path / "serve.log"
        )
        args = ("--concurrency", "3", "--heartbeat-ttl", "8", "--grace-period", "1")
        workers = [start_worker(url, prefix, *args, log=tmp_path / f"w{i}.log") for i in range(2)]
        logs = (tmp_path / "serve.log", tmp_path / "w0.log", tmp_path / "w1.log")
        try:
            async with client(url, prefix) as broker:
                await wait_until(lambda: live_workers(broker), 2, 30, "2 workers up", logs)
                s = await submit_spec(broker, spec_of(sleepers(30, 0.5)))
                await wait_until(
                    lambda: nodes_done(broker, s.run_id), lambda n: n >= 5, 30, "5 nodes done", logs
                )
                await inject(broker.redis)
                try:
                    await asyncio.sleep(3.0)  # the fault window
                    assert alive(serve, *workers) == [None] * 3, "a process died during the episode"
                finally:
                    await restore(broker.redis)
                assert await wait_run_end(broker, s.run_id, 40, logs) == "SUCCEEDED"
                await check_run_succeeded(broker, s.run_id)
                assert alive(serve, *workers) == [None] * 3, "a process died after the episode"
                wlogs = read_logs(*(tmp_path / f"w{i}.log" for i in range(2)))
                assert code in wlogs, wlogs[-3000:]
                assert "redis_error" in wlogs or "write_retrying" in wlogs, wlogs[-3000:]
        finally:
            await stop_all(serve, *workers)


async def test_oom_episode_mid_run(tmp_path: Path, prefix: str) -> None:
    """``maxmemory`` reached under ``noeviction``: every write answered ``OOM`` for 3 s."""
    saved: dict[Any, Any] = {}

    async def inject(r: Redis) -> None:
        saved.update(await r.config_get("maxmemory"))
        saved.update(await r.config_get("maxmemory-policy"))
        await r.config_set("maxmemory-policy", "noeviction")
        await r.config_set("maxmemory", "1")

    async def restore(r: Redis) -> None:
        await r.config_set("maxmemory", saved.get("maxmemory", "0"))
        await r.config_set("maxmemory-policy", saved.get("maxmemory-policy", "noeviction"))

    await _error_reply_episode(tmp_path, prefix, inject, restore, "OOM")


async def test_readonly_episode_mid_run(tmp_path: Path, prefix: str) -> None:
    """The server becomes a replica of an unreachable primary (a demoted primary after a
    failover): writes answered ``READONLY``, blocked BLPOPs unblocked with an error,
    reads still served; 3 s later it is a primary again with its data."""
    closed_port = free_port()

    async def inject(r: Redis) -> None:
        await r.execute_command("REPLICAOF", "127.0.0.1", str(closed_port))

    async def restore(r: Redis) -> None:
        await r.execute_command("REPLICAOF", "NO", "ONE")

    await _error_reply_episode(tmp_path, prefix, inject, restore, "READONLY")


# ---------------------------------------------------------------- 3: lost claim replies


async def test_claim_reply_lost_and_resent(tmp_path: Path, prefix: str) -> None:
    """One worker talks to Redis through a proxy that swallows three non-empty claim
    replies (closing the connection each time, so redis-py re-sends the claim on a new
    connection). The re-sent claims must return the jobs the first ones took: every
    node runs and succeeds once and no job stays stranded in the worker's active list."""
    with EmbeddedServer() as server:
        proxy = await FaultProxy(server.url).start()
        url = server.url
        serve = start_serve(
            url, prefix, "--reaper-interval", "0.2", "--heartbeat-ttl", "5", log=tmp_path / "serve.log"
        )
        args = ("--concurrency", "3", "--heartbeat-ttl", "5", "--grace-period", "1")
        w_proxied = start_worker(proxy.url, prefix, *args, log=tmp_path / "w_proxied.log")
        w_direct = start_worker(url, prefix, *args, log=tmp_path / "w_direct.log")
        logs = (tmp_path / "w_proxied.log", tmp_path / "w_direct.log")
        try:
            async with client(url, prefix) as broker:
                await wait_until(lambda: live_workers(broker), 2, 30, "2 workers up", logs)
                proxy.drop_replies("claim", 3)
                s = await submit_spec(broker, spec_of(sleepers(40, 0.3)))
                await wait_until(lambda: proxy.dropped["claim"], 3, 30, "3 claim replies dropped", logs)
                assert await wait_run_end(broker, s.run_id, 30, logs) == "SUCCEEDED"
                events = await check_run_succeeded(broker, s.run_id)
                assert alive(serve, w_proxied, w_direct) == [None] * 3
                # the proxied worker really ran nodes after its lost replies
                workers_of = {e.data.get("worker") for e in events if e.type == "NODE_STARTED"}
                assert len(workers_of) == 2, workers_of
        finally:
            await stop_all(serve, w_proxied, w_direct)
            await proxy.aclose()


async def test_claim_reply_lost_then_redis_unreachable(tmp_path: Path, prefix: str) -> None:
    """A claim's reply is lost and, for 1.5 s, the proxied worker cannot open a new
    connection, so redis-py's re-sends fail too and the claim ends in an error. The
    jobs that claim took sit in the worker's active list, RUNNING under a live worker:
    the worker must hand them back (reconciliation) instead of stranding them."""
    with EmbeddedServer() as server:
        proxy = await FaultProxy(server.url).start()
        url = server.url
        serve = start_serve(
            url, prefix, "--reaper-interval", "0.2", "--heartbeat-ttl", "5", log=tmp_path / "serve.log"
        )
        args = ("--concurrency", "3", "--heartbeat-ttl", "5", "--grace-period", "1")
        worker = start_worker(proxy.url, prefix, *args, log=tmp_path / "w.log")
        logs = (tmp_path / "w.log",)
        try:
            async with client(url, prefix) as broker:
                await wait_until(lambda: live_workers(broker), 1, 30, "the worker up", logs)
                proxy.drop_replies("claim", 1, refuse_s=1.5)
                s = await submit_spec(broker, spec_of(sleepers(9, 0.2)))
                await wait_until(lambda: proxy.dropped["claim"], 1, 30, "a claim reply dropped", logs)
                assert await wait_run_end(broker, s.run_id, 30, logs) == "SUCCEEDED"
                events = await check_run_succeeded(broker, s.run_id)
                assert proxy.refused >= 1  # the re-sends really failed
                handed_back = [e for e in events if e.type == "NODE_HANDED_BACK"]
                assert handed_back, "the jobs of the failed claim were not handed back"
                assert alive(serve, worker) == [None, None]
        finally:
            await stop_all(serve, worker)
            await proxy.aclose()


async def test_fenced_writes_resent_after_lost_replies(tmp_path: Path, prefix: str) -> None:
    """Replies to the fenced writes (begin_step, record_step, complete, fail) are lost and
    the calls re-sent. Each re-sent call must change nothing and get the first call's
    answer: no STALE_ATTEMPT_REJECTED (the worker's own write is not stale), every step
    counted once, every failed attempt counted once, every side effect run once."""
    ledger = tmp_path / "ledger.txt"
    with EmbeddedServer() as server:
        proxy = await FaultProxy(server.url).start()
        url = server.url
        serve = start_serve(
            url, prefix, "--reaper-interval", "0.2", "--heartbeat-ttl", "5", log=tmp_path / "serve.log"
        )
        worker = start_worker(
            proxy.url,
            prefix,
            "--concurrency",
            "3",
            "--heartbeat-ttl",
            "5",
            "--grace-period",
            "1",
            extra_env={"OAO_TEST_LEDGER": str(ledger)},
            log=tmp_path / "w.log",
        )
        logs = (tmp_path / "w.log",)
        try:
            async with client(url, prefix) as broker:
                await wait_until(lambda: live_workers(broker), 1, 30, "the worker up", logs)
                for script in ("begin_step", "record_step", "complete", "fail"):
                    proxy.drop_replies(script, 2)
                nodes = [{"id": f"c{i}", "agent": "steps"} for i in range(6)]
                nodes += [{"id": f"f{i}", "agent": "flaky", "task": f"{prefix}-f{i}:1"} for i in range(3)]
                spec = spec_of(
                    nodes,
                    models={"m": {"provider": "scripted", "replies": ["ok"]}},
                    agents_extra={
                        "steps": {
                            "kind": "python",
                            "entrypoint": "oao_test_agents:chaos_agent",
                            "model": "m",
                            "tools": ["ext"],
                        },
                        "flaky": {"kind": "python", "entrypoint": "oao_test_agents:flaky"},
                    },
                    tools={"ext": {"entrypoint": "oao_test_agents:ext_ledger", "idempotent": True}},
                    # retries due after the re-sent fail calls: see the next test for the race
                    defaults={"retry": {"max_retries": 2, "retry_delay_s": 1.0, "jitter": False}},
                )
                s = await submit_spec(broker, spec)
                assert await wait_run_end(broker, s.run_id, 30, logs) == "SUCCEEDED"
                events = await check_run_succeeded(broker, s.run_id)
                assert dict(proxy.dropped) == {"begin_step": 2, "record_step": 2, "complete": 2, "fail": 2}
                stale = [(e.node, e.data) for e in events if e.type == "STALE_ATTEMPT_REJECTED"]
                assert not stale, stale
                run = await broker.get_run(s.run_id)
                # 6 nodes x (2 model calls + 2 tool calls), and the 3 sync invocations that succeeded
                assert (int(run["steps"]), int(run["tool_calls"])) == (27, 12)
                retried = await broker.get_nodes(s.run_id, ["f0", "f1", "f2"])
                assert [n.get("retries") for n in retried] == ["1", "1", "1"]
                assert len([e for e in events if e.type == "NODE_RETRY_SCHEDULED"]) == 3
                effects = [line.split(" ")[0] for line in ledger.read_text().splitlines()]
                assert len(effects) == 12 and len(set(effects)) == 12, effects
                assert alive(serve, worker) == [None, None]
        finally:
            await stop_all(serve, worker)
            await proxy.aclose()


async def test_failure_resent_after_its_retry_succeeded_elsewhere(tmp_path: Path, prefix: str) -> None:
    """A worker's ``fail`` call (retry scheduled) runs but its reply is lost, and the
    worker is cut off from Redis. Meanwhile another worker runs the retry and completes
    the node. When the cut-off worker's re-sent call finally arrives it must get the
    first call's answer (retry scheduled), as promised for a re-sent ``fail.lua``
    (docs/architecture.md, "Calls that are sent twice"): it is the same call, not a
    stale write, so no STALE_ATTEMPT_REJECTED may appear in the run's log."""
    with EmbeddedServer() as server:
        proxy = await FaultProxy(server.url).start()
        url = server.url
        serve = start_serve(
            url, prefix, "--reaper-interval", "0.2", "--heartbeat-ttl", "30", log=tmp_path / "serve.log"
        )
        args = ("--heartbeat-ttl", "30", "--grace-period", "1", *APP_DIR)
        cut = start_worker(proxy.url, prefix, *args, log=tmp_path / "w_cut.log")
        other = None
        logs = (tmp_path / "w_cut.log", tmp_path / "w_other.log")
        try:
            async with client(url, prefix) as broker:
                await wait_until(lambda: live_workers(broker), 1, 30, "the first worker up", logs)
                proxy.drop_replies("fail", 1, refuse_s=math.inf, cut_all=True)
                spec = spec_of(
                    [{"id": "a", "agent": "fail_first"}],
                    agents_extra={
                        "fail_first": {
                            "kind": "python",
                            "entrypoint": "redis_fault_agents:fail_first_attempt",
                        }
                    },
                    defaults={"retry": {"max_retries": 2, "retry_delay_s": 0.1}},
                )
                s = await submit_spec(broker, spec)
                await wait_until(lambda: proxy.dropped["fail"], 1, 30, "the fail reply dropped", logs)
                other = start_worker(url, prefix, *args, log=tmp_path / "w_other.log")
                assert await wait_run_end(broker, s.run_id, 30, logs) == "SUCCEEDED"
                proxy.reopen()  # the cut-off worker's re-sent call goes through now
                answered = ("node.retry_scheduled", "node.stale_failure_rejected", "node.fail_not_recorded")
                await wait_until(
                    lambda: [a for a in answered if a in read_logs(tmp_path / "w_cut.log")],
                    bool,
                    40,
                    "the re-sent fail call answered",
                    logs,
                )
                events = await check_run_succeeded(broker, s.run_id)
                assert [e.attempt for e in events if e.type == "NODE_SUCCEEDED"] == [2]
                stale = [(e.attempt, e.data) for e in events if e.type == "STALE_ATTEMPT_REJECTED"]
                assert not stale, f"a re-sent fail call was rejected as stale: {stale}"
                assert "node.retry_scheduled" in read_logs(tmp_path / "w_cut.log")
                assert alive(serve, cut, other) == [None] * 3
        finally:
            await stop_all(serve, cut, other)
            await proxy.aclose()


# ---------------------------------------------------------------- 4: Redis rewinds


async def test_redis_rewind_to_an_older_snapshot(tmp_path: Path, prefix: str) -> None:
    """Redis crashes and comes back from a snapshot taken earlier: completions and claims
    acknowledged after the snapshot are gone, nodes that finished show RUNNING again
    under live workers, attempt counters go back. The run must converge (every node
    SUCCEEDED exactly once in the surviving log, no job left in a list), the processes
    must survive, and no execution whose claim was lost in the rewind may have its
    completion accepted (a fencing token must never be reissued)."""
    port = free_port()
    data = tmp_path / "data"
    ledger = tmp_path / "ledger.txt"
    env = {"OAO_FAULT_LEDGER": str(ledger)}
    server = EmbeddedServer(data_dir=str(data), port=port).start()
    url = server.url
    serve = start_serve(
        url, prefix, "--reaper-interval", "0.2", "--heartbeat-ttl", "5", log=tmp_path / "serve.log"
    )
    args = ("--concurrency", "4", "--heartbeat-ttl", "5", "--grace-period", "1", *APP_DIR)
    workers = [start_worker(url, prefix, *args, extra_env=env, log=tmp_path / f"w{i}.log") for i in range(2)]
    logs = (tmp_path / "serve.log", tmp_path / "w0.log", tmp_path / "w1.log")
    try:
        async with client(url, prefix) as broker:
            r = broker.redis
            await wait_until(lambda: live_workers(broker), 2, 30, "2 workers up", logs)
            s = await submit_spec(broker, spec_of(sleepers(24, 1.5, agent="ledger")))
            rid = s.run_id
            ids = [f"n{i}" for i in range(24)]
            await wait_until(lambda: nodes_done(broker, rid), lambda n: n >= 4, 40, "4 nodes done")
            # The snapshot, with writes paused so that what we read is what is saved.
            await r.execute_command("CLIENT", "PAUSE", "5000", "WRITE")
            try:
                # attempt counters at the snapshot: a later attempt number was claimed after it
                snap = {nid: int(await r.hget(broker.keys.node(rid, nid), "attempt") or 0) for nid in ids}
                done_at_save = await nodes_done(broker, rid)
                await r.save()
            finally:
                await r.execute_command("CLIENT", "UNPAUSE")
            # More progress that the crash will lose: completions and new claims.
            await wait_until(
                lambda: nodes_done(broker, rid), lambda n: n >= done_at_save + 3, 30, "3 more nodes done"
            )
            done_at_crash = await nodes_done(broker, rid)
            old_server_id = (await r.info("server"))["run_id"]
            with contextlib.suppress(redis_exc.ConnectionError):
                await r.shutdown(nosave=True)  # a crash: nothing after the snapshot survives
        await wait_port_closed(port, 10)
        t_restart = time.time()
        server = EmbeddedServer(data_dir=str(data), port=port).start()
        assert server.url == url
        async with client(url, prefix) as broker:
            assert (await broker.redis.info("server"))["run_id"] != old_server_id, "not restarted"
            # The rewind happened: progress went back (workers reconnect at once, so a node or
            # two may already have completed again: compare with the crash, not the save).
            assert await nodes_done(broker, rid) < done_at_crash, (done_at_save, done_at_crash)
            assert await wait_run_end(broker, rid, 60, logs) == "SUCCEEDED"
            await check_run_succeeded(broker, rid)
            assert alive(serve, *workers) == [None] * 3
            # No completion of an execution whose claim the rewind lost was accepted.
            starts, ends = {}, {}
            for line in ledger.read_text().splitlines():
                what, exec_id, nid, attempt, wid, ts = line.split(" ")
                if what == "start":
                    starts[exec_id] = (nid, int(attempt), wid, float(ts))
                else:
                    ends[exec_id] = float(ts)
            lost = {
                x
                for x, (nid, attempt, wid, ts) in starts.items()
                if ts < t_restart and attempt > snap[nid]  # claimed after the snapshot
            }
            # the case that matters happened: executions of lost claims finished after the
            # restart, while the same attempt numbers were being claimed again
            assert [x for x in lost if ends.get(x, 0) > t_restart], (lost, ends)
            nodes = await broker.get_nodes(rid, ids)
            winners = {n["id"]: json.loads(n["output"]) for n in nodes}
            accepted_lost = {nid: x for nid, x in winners.items() if x in lost}
            assert not accepted_lost, (
                f"completions of claims lost in the rewind were accepted: {accepted_lost}"
            )
            print(
                "rewind figures:",
                json.dumps(
                    {
                        "done_at_save": done_at_save,
                        "done_at_crash": done_at_crash,
                        "executions": len(starts),
                        "executions_with_lost_claims": len(lost),
                        "lost_claims_finished_after_restart": len(
                            [x for x in lost if ends.get(x, 0) > t_restart]
                        ),
                    }
                ),
            )
    finally:
        await stop_all(serve, *workers)
        server.stop()


# ---------------------------------------------------------------- 5: same worker id


async def test_worker_restarted_under_the_same_id(tmp_path: Path, prefix: str) -> None:
    """A pod (``--worker-id pod-0``) is SIGKILLed mid-node and restarted at once under the
    same id, so its heartbeat key never expires and no reaper would ever requeue the
    node. The new process must requeue what its previous life left and run it.

    No ``serve`` runs: the worker's own recovery is the only way the node can move.
    """
    with EmbeddedServer() as server:
        url = server.url
        args = ("--worker-id", "pod-0", "--heartbeat-ttl", "10", "--grace-period", "1", *APP_DIR)
        first = start_worker(url, prefix, *args, log=tmp_path / "w1.log")
        second = None
        try:
            async with client(url, prefix) as broker:
                s = await submit_spec(broker, spec_of([{"id": "long", "agent": "slow_first", "task": "60"}]))
                nk = broker.keys.node(s.run_id, "long")
                await wait_until(
                    lambda: broker.redis.hmget(nk, "status", "lease"),
                    ["RUNNING", "pod-0"],
                    30,
                    "long running",
                    (tmp_path / "w1.log",),
                )
                first.send_signal(signal.SIGKILL)
                first.wait(5)
                second = start_worker(url, prefix, *args, log=tmp_path / "w2.log")
                assert await broker.redis.exists(broker.keys.heartbeat("pod-0")) == 1  # still alive
                assert await wait_run_end(broker, s.run_id, 20, (tmp_path / "w2.log",)) == "SUCCEEDED"
                events = await check_run_succeeded(broker, s.run_id)
                requeued = [e for e in events if e.type == "NODE_REQUEUED" and e.node == "long"]
                assert len(requeued) == 1 and requeued[0].data.get("worker") == "pod-0", requeued
                assert [e.attempt for e in events if e.type == "NODE_SUCCEEDED"] == [2]
                assert second.poll() is None
        finally:
            await stop_all(first, second)


# ---------------------------------------------------------------- 6: budget of a dead attempt


async def test_dead_attempts_budget_reservation_is_released(tmp_path: Path, prefix: str) -> None:
    """A run budget of 1500 tokens; the node's model call reserves ~1000. The worker is
    SIGKILLed in the middle of the call, the reaper requeues the node, and the next
    attempt (another worker) must be able to reserve again: the dead attempt's
    reservation spends nothing."""
    with EmbeddedServer() as server:
        url = server.url
        serve = start_serve(
            url, prefix, "--reaper-interval", "0.2", "--heartbeat-ttl", "1", log=tmp_path / "serve.log"
        )
        args = ("--heartbeat-ttl", "1", "--grace-period", "1")
        first = start_worker(url, prefix, *args, log=tmp_path / "w1.log")
        second = None
        try:
            async with client(url, prefix) as broker:
                spec = spec_of(
                    [{"id": "a", "agent": "one", "task": "1000"}],
                    models={"m": {"provider": "scripted", "replies": ["short answer"], "reply_delay_s": 2.0}},
                    policy={"max_tokens": 1500},
                )
                s = await submit_spec(broker, spec)
                resk = broker.keys.reservations(s.run_id)
                await wait_until(lambda: broker.redis.hlen(resk), lambda n: n >= 1, 30, "a reservation")
                first.send_signal(signal.SIGKILL)
                first.wait(5)
                second = start_worker(url, prefix, *args, log=tmp_path / "w2.log")
                status = await wait_run_end(broker, s.run_id, 30, (tmp_path / "w2.log",))
                [node] = await broker.get_nodes(s.run_id, ["a"])
                assert status == "SUCCEEDED", node.get("error")
                events = await check_run_succeeded(broker, s.run_id)
                assert [e.attempt for e in events if e.type == "NODE_SUCCEEDED"] == [2]
                run = await broker.get_run(s.run_id)
                assert int(run["tokens_in"]) + int(run["tokens_out"]) <= 1500
                assert int(run.get("res_in", 0)) == 0 and int(run.get("res_out", 0)) == 0
                assert await broker.redis.hlen(resk) == 0
                assert alive(serve, second) == [None, None]
        finally:
            await stop_all(serve, first, second)


# ---------------------------------------------------------------- 7: cold-cache blip


async def test_spec_load_blip_on_a_fresh_worker_is_retried(tmp_path: Path, prefix: str) -> None:
    """A fresh worker (nothing cached) claims a node and cannot read the run's spec: for
    2 s every spec read's connection breaks (through a proxy). The worker rides the blip
    out (the read is retried like a fenced write) and the node succeeds in its first
    attempt, instead of failing for good."""
    with EmbeddedServer() as server:
        proxy = await FaultProxy(server.url).start()
        url = server.url
        serve = start_serve(
            url, prefix, "--reaper-interval", "0.2", "--heartbeat-ttl", "5", log=tmp_path / "serve.log"
        )
        worker = None
        try:
            async with client(url, prefix) as broker:
                spec = spec_of(
                    [{"id": "a", "agent": "sleeper", "task": "0.1"}],
                    defaults={"retry": {"max_retries": 3, "retry_delay_s": 0.2}},
                )
                s = await submit_spec(broker, spec)
                proxy.break_spec_reads(2.0)
                worker = start_worker(
                    proxy.url, prefix, "--heartbeat-ttl", "5", "--grace-period", "1", log=tmp_path / "w.log"
                )
                status = await wait_run_end(broker, s.run_id, 30, (tmp_path / "w.log",))
                [node] = await broker.get_nodes(s.run_id, ["a"])
                assert status == "SUCCEEDED", node.get("error")
                assert proxy.spec_reads_broken >= 1
                events = await check_run_succeeded(broker, s.run_id)
                started = [e.attempt for e in events if e.type == "NODE_STARTED"]
                assert started == [1], started  # the blip was ridden out: no retry spent
                assert alive(serve, worker) == [None, None]
        finally:
            await stop_all(serve, worker)
            await proxy.aclose()


async def test_spec_load_blip_does_not_fail_a_node_without_retries(tmp_path: Path, prefix: str) -> None:
    """The shortest blip: the fresh worker's one spec read fails (its connection breaks
    four times: the first try and redis-py's three re-sends), the next read works. The
    node (``max_retries: 0``) never started its agent: a Redis blip is not a failure of
    the node, so it must neither fail it for good nor cost it a retry."""
    with EmbeddedServer() as server:
        proxy = await FaultProxy(server.url).start()
        url = server.url
        serve = start_serve(
            url, prefix, "--reaper-interval", "0.2", "--heartbeat-ttl", "5", log=tmp_path / "serve.log"
        )
        worker = None
        try:
            async with client(url, prefix) as broker:
                spec = spec_of(
                    [{"id": "a", "agent": "sleeper", "task": "0.1"}], defaults={"retry": {"max_retries": 0}}
                )
                s = await submit_spec(broker, spec)
                proxy.break_spec_reads(10.0, most=4)
                worker = start_worker(
                    proxy.url, prefix, "--heartbeat-ttl", "5", "--grace-period", "1", log=tmp_path / "w.log"
                )
                status = await wait_run_end(broker, s.run_id, 30, (tmp_path / "w.log",))
                [node] = await broker.get_nodes(s.run_id, ["a"])
                assert proxy.spec_reads_broken == 4
                assert status == "SUCCEEDED", node.get("error")
                assert int(node.get("retries") or 0) == 0  # the blip cost the node no retry
                await check_run_succeeded(broker, s.run_id)
                assert alive(serve, worker) == [None, None]
        finally:
            await stop_all(serve, worker)
            await proxy.aclose()


# ---------------------------------------------------------------- 8: waiting for a run


async def test_submit_wait_rides_out_a_redis_restart(tmp_path: Path, prefix: str) -> None:
    """``submit --wait`` polls its run while Redis restarts (AOF on, so nothing is lost)
    and stays down for 2 s, longer than redis-py's own retries: the wait must log the
    errors and go on, and the command end with the run's report and exit 0, not die in
    the middle of the outage."""
    port = free_port()
    data = str(tmp_path / "data")
    server = EmbeddedServer(data_dir=data, appendonly=True, port=port).start()
    url = server.url
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "wait",
                "agents": {"sleeper": {"kind": "python", "entrypoint": "oao_test_agents:sleeper"}},
                "nodes": sleepers(6, 1.0),
            }
        )
    )
    wlog = tmp_path / "w.log"
    worker = start_worker(
        url, prefix, "--concurrency", "2", "--heartbeat-ttl", "5", "--grace-period", "1", log=wlog
    )
    cmd = [
        str(BIN / "oao-scheduler"),
        "submit",
        str(spec),
        "--wait",
        "--json",
        "--redis-url",
        url,
        "--prefix",
        prefix,
    ]
    waiter = subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        async with client(url, prefix) as broker:
            [run] = await wait_until(lambda: broker.recent_runs(1), bool, 15, "the run to be submitted")
            await wait_until(
                lambda: nodes_done(broker, run["id"]), lambda n: n >= 1, 30, "a node done", (wlog,)
            )
        server.stop()  # SIGTERM: the AOF is flushed
        await wait_port_closed(port, 10)
        await asyncio.sleep(2.0)  # the outage
        assert waiter.poll() is None, f"submit --wait ended during the outage: {waiter.communicate()}"
        server = EmbeddedServer(data_dir=data, appendonly=True, port=port).start()
        try:
            out, err = await asyncio.to_thread(waiter.communicate, timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError("submit --wait still waiting 60 s after Redis came back") from None
        assert waiter.returncode == 0, (waiter.returncode, err[-2000:])
        report = json.loads(out)
        assert report["status"] == "SUCCEEDED" and report["run_id"] == run["id"], report
        assert "wait.redis_error" in err, err[-2000:]  # it noticed, and said so
        assert worker.poll() is None
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.communicate()
        await stop_all(worker)
        server.stop()
