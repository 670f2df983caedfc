"""The image and a fleet of containers, for real (Docker): chaos at the level operators
live at.

``test_image_runs_the_example``: ``docker run IMAGE oao-scheduler run
examples/blog_post.yaml`` succeeds, as a non-root user under dumb-init.

``test_container_fleet_survives_kill_stop_and_scale_out``: on a private network, a Redis
container (redis-server from Debian's packages), ``serve`` and three worker containers
(the repository's tests mounted as ``--app-dir``); a DAG of 300 nodes submitted from the
host. Mid-run ``serve`` is stopped, one worker container is ``docker kill``ed and another
``docker stop``ped (SIGTERM through dumb-init: it drains and hands its nodes back within
the grace period); ``oao-scheduler workers`` (in a container) must show the killed one
dead and the drained one gone; ``serve`` starts again and reaps the dead one; two more
workers start (scale out) and take work. Every node SUCCEEDED, nothing is left in any
list, no recorded step ran twice (tests/chaos/chaoskit.py).

Runs with OAO_TEST_DOCKER=1 only (a Docker daemon, root for debootstrap). Every wait has
a deadline.
"""

from __future__ import annotations

import asyncio
import json
import random
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from chaos.chaoskit import check_invariants
from dockerkit import IMAGE, REDIS_IMAGE, ROOT, Network, build_images, docker, needs_docker
from faults.redis_fault_kit import wait_until
from redis.exceptions import RedisError

from oao_common.broker import Broker
from oao_common.connection import connect
from oao_common.spec import parse_spec
from oao_scheduler.submit import submit_spec

pytestmark = [needs_docker, pytest.mark.timeout(1800)]

HB = "2"  # heartbeat TTL of the fleet, seconds
PREFIX = "fleet"
GATED = 60  # nodes of the last layers that wait for the gate


@pytest.fixture(scope="module")
def images() -> Iterator[None]:
    seconds = build_images()
    size = int(docker("image", "inspect", "-f", "{{.Size}}", IMAGE).stdout)
    print(f"\nimages built in {seconds:.0f} s; {IMAGE}: {size / 1e6:.0f} MB")
    yield


def fleet_spec(n: int, seed: int) -> str:
    """A layered DAG of n nodes (layers of 12, each node depending on 1-2 nodes of the
    previous layer); the last GATED nodes wait for the gate between their steps."""
    rng = random.Random(seed)
    width = 12
    nodes = []
    for i in range(n):
        layer = i // width
        deps = []
        if layer:
            prev = range((layer - 1) * width, layer * width)
            deps = [f"n{j}" for j in sorted(rng.sample(prev, rng.choice([1, 2])))]
        nodes.append({"id": f"n{i}", "agent": "g" if i >= n - GATED else "a", "depends_on": deps})
    agent = {"kind": "python", "model": "m", "tools": ["ext"]}
    doc = {
        "name": "container-fleet",
        "defaults": {
            "policy": {"max_steps": 20, "timeout_s": 600},
            "retry": {"max_retries": 3, "retry_delay_s": 0.1},
        },
        "models": {"m": {"provider": "scripted", "reply_delay_s": 0.05, "replies": ["ok"]}},
        "agents": {
            "a": {**agent, "entrypoint": "oao_test_agents:chaos_agent"},
            "g": {**agent, "entrypoint": "deployment.fleet_agents:gated"},
        },
        "tools": {"ext": {"entrypoint": "oao_test_agents:ext_ledger", "idempotent": True}},
        "nodes": nodes,
    }
    return yaml.safe_dump(doc)


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def test_image_runs_the_example(images: None) -> None:
    p = docker("run", "--rm", "--network", "none", IMAGE, "oao-scheduler", "run", "examples/blog_post.yaml")
    assert "SUCCEEDED" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    who = docker("run", "--rm", "--network", "none", IMAGE, "sh", "-c", "id -u; cat /proc/1/comm").stdout
    assert who.split() == ["10001", "dumb-init"], who


