"""How fast a budget stops a runaway agent: from the streamed chunk that crossed the
token budget to the node FAILED in Redis.

Runs ``--runs`` copies of ``examples/runaway_agent.yaml`` (an agent that calls the
model in a loop; 2,000-token budget; chunks streamed every 2 ms) on a real
``oao-worker`` process. For each run the latency is ``NODE_FAILED`` (server clock) minus
the moment the governor saw the crossing chunk (``at_ms`` of the ``POLICY_VIOLATION``,
worker clock; same host). Same-run baselines: a Redis round trip (``PING``) and the
model's inter-chunk interval. Target (docs/benchmarks.md): under 100 ms.

    python bench/budget_stop.py              # 50 runs, embedded Valkey
    python bench/budget_stop.py --runs 200 --redis-url redis://127.0.0.1:6379/14
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script too

from bench.harness import ROOT, bench_redis, oao_process, stop_all, wait_for_workers
from oao_common.spec import load_spec
from oao_scheduler.progress import wait_for_run
from oao_scheduler.submit import submit_spec


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def main_async(a: argparse.Namespace) -> dict[str, Any]:
    spec = load_spec(ROOT / "examples" / "runaway_agent.yaml")
    stream_delay = spec.models["chatty"].stream_delay_s  # type: ignore[union-attr]
    latencies: list[float] = []
    rtts: list[float] = []
    async with bench_redis(a.redis_url, "budget") as (url, broker):
        worker = oao_process("worker", url, broker, "--concurrency", "4", env={"OAO_LOG_LEVEL": "error"})
        try:
            await wait_for_workers(broker, 1)
            for i in range(a.runs):
                t = time.perf_counter()
                await broker.redis.ping()
                rtts.append((time.perf_counter() - t) * 1000)
                s = await submit_spec(broker, spec)
                status = await wait_for_run(broker, s.run_id, interval_s=0.02, timeout_s=60)
                assert status == "FAILED", status
                ev = await broker.events(s.run_id)
                pv = next(e for e in ev if e.type == "POLICY_VIOLATION")
                failed = next(e for e in ev if e.type == "NODE_FAILED")
                assert pv.data["rule"] == "max_tokens"
                latencies.append(failed.ts_ms - pv.data["at_ms"])
                if (i + 1) % 10 == 0:
                    print(f"  {i + 1}/{a.runs} runs", file=sys.stderr)
        finally:
            stop_all([worker])
    return {
        "runs": len(latencies),
        "stop_p50_ms": statistics.median(latencies),
        "stop_p99_ms": pct(latencies, 0.99),
        "stop_max_ms": max(latencies),
        "redis_rtt_p50_ms": round(statistics.median(rtts), 3),
        "chunk_interval_ms": stream_delay * 1000,
        "target_ms": 100,
        "met": pct(latencies, 0.99) < 100,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--redis-url", default=None, help="default: a private embedded Valkey")
    p.add_argument("--quick", action="store_true", help="10 runs")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.runs = 10
    res = asyncio.run(main_async(a))
    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(f"\nbudget stop latency over {res['runs']} runaway runs (chunk that crossed -> node FAILED)")
    p50, p99, worst = res["stop_p50_ms"], res["stop_p99_ms"], res["stop_max_ms"]
    print(f"  p50 {p50:.1f} ms   p99 {p99:.1f} ms   max {worst:.1f} ms")
    print(
        f"  baselines: Redis round trip p50 {res['redis_rtt_p50_ms']:.3f} ms; chunks every "
        f"{res['chunk_interval_ms']:.0f} ms"
    )
    print(f"  p99 / target (100 ms): {res['stop_p99_ms'] / 100:.2f}  -> {'met' if res['met'] else 'MISSED'}")


if __name__ == "__main__":
    main()
