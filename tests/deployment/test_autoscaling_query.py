"""The autoscaler's load query (ADR 010), as the Helm chart generates it, evaluated by a
real Prometheus scraping real ``serve`` and ``oao-worker`` processes on loopback: it
equals the jobs ready in all three bands of the workers' queue plus the nodes running,
as Redis has them. Every query of the chart's Grafana dashboard is valid PromQL there.

Prometheus is Debian's (``apt-get download prometheus``, unpacked under
``.cache/deploy/prometheus``: no service is installed or started); the test is skipped
when neither a ``prometheus`` binary nor the package can be had.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml
from faults.redis_fault_kit import free_port, wait_until
from oao_testkit import make_spec
from proc import start_serve, start_worker, stop

from oao_common.broker import Broker
from oao_scheduler.submit import submit_spec

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "oao"
CACHE = ROOT / ".cache" / "deploy" / "prometheus"
AGENTS = {"sleep": {"kind": "python", "entrypoint": "faults.fault_agents:marked_sleep"}}


def prometheus_binary() -> Path:
    """A prometheus binary: on PATH, unpacked before, or unpacked now from Debian's package."""
    found = shutil.which("prometheus")
    if found:
        return Path(found)
    binary = CACHE / "usr" / "bin" / "prometheus"
    if binary.exists():
        return binary
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        pytest.skip("no prometheus binary and no apt-get / dpkg-deb to fetch Debian's package")
    with tempfile.TemporaryDirectory() as d:
        p = subprocess.run(
            ["apt-get", "download", "prometheus"], cwd=d, capture_output=True, text=True, timeout=300
        )
        debs = list(Path(d).glob("prometheus_*.deb"))
        if p.returncode != 0 or not debs:
            pytest.skip(f"apt-get download prometheus failed: {p.stderr.strip()[-300:]}")
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(CACHE)], check=True, timeout=120)
    return binary


