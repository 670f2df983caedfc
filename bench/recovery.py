"""Recovery time after a worker is SIGKILLed, against the heartbeat TTL.

For each of ``--kills`` rounds: submit a one-node run whose agent records one side
effect and then waits in a long model call; once the step is recorded, SIGKILL the
worker process holding the node and measure the time until the node is RUNNING again
on another worker (its ``NODE_STARTED`` event of attempt 2, server clock). Also counts
the recorded steps that were executed again (should be 0: the ledger serves them).

The baseline is the heartbeat TTL itself: the printed ratio is recovery / TTL, and the
bound is TTL + one reaper interval (the last heartbeat may be up to TTL/3 old at the
kill, so recovery is usually a little under the bound).

    python bench/recovery.py                   # 20 kills, TTL 2 s, reaper every 0.25 s
    python bench/recovery.py --heartbeat-ttl 5 --reaper-interval 1 --kills 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script too

from bench.harness import bench_redis, oao_process, stop_all, wait_for_workers
from oao_common.broker import Broker
from oao_common.spec import parse_spec
from oao_scheduler.submit import submit_spec


def spec_text() -> str:
    return yaml.safe_dump(
        {
            "name": "recovery",
            "models": {"slow": {"provider": "scripted", "reply_delay_s": 3600, "replies": ["done"]}},
            "agents": {
                "a": {
                    "kind": "python",
                    "entrypoint": "bench.recovery_agents:record_then_think",
                    "model": "slow",
                    "tools": ["ext"],
                }
            },
            "tools": {"ext": {"entrypoint": "bench.recovery_agents:ext", "idempotent": True}},
            "nodes": [{"id": "n", "agent": "a"}],
        }
    )


async def wait_event(broker: Broker, rid: str, type_: str, attempt: int, timeout_s: float) -> int:
    """Server timestamp (ms) of the first event of ``type_`` and ``attempt``."""
    deadline = time.monotonic() + timeout_s
    last = "0-0"
    while time.monotonic() < deadline:
        for ev in await broker.events(rid, after=last if last != "0-0" else "-"):
            last = ev.id
            if ev.type == type_ and ev.attempt == attempt:
                return ev.ts_ms
        await asyncio.sleep(0.005)
    raise TimeoutError(f"no {type_} attempt {attempt} for run {rid}")


async def main_async(a: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="oao-recovery-"))
    ledger = tmp / "ledger.txt"
    env = {"OAO_BENCH_LEDGER": str(ledger), "OAO_LOG_FORMAT": "json"}
    ttl, ri = str(a.heartbeat_ttl), str(a.reaper_interval)
    worker_args = ("--heartbeat-ttl", ttl, "--concurrency", "100", "--grace-period", "0")
    spec = parse_spec(spec_text(), "recovery")
    rows: list[dict[str, Any]] = []
    async with bench_redis(a.redis_url, "recovery") as (url, broker):
        r = broker.redis
        serve = oao_process(
            "serve",
            url,
            broker,
            "--heartbeat-ttl",
            ttl,
            "--reaper-interval",
            ri,
            env=env,
            log=tmp / "serve.log",
        )
        workers = {
            i: oao_process("worker", url, broker, *worker_args, env=env, log=tmp / f"w{i}.log")
            for i in range(2)
        }
        n_started = 2
        try:
            await wait_for_workers(broker, 2)
            for k in range(a.kills):
                s = await submit_spec(broker, spec)
                nk = broker.keys.node(s.run_id, "n")
                while await r.hget(nk, "steps_recorded") != "1":
                    await asyncio.sleep(0.005)
                holder = await r.hget(nk, "lease")
                pid = int((await r.hget(broker.keys.worker_info(holder), "pid")) or 0)
                slot = next(i for i, p in workers.items() if p.pid == pid)
                t_kill = time.time()
                os.kill(pid, signal.SIGKILL)
                workers[slot].wait()
                requeued_ms = await wait_event(broker, s.run_id, "NODE_REQUEUED", 1, a.heartbeat_ttl * 5)
                started_ms = await wait_event(broker, s.run_id, "NODE_STARTED", 2, a.heartbeat_ttl * 5)
                await wait_event(broker, s.run_id, "STEP_REPLAYED", 2, 10)  # flushed before the model call
                replayed = [e for e in await broker.events(s.run_id) if e.type == "STEP_REPLAYED"]
                rows.append(
                    {
                        "kill": k + 1,
                        "detect_s": round(requeued_ms / 1000 - t_kill, 3),
                        "recovery_s": round(started_ms / 1000 - t_kill, 3),
                        "replayed_steps": len(replayed),
                    }
                )
                print(
                    f"kill {k + 1:2d}: reaped after {rows[-1]['detect_s']:.3f}s, running again after "
                    f"{rows[-1]['recovery_s']:.3f}s, steps replayed {len(replayed)}",
                    file=sys.stderr,
                )
                await broker.cancel(s.run_id)
                workers[slot] = oao_process(
                    "worker", url, broker, *worker_args, env=env, log=tmp / f"w{n_started}.log"
                )
                n_started += 1
                await wait_for_workers(broker, 2)
            effects: dict[str, int] = {}
            for line in ledger.read_text().splitlines():
                rid = line.split()[0]
                effects[rid] = effects.get(rid, 0) + 1
        finally:
            stop_all([serve, *workers.values()])
            shutil.rmtree(tmp, ignore_errors=True)
    rec = sorted(x["recovery_s"] for x in rows)
    bound = a.heartbeat_ttl + a.reaper_interval
    return {
        "kills": len(rows),
        "heartbeat_ttl_s": a.heartbeat_ttl,
        "reaper_interval_s": a.reaper_interval,
        "bound_s": bound,
        "recovery_p50_s": statistics.median(rec),
        "recovery_max_s": rec[-1],
        "recovery_p50_over_ttl": round(statistics.median(rec) / a.heartbeat_ttl, 3),
        "within_bound": sum(1 for x in rec if x <= bound),
        "detect_p50_s": statistics.median(x["detect_s"] for x in rows),
        "recorded_steps_reexecuted": sum(effects.values()) - len(effects),
        "steps_replayed_per_recovery": statistics.mean(x["replayed_steps"] for x in rows),
        "rows": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--heartbeat-ttl", type=float, default=2.0, help="seconds (workers and reaper)")
    p.add_argument("--reaper-interval", type=float, default=0.25, help="seconds")
    p.add_argument("--redis-url", default=None, help="default: a private embedded Valkey")
    p.add_argument("--quick", action="store_true", help="5 kills")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    a = p.parse_args()
    if a.quick:
        a.kills = 5
    res = asyncio.run(main_async(a))
    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(
        f"\nrecovery after SIGKILL, {res['kills']} kills, heartbeat TTL {res['heartbeat_ttl_s']}s, "
        f"reaper every {res['reaper_interval_s']}s"
    )
    print(f"  reaped (detected)     p50 {res['detect_p50_s']:.3f}s")
    print(
        f"  running again         p50 {res['recovery_p50_s']:.3f}s  max {res['recovery_max_s']:.3f}s"
        f"  = {res['recovery_p50_over_ttl']:.2f} x TTL"
    )
    print(f"  within TTL + interval ({res['bound_s']:.2f}s): {res['within_bound']}/{res['kills']}")
    print(
        f"  recorded steps executed again: {res['recorded_steps_reexecuted']}"
        f"  (steps served from the ledger per recovery: {res['steps_replayed_per_recovery']:.1f})"
    )


if __name__ == "__main__":
    main()