async def test_container_fleet_survives_kill_stop_and_scale_out(images: None, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    ledger = shared / "ledger.txt"
    net = Network()
    url_in = f"redis://redis-{net.id}:6379/0"
    common = ("-e", f"OAO_REDIS_URL={url_in}", "-e", f"OAO_PREFIX={PREFIX}", "-e", "OAO_LOG_FORMAT=json")
    worker_opts = (
        *common,
        "-v", f"{ROOT / 'tests'}:/agents:ro",
        "-v", f"{shared}:/shared",
        "-e", "OAO_TEST_LEDGER=/shared/ledger.txt",
        "-e", "OAO_FLEET_GATE=/shared/gate-open",
    )  # fmt: skip

    def start_worker(name: str) -> str:
        return net.run(
            name, IMAGE, "oao-worker", "--app-dir", "/agents", "--worker-id", f"{name}-{net.id}",
            "--concurrency", "4", "--heartbeat-ttl", HB, "--grace-period", "5", "--health-port", "8081",
            "--max-requeues", "50", opts=worker_opts,
        )  # fmt: skip

    def workers_listed() -> dict[str, dict[str, Any]]:
        """``oao-scheduler workers --json``, run the way an operator would: in a container."""
        out = net.once(IMAGE, "oao-scheduler", "workers", "--json", opts=common)
        return {w["id"]: w for w in json.loads(out)}

    async def listed() -> dict[str, dict[str, Any]]:
        return await asyncio.to_thread(workers_listed)

    r = None
    try:
        redis = net.run("redis", REDIS_IMAGE)
        serve_cmd = ("oao-scheduler", "serve", "--heartbeat-ttl", HB, "--reaper-interval", "0.5",
                     "--max-requeues", "50", "--metrics-port", "9100")  # fmt: skip
        serve = net.run("serve", IMAGE, *serve_cmd, opts=common)
        w = {name: start_worker(name) for name in ("w1", "w2", "w3")}
        wid = {name: f"{name}-{net.id}" for name in ("w1", "w2", "w3", "w4", "w5")}

        url = f"redis://{net.ip(redis)}:6379/0"
        r = connect(url)
        broker = Broker(r, PREFIX)

        async def pong() -> bool:
            try:
                return bool(await r.ping())
            except (RedisError, OSError):
                return False

        await wait_until(pong, True, 60, "Redis in its container", ())
        for name, c in w.items():  # the readiness probe the Helm chart uses
            health = f"http://{net.ip(c)}:8081/readyz"
            await wait_until(lambda h=health: asyncio.to_thread(http_status, h), 200, 60, f"{name} ready", ())

        s = await submit_spec(broker, parse_spec(fleet_spec(300, seed=12), "fleet"))
        run_id = s.run_id

        async def done() -> int:
            return int((await broker.get_run(run_id)).get("nodes_done", 0))

        async def active(name: str) -> int:
            return int(await r.llen(broker.keys.active(wid[name])))

        # Every ungated node done and every worker's slots held by gated nodes (which
        # recorded a model call and a side effect): killing now certainly cuts work.
        await wait_until(done, lambda n: n >= 300 - GATED, 300, "the ungated nodes done", ())
        for name in ("w1", "w2", "w3"):
            await wait_until(lambda n=name: active(n), 4, 120, f"{name} full of gated nodes", ())
        assert not await broker.run_is_terminal(run_id)

        docker("stop", "-t", "30", serve)  # no reaper: the dead worker stays visible
        docker("kill", w["w1"])  # SIGKILL
        docker("stop", "-t", "60", w["w2"])  # SIGTERM; SIGKILL only after 60 s
        assert docker("wait", w["w1"]).stdout.strip() == "137"
        assert docker("wait", w["w2"]).stdout.strip() == "0", net.logs(w["w2"])
        w2_log = net.logs(w["w2"], tail=200)
        assert "worker.draining" in w2_log and "worker.stopped" in w2_log, w2_log
        assert await active("w2") == 0
        killed_jobs = await r.lrange(broker.keys.active(wid["w1"]), 0, -1)
        assert len(killed_jobs) == 4

        listing = await wait_until(
            listed, lambda ws: wid["w1"] in ws and not ws[wid["w1"]]["alive"], 60, "w1 listed dead", ()
        )
        assert len(listing[wid["w1"]]["active"]) == 4
        assert wid["w2"] not in listing  # drained and deregistered
        assert listing[wid["w3"]]["alive"]

        docker("start", serve)
        await wait_until(listed, lambda ws: wid["w1"] not in ws, 60, "w1 reaped", ())
        for name in ("w4", "w5"):  # scale out
            w[name] = start_worker(name)
        await wait_until(
            listed, lambda ws: all(ws.get(wid[n], {}).get("alive") for n in ("w3", "w4", "w5")), 60,
            "w3, w4, w5 alive", (),
        )  # fmt: skip
        for name in ("w4", "w5"):  # the queue holds gated nodes and w3 is full: they take some
            await wait_until(lambda n=name: active(n), lambda k: k > 0, 120, f"{name} working", ())

        (shared / "gate-open").touch()
        await wait_until(lambda: broker.run_is_terminal(run_id), True, 300, "the run to end", ())
        figures = await check_invariants(broker, run_id, ledger)

        events = await broker.events(run_id)
        by = {(e.type, e.data.get("worker")) for e in events if e.data}
        requeued = [e for e in events if e.type == "NODE_REQUEUED" and e.data.get("worker") == wid["w1"]]
        handed = [e for e in events if e.type == "NODE_HANDED_BACK" and e.data.get("worker") == wid["w2"]]
        assert sorted(f"{run_id}/{e.node}" for e in requeued) == sorted(killed_jobs)
        assert len(handed) == 4  # gated nodes cannot finish within the grace period
        for name in ("w4", "w5"):
            assert ("NODE_STARTED", wid[name]) in by, name
        final = await listed()
        assert sorted(final) == sorted(wid[n] for n in ("w3", "w4", "w5"))
        assert figures["replayed_steps"] >= 8  # the cut nodes resumed from their ledgers
        print(
            "container fleet:",
            json.dumps(
                {**figures, "killed_jobs_requeued": len(requeued), "drained_handed_back": len(handed)}
            ),
        )
    except BaseException:
        print(net.all_logs())
        raise
    finally:
        if r is not None:
            await r.aclose()
        net.close()
