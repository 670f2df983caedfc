"""The worker's health endpoint (``oao-worker --health-port``), on real worker processes:
alive and ready while Redis answers; ready no more (but alive) while Redis is down and
ready again after it restarts; not ready while draining after SIGTERM; not alive while an
agent blocks the event loop longer than ``--health-max-stall``.

Every wait has a deadline; no assertion depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from faults.redis_fault_kit import free_port, log_tails, wait_until
from oao_testkit import make_spec
from proc import start_worker, stop

from oao_common.broker import Broker
from oao_common.connection import EmbeddedServer, connect
from oao_scheduler.submit import submit_spec

AGENTS = {
    "sleep": {"kind": "python", "entrypoint": "faults.fault_agents:marked_sleep"},
    "block": {"kind": "python", "entrypoint": "faults.fault_agents:block_loop"},
}


def probe(port: int, path: str) -> tuple[int, dict[str, Any]]:
    """GET http://127.0.0.1:PORT/PATH: (status, JSON body); (0, {}) when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, json.loads(body) if body.startswith(b"{") else {}
    except OSError:
        return 0, {}


async def aprobe(port: int, path: str) -> tuple[int, dict[str, Any]]:
    return await asyncio.to_thread(probe, port, path)


async def test_health_follows_redis_and_drain(tmp_path: Path) -> None:
    port = free_port()
    hport = free_port()
    server = EmbeddedServer(data_dir=str(tmp_path / "data"), port=port).start()
    url = server.url
    log = tmp_path / "worker.log"
    markers = tmp_path / "markers"
    worker = start_worker(
        url,
        "hc",
        "--health-port",
        str(hport),
        "--heartbeat-ttl",
        "1",
        "--grace-period",
        "60",
        log=log,
        extra_env={"OAO_TEST_MARKER_DIR": str(markers)},
    )
    r = connect(url)
    try:
        ready = await wait_until(
            lambda: aprobe(hport, "/readyz"), lambda v: v[0] == 200, 30, "the worker ready", (log,)
        )
        doc = ready[1]
        assert doc["alive"] and doc["ready"] and doc["reasons"] == []
        assert doc["heartbeat_thread"] == "running" and doc["heartbeat_age_s"] <= 1.0
        assert (await aprobe(hport, "/livez"))[0] == 200
        assert (await aprobe(hport, "/healthz"))[0] == 200
        assert (await aprobe(hport, "/metrics"))[0] == 404

        # Redis goes away: not ready, still alive (restarting the worker would not help).
        await r.aclose()
        server.stop()
        status, doc = await wait_until(
            lambda: aprobe(hport, "/readyz"), lambda v: v[0] == 503, 30, "not ready without Redis", (log,)
        )
        assert doc["alive"] and not doc["ready"]
        assert any("Redis unreachable" in x for x in doc["reasons"]), doc
        for _ in range(10):  # across several failed heartbeats
            status, doc = await aprobe(hport, "/livez")
            assert status == 200, doc
            await asyncio.sleep(0.3)

        # Redis is back (same port and data): ready again.
        server = EmbeddedServer(data_dir=str(tmp_path / "data"), port=port).start()
        await wait_until(
            lambda: aprobe(hport, "/readyz"), lambda v: v[0] == 200, 60, "ready after Redis restart", (log,)
        )

        # SIGTERM while a node runs: draining is alive but not ready.
        r = connect(url)
        broker = Broker(r, "hc")
        spec = make_spec([{"id": "slow", "agent": "sleep", "task": "120"}], agents=AGENTS)
        await submit_spec(broker, spec)
        await wait_until(lambda: (markers / "slow").exists(), True, 30, "the node running", (log,))
        worker.send_signal(signal.SIGTERM)
        status, doc = await wait_until(
            lambda: aprobe(hport, "/readyz"), lambda v: v[0] == 503, 30, "not ready while draining", (log,)
        )
        assert doc["stopping"] and doc["inflight"] == 1 and doc["alive"], doc
        assert any("stopping" in x for x in doc["reasons"]), doc
        assert (await aprobe(hport, "/livez"))[0] == 200
        worker.send_signal(signal.SIGTERM)  # the second signal ends the grace period
        assert await asyncio.to_thread(worker.wait, 30) == 0, log_tails(log)
        assert (await aprobe(hport, "/livez"))[0] == 0  # the endpoint went with the process
    finally:
        stop(worker)
        await r.aclose()
        server.stop()


async def test_blocked_event_loop_fails_liveness(broker: Broker, redis_url: str, tmp_path: Path) -> None:
    hport = free_port()
    log = tmp_path / "worker.log"
    prefix = broker.keys.prefix
    worker = start_worker(redis_url, prefix, "--health-port", str(hport), "--health-max-stall", "1", log=log)
    try:
        await wait_until(lambda: aprobe(hport, "/livez"), lambda v: v[0] == 200, 30, "alive", (log,))
        await wait_until(lambda: aprobe(hport, "/readyz"), lambda v: v[0] == 200, 30, "ready", (log,))
        spec = make_spec([{"id": "b", "agent": "block", "task": "6"}], agents=AGENTS)
        s = await submit_spec(broker, spec)
        _, doc = await wait_until(
            lambda: aprobe(hport, "/livez"), lambda v: v[0] == 503, 30, "not alive while blocked", (log,)
        )
        assert not doc["alive"] and not doc["ready"]
        assert any("event loop unresponsive" in x for x in doc["reasons"]), doc
        assert doc["heartbeat_thread"] == "running"  # the heartbeat thread kept beating
        await wait_until(lambda: aprobe(hport, "/livez"), lambda v: v[0] == 200, 60, "alive again", (log,))
        await wait_until(lambda: broker.run_is_terminal(s.run_id), True, 60, "the run to end", (log,))
        assert (await broker.get_run(s.run_id))["status"] == "SUCCEEDED"
    finally:
        stop(worker)
