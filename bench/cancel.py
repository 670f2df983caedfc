"""How fast ``cancel`` stops in-flight nodes: from the cancel call to the moment the
worker holding them has stopped them and emptied its active list.

Each round submits a run of ``--nodes`` nodes that each sit in a 60-second model call
on one ``oao-worker`` process, waits until all are RUNNING, cancels the run and times
until the worker's active list is empty (polled every 1 ms). Same-run baseline: the
worker's heartbeat interval (TTL / 3), the latency a heartbeat-driven check would
have. Target: under 1 s.

    python bench/cancel.py                 # 20 rounds of 10 nodes, embedded Valkey
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script too

from bench.harness import bench_redis, oao_process, stop_all, wait_for_workers
from oao_common.spec import parse_spec
from oao_scheduler.submit import submit_spec

HEARTBEAT_TTL_S = 5.0


def spec_text(nodes: int) -> str:
    return yaml.safe_dump(
        {
            "name": "cancel-bench",
            "models": {"slow": {"provider": "scripted", "reply_delay_s": 60, "replies": ["late"]}},
            "agents": {"a": {"kind": "python", "entrypoint": "bench.agents:wait_once", "model": "slow"}},
            "nodes": [{"id": f"n{i}", "agent": "a"} for i in range(nodes)],
        }
    )


async def main_async(a: argparse.Namespace) -> dict[str, Any]:
    spec = parse_spec(spec_text(a.nodes), "cancel-bench")
    times: list[float] = []
    async with bench_redis(a.redis_url, "cancel") as (url, broker):
        worker = oao_process(
            "worker",
            url,
            broker,
            "--concurrency",
            "100",
            "--heartbeat-ttl",
            str(HEARTBEAT_TTL_S),
            env={"OAO_LOG_LEVEL": "error"},
        )
        try:
            await wait_for_workers(broker, 1)
            [w] = await broker.workers()
            active = broker.keys.active(w["id"])
            r = broker.redis
            for _ in range(a.rounds):
                s = await submit_spec(broker, spec)
                while await r.llen(active) < a.nodes:
                    await asyncio.sleep(0.005)
                await asyncio.sleep(0.05)  # all in their model call
                t0 = time.perf_counter()
                await broker.cancel(s.run_id)
                while await r.llen(active):
                    await asyncio.sleep(0.001)
                times.append((time.perf_counter() - t0) * 1000)
        finally:
            stop_all([worker])
    times.sort()
    return {
        "rounds": len(times),
        "nodes_per_round": a.nodes,
        "stop_p50_ms": round(statistics.median(times), 2),
        "stop_max_ms": round(times[-1], 2),
        "baseline_heartbeat_interval_ms": HEARTBEAT_TTL_S / 3 * 1000,
        "target_ms": 1000,
        "met": times[-1] < 1000,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--nodes", type=int, default=10)
    p.add_argument("--redis-url", default=None, help="default: a private embedded Valkey")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    res = asyncio.run(main_async(a))
    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(f"cancel -> in-flight nodes stopped, {res['rounds']} rounds x {res['nodes_per_round']} nodes")
    print(f"  p50 {res['stop_p50_ms']:.1f} ms   max {res['stop_max_ms']:.1f} ms")
    print(
        f"  baseline: heartbeat interval {res['baseline_heartbeat_interval_ms']:.0f} ms; "
        f"max / target (1 s): {res['stop_max_ms'] / 1000:.3f} -> {'met' if res['met'] else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