def start_prometheus(binary: Path, port: int, config: Path, data: Path, log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115
    return subprocess.Popen(
        [
            str(binary),
            f"--config.file={config}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=out,
        stderr=out,
    )


def query(port: int, expr: str) -> dict[str, Any]:
    """Prometheus' answer to an instant query (its JSON document; errors included)."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            doc: dict[str, Any] = json.loads(resp.read())
    except urllib.error.HTTPError as e:  # a bad query answers JSON; a starting server, text
        body = e.read()
        doc = json.loads(body) if body.startswith(b"{") else {"status": f"http {e.code}"}
    except OSError as e:
        return {"status": "unreachable", "error": str(e)}
    return doc


def scalar(doc: dict[str, Any]) -> float | None:
    """The single number of a vector answer, None if there is not exactly one."""
    if doc.get("status") != "success" or len(doc["data"]["result"]) != 1:
        return None
    return float(doc["data"]["result"][0]["value"][1])


def chart_objects(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm_python.Chart.load(CHART) as chart:
        out = chart.render(values, name="fleet", namespace="agents")
    return [
        d
        for path, text in out.items()
        if not path.endswith("NOTES.txt")
        for d in yaml.safe_load_all(text)
        if d
    ]


async def test_keda_query_counts_every_band_plus_inflight(
    broker: Broker, redis_url: str, tmp_path: Path
) -> None:
    binary = prometheus_binary()
    docs = chart_objects(
        {
            "worker": {"concurrency": 2},
            "grafana": {"dashboard": {"enabled": True}},
            "autoscaling": {"keda": {"enabled": True, "prometheus": {"serverAddress": "http://unused"}}},
        }
    )
    (so,) = [d for d in docs if d["kind"] == "ScaledObject"]
    load_query = so["spec"]["triggers"][0]["metadata"]["query"]
    backlog_query, inflight_query = load_query[1:-1].split(") + (")
    (dashboard,) = [json.loads(d["data"]["oao-fleet.json"]) for d in docs if d["kind"] == "ConfigMap"]

    prefix = broker.keys.prefix
    port, config = free_port(), tmp_path / "prometheus.yml"
    serve_port, worker_ports = free_port(), [free_port(), free_port()]
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "serve",
                        "static_configs": [
                            {
                                "targets": [f"127.0.0.1:{serve_port}"],
                                "labels": {"namespace": "agents", "service": "fleet-oao-serve"},
                            }
                        ],
                    },
                    {
                        "job_name": "worker",
                        "static_configs": [
                            {
                                "targets": [f"127.0.0.1:{p}" for p in worker_ports],
                                "labels": {"namespace": "agents", "service": "fleet-oao-worker"},
                            }
                        ],
                    },
                ],
            }
        )
    )
    logs = (tmp_path / "prometheus.log", tmp_path / "serve.log", tmp_path / "w0.log", tmp_path / "w1.log")
    prom = start_prometheus(binary, port, config, tmp_path / "tsdb", logs[0])
    serve = start_serve(
        redis_url, prefix, "--reaper-interval", "0.2", "--metrics-port", str(serve_port), log=logs[1]
    )
    env = {"OAO_TEST_MARKER_DIR": str(tmp_path / "markers")}
    workers = [
        start_worker(
            redis_url,
            prefix,
            "--concurrency",
            "2",
            "--grace-period",
            "0",
            "--metrics-port",
            str(p),
            extra_env=env,
            log=logs[2 + i],
        )
        for i, p in enumerate(worker_ports)
    ]
    try:
        await wait_until(
            lambda: asyncio.to_thread(query, port, "up"),
            lambda d: d.get("status") == "success",
            60,
            "up",
            logs,
        )
        await wait_until(
            lambda: asyncio.to_thread(query, port, "sum(up)"),
            lambda d: scalar(d) == 3.0,
            60,
            "3 targets up",
            logs,
        )
        # 13 nodes that run for minutes: 6 high (priority 9), 4 normal, 3 low (priority 1);
        # 2 workers x 2 slots run 4 of them (high first), 9 wait in the three bands.
        nodes = [{"id": f"h{i}", "agent": "sleep", "task": "600", "priority": 9} for i in range(6)]
        nodes += [{"id": f"n{i}", "agent": "sleep", "task": "600"} for i in range(4)]
        nodes += [{"id": f"l{i}", "agent": "sleep", "task": "600", "priority": 1} for i in range(3)]
        s = await submit_spec(broker, make_spec(nodes, agents=AGENTS))

        async def in_redis() -> tuple[int, int]:
            lists = [broker.keys.queue(q) for q in ("default:high", "default", "default:low")]
            ready = sum([await broker.redis.llen(k) for k in lists])
            running = sum(len(w["active"]) for w in await broker.workers())
            return ready, running

        await wait_until(in_redis, (9, 4), 60, "9 ready and 4 running in Redis", logs)
        bands = {
            q: await broker.redis.llen(broker.keys.queue(q))
            for q in ("default:high", "default", "default:low")
        }
        assert bands == {"default:high": 2, "default": 4, "default:low": 3}, bands

        await wait_until(
            lambda: asyncio.to_thread(query, port, load_query),
            lambda d: scalar(d) == 13.0,
            60,
            "load 13",
            logs,
        )
        assert scalar(query(port, backlog_query)) == 9.0
        assert scalar(query(port, inflight_query)) == 4.0
        # what KEDA makes of it: ceil(13 / target) replicas, target = 2 x 0.8 = 1.6 per pod
        assert so["spec"]["triggers"][0]["metadata"]["threshold"] == "1.6"

        # every dashboard query is valid PromQL for this Prometheus
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = (
                    target["expr"]
                    .replace("$__rate_interval", "1m")
                    .replace("$__range", "5m")
                    .replace("$__interval", "15s")
                )
                expr = expr.replace("$queue", ".*").replace("$model", ".*")
                doc = query(port, expr)
                assert doc.get("status") == "success", (panel["title"], expr, doc)

        # cancelled: the workers drop the jobs left in the lists (a list that empties is
        # deleted in Redis) and stop the running nodes: the load goes back to 0
        await broker.cancel(s.run_id)
        await wait_until(in_redis, (0, 0), 60, "nothing ready or running in Redis", logs)
        await wait_until(
            lambda: asyncio.to_thread(query, port, load_query), lambda d: scalar(d) == 0.0, 60, "load 0", logs
        )
    finally:
        stop(*workers, serve, prom)
