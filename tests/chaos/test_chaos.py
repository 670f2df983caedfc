"""Chaos: real oao-worker processes killed with SIGKILL / SIGSTOP, Redis restarted.

Bounded in time: each test gives up (and fails) after its deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import yaml
from chaoskit import check_invariants, read_ledger
from oao_testkit import wait_until
from proc import start_serve, start_worker, stop

from oao_common.broker import Broker
from oao_common.connection import EmbeddedServer, connect
from oao_common.spec import parse_spec
from oao_scheduler.progress import wait_for_run
from oao_scheduler.submit import submit_spec

pytestmark = pytest.mark.chaos

HB = "1.0"  # heartbeat TTL of the chaos fleet, seconds


def chaos_spec(n: int, seed: int, delay: float = 0.05) -> str:
    """A layered DAG of n nodes, each with 4 steps (2 model calls, 2 side effects),
    depending on 1-2 random nodes of the previous layer."""
    rng = random.Random(seed)
    width = 12
    nodes = []
    for i in range(n):
        layer = i // width
        deps = []
        if layer:
            prev = list(range((layer - 1) * width, layer * width))
            deps = [f"n{j}" for j in sorted(rng.sample(prev, rng.choice([1, 2])))]
        nodes.append({"id": f"n{i}", "agent": "a", "depends_on": deps})
    doc = {
        "name": "chaos",
        "defaults": {
            "policy": {"max_steps": 20, "timeout_s": 60},
            "retry": {"max_retries": 3, "retry_delay_s": 0.1},
        },
        "models": {"m": {"provider": "scripted", "reply_delay_s": delay, "replies": ["ok"]}},
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


async def test_sigkill_random_workers(redis_url: str, prefix: str, tmp_path: Path) -> None:
    """300 nodes, 3 workers, one SIGKILLed every 1-2 s and replaced."""
    ledger = tmp_path / "ledger.txt"
    env = {"OAO_TEST_LEDGER": str(ledger)}
    args = ("--concurrency", "4", "--heartbeat-ttl", HB, "--grace-period", "1")
    serve = start_serve(
        redis_url,
        prefix,
        "--reaper-interval",
        "0.2",
        "--heartbeat-ttl",
        HB,
        "--max-requeues",
        "50",
        log=tmp_path / "serve.log",
    )
    workers = [
        start_worker(redis_url, prefix, *args, extra_env=env, log=tmp_path / f"w{i}.log") for i in range(3)
    ]
    r = connect(redis_url)
    broker = Broker(r, prefix)
    rng = random.Random(1)
    kills = 0
    try:
        s = await submit_spec(broker, parse_spec(chaos_spec(300, seed=7, delay=0.2), "chaos"))
        deadline = time.monotonic() + 240
        next_kill = time.monotonic() + rng.uniform(1, 2)
        while not await broker.run_is_terminal(s.run_id):
            assert time.monotonic() < deadline, "chaos run did not finish in time"
            if time.monotonic() >= next_kill:
                victim = rng.randrange(len(workers))
                workers[victim].send_signal(signal.SIGKILL)
                workers[victim].wait()
                kills += 1
                workers[victim] = start_worker(
                    redis_url, prefix, *args, extra_env=env, log=tmp_path / f"w{kills + 3}.log"
                )
                next_kill = time.monotonic() + rng.uniform(1, 2)
            await asyncio.sleep(0.05)
        figures = await check_invariants(broker, s.run_id, ledger)
        print("chaos figures:", json.dumps({**figures, "kills": kills}))
        assert kills >= 5
        assert figures["requeued"] >= 1  # the reaper did work
    finally:
        stop(serve, *workers)
        await r.aclose()


async def test_sigstop_zombie_cannot_write(redis_url: str, prefix: str, tmp_path: Path) -> None:
    """A worker paused past its heartbeat TTL is reaped; after SIGCONT none of its writes
    land and it runs no further side effect."""
    ledger = tmp_path / "ledger.txt"
    env = {"OAO_TEST_LEDGER": str(ledger)}
    spec = {
        "name": "zombie",
        "models": {"m": {"provider": "scripted", "reply_delay_s": 1.5, "replies": ["hm"]}},
        "agents": {
            "z": {
                "kind": "python",
                "entrypoint": "oao_test_agents:zombie_agent",
                "model": "m",
                "tools": ["ext"],
            }
        },
        "tools": {"ext": {"entrypoint": "oao_test_agents:ext_ledger"}},
        "nodes": [{"id": "z", "agent": "z"}, {"id": "after", "agent": "z", "depends_on": ["z"]}],
    }
    serve = start_serve(
        redis_url, prefix, "--reaper-interval", "0.2", "--heartbeat-ttl", HB, log=tmp_path / "serve.log"
    )
    w1 = start_worker(redis_url, prefix, "--heartbeat-ttl", HB, extra_env=env, log=tmp_path / "w1.log")
    r = connect(redis_url)
    broker = Broker(r, prefix)
    w2 = None
    try:
        s = await submit_spec(broker, parse_spec(yaml.safe_dump(spec), "zombie"))
        node_key = broker.keys.node(s.run_id, "z")
        deadline = time.monotonic() + 30
        while await r.hget(node_key, "steps_recorded") != "1":  # side effect a recorded,
            assert time.monotonic() < deadline  # slow model call in flight
            await asyncio.sleep(0.02)
        w1.send_signal(signal.SIGSTOP)
        while await r.hget(node_key, "status") != "READY":  # reaped
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        w2 = start_worker(redis_url, prefix, "--heartbeat-ttl", HB, extra_env=env, log=tmp_path / "w2.log")
        while await r.hget(node_key, "status") != "SUCCEEDED":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        w1.send_signal(signal.SIGCONT)  # the zombie wakes up mid model call
        await wait_for_run(broker, s.run_id, interval_s=0.05, timeout_s=30)
        await asyncio.sleep(2.0)  # let the zombie try its writes
        events = await broker.events(s.run_id)
        lines = [(a, label) for _k, a, step, label in read_ledger(ledger) if "/z#" in step]
        assert sorted(lines) == [(1, "a"), (2, "b"), (2, "c")], lines  # zombie ran nothing more
        assert [e.attempt for e in events if e.type == "NODE_SUCCEEDED" and e.node == "z"] == [2]
        # Two defences race when the zombie wakes: its next fenced write is rejected, or its
        # heartbeat loop notices the lapse first and abandons the node. Either is fine;
        # what must hold is that nothing it did after the reap landed.
        stale = [e for e in events if e.type == "STALE_ATTEMPT_REJECTED" and e.node == "z"]
        log1 = (tmp_path / "w1.log").read_text()
        assert all(e.attempt == 1 for e in stale)
        assert stale or "node.lease_lost" in log1, log1[-2000:]
        steps = await broker.get_steps(s.run_id)
        assert [steps[f"z:{i}"]["attempt"] for i in (1, 2, 3, 4, 5)] == [1, 2, 2, 2, 2]
        await check_invariants(broker, s.run_id, ledger)
    finally:
        stop(serve, w1, *([w2] if w2 else []))
        await r.aclose()


async def test_redis_restart_mid_run(tmp_path: Path, prefix: str) -> None:
    """A Redis (Valkey, AOF on) restart in the middle of a run: workers and the
    scheduler reconnect and the run completes with every guarantee intact."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = tmp_path / "data"
    server = EmbeddedServer(data_dir=str(data), appendonly=True, port=port).start()
    url = server.url
    ledger = tmp_path / "ledger.txt"
    env = {"OAO_TEST_LEDGER": str(ledger)}
    serve = start_serve(
        url, prefix, "--reaper-interval", "0.2", "--heartbeat-ttl", "5", log=tmp_path / "serve.log"
    )
    workers = [
        start_worker(
            url,
            prefix,
            "--concurrency",
            "4",
            "--heartbeat-ttl",
            "5",
            extra_env=env,
            log=tmp_path / f"w{i}.log",
        )
        for i in range(2)
    ]
    try:
        r = connect(url)
        broker = Broker(r, prefix)
        s = await submit_spec(broker, parse_spec(chaos_spec(60, seed=3, delay=0.1), "restart"))
        await wait_until(
            lambda: r.hget(broker.keys.run(s.run_id), "nodes_done"),
            lambda n: int(n or 0) >= 10,
            60,
            "10 nodes",
        )
        await r.aclose()
        server.stop()  # SIGTERM: the AOF is flushed on shutdown
        await asyncio.sleep(1.5)
        server = EmbeddedServer(data_dir=str(data), appendonly=True, port=port).start()
        r = connect(url)
        broker = Broker(r, prefix)
        await wait_for_run(broker, s.run_id, interval_s=0.1, timeout_s=120)
        figures = await check_invariants(broker, s.run_id, ledger)
        print("restart figures:", json.dumps(figures))
        logs = "".join((tmp_path / f"w{i}.log").read_text() for i in range(2))
        # the workers noticed (and said so), and survived
        assert "redis.write_retrying" in logs or "redis_unavailable" in logs
        assert "redis.write_recovered" in logs or "redis_unavailable" in logs
        assert all(w.poll() is None for w in workers)
        await r.aclose()
    finally:
        stop(serve, *workers)
        server.stop()
        os.environ.pop("OAO_TEST_LEDGER", None)
