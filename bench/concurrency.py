"""Concurrency: 1,000 nodes that each wait 1 s on a model, in ONE worker process.

Each node runs ``bench.agents:wait_once``, a python agent that calls ``ctx.llm`` once on a
scripted model with ``reply_delay_s: 1.0`` (so it waits like an agent on a model API,
and its step is recorded like any other). One real ``oao-worker`` process with
``--concurrency 1000`` runs them all. Measured: wall time from ``submit_spec`` until the
run is SUCCEEDED, and the worker's peak RSS (psutil every 50 ms during the run, and
the kernel's ``VmHWM`` high-water mark, which also covers start-up and the warm-up).

Baseline in the same run (the floor): the same 1,000 x 1 s waits as
``asyncio.gather`` of ``asyncio.sleep(1)`` in a fresh Python process; the ratio is OAO's
wall time over the floor's. Targets (from the issue): wall <= 1.5 s, RSS <= 120 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from bench._common import (
    TERMINAL_RUN_STATES,
    ProcessGroup,
    PySpy,
    RedisTarget,
    RssSampler,
    add_common_args,
    check_idle,
    emit,
    format_machine,
    format_table,
    install_signal_exit,
    log,
    machine_info,
    measured,
    median,
    rss_bytes,
    start_oao_workers,
    vm_hwm,
)

MIB = 2**20
TARGET_WALL_S = 1.5
TARGET_RSS_MIB = 120.0

FLOOR_CODE = """
import asyncio, json, sys, time
n, delay = int(sys.argv[1]), float(sys.argv[2])
async def main():
    t0 = time.perf_counter()
    await asyncio.gather(*(asyncio.sleep(delay) for _ in range(n)))
    return time.perf_counter() - t0
wall = asyncio.run(main())
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"wall_s": wall, "vm_hwm": hwm}))
"""


@dataclass(slots=True)
class OaoRun:
    """One measured OAO run; ``*_at_s`` are server-clock offsets from the submit."""

    wall_s: float
    submit_s: float
    peak_rss_sampled: int
    rss_samples: int
    worker_cpu_s: float
    server_cpu_s: float
    other_cpu_pct: float
    last_claim_at_s: float
    first_finish_at_s: float
    last_finish_at_s: float


def build_spec(n: int, delay_s: float) -> Any:
    """``n`` independent nodes, each one ``ctx.llm`` call on a model that waits ``delay_s``."""
    from oao_common.spec import Spec

    return Spec.model_validate(
        {
            "name": f"bench-concurrency-{n}",
            "models": {"slow": {"provider": "scripted", "reply_delay_s": delay_s, "replies": ["ok"]}},
            "agents": {"waiter": {"kind": "python", "entrypoint": "bench.agents:wait_once", "model": "slow"}},
            "nodes": [{"id": f"n{i:04d}", "agent": "waiter"} for i in range(n)],
        }
    )


async def submit_and_wait(
    url: str, prefix: str, spec: Any, poll_s: float, timeout_s: float
) -> dict[str, Any]:
    """Submit ``spec``, poll until terminal; return wall / submit seconds and node timings."""
    from oao_common.broker import Broker
    from oao_common.connection import connect
    from oao_scheduler.submit import submit_spec

    r: Any = connect(url)  # decode_responses=True: replies are str
    try:
        broker = Broker(r, prefix)
        sec, usec = await r.time()
        server_t0_ms = sec * 1000 + usec / 1000
        t0 = time.perf_counter()
        sub = await submit_spec(broker, spec)
        t_submit = time.perf_counter() - t0
        key = broker.keys.run(sub.run_id)
        while (status := await r.hget(key, "status")) not in TERMINAL_RUN_STATES:
            if time.perf_counter() - t0 > timeout_s:
                raise TimeoutError(f"run {sub.run_id} still {status} after {timeout_s}s")
            await asyncio.sleep(poll_s)
        wall = time.perf_counter() - t0
        if status != "SUCCEEDED":
            raise RuntimeError(f"run {sub.run_id} ended {status}")
        async with r.pipeline(transaction=False) as p:
            for n in spec.nodes:
                p.hmget(broker.keys.node(sub.run_id, n.id), "claimed_at", "finished_at")
            stamps = await p.execute()
        claimed = [float(c) - server_t0_ms for c, _ in stamps]
        finished = [float(f) - server_t0_ms for _, f in stamps]
        return {
            "wall_s": wall,
            "submit_s": t_submit,
            "last_claim_at_s": max(claimed) / 1000,
            "first_finish_at_s": min(finished) / 1000,
            "last_finish_at_s": max(finished) / 1000,
        }
    finally:
        await r.aclose()


def run_floor(n: int, delay_s: float) -> dict[str, Any]:
    """The floor in a fresh interpreter: ``asyncio.gather`` of ``n`` sleeps of ``delay_s``."""
    out = subprocess.run(
        [sys.executable, "-c", FLOOR_CODE, str(n), str(delay_s)], capture_output=True, text=True, check=True
    )
    return dict(json.loads(out.stdout))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.concurrency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(p)
    p.add_argument("--nodes", type=int, default=None, help="nodes (default 1000; --quick 200)")
    p.add_argument("--delay", type=float, default=1.0, help="seconds each model call waits (default 1.0)")
    p.add_argument(
        "--concurrency", type=int, default=None, help="oao-worker --concurrency (default: --nodes)"
    )
    p.add_argument(
        "--repeat", type=int, default=None, help="runs, median wall reported (default 3; --quick 1)"
    )
    p.add_argument("--worker-log-level", default="info", help="oao-worker log level (default info)")
    p.add_argument("--poll-ms", type=float, default=5.0, help="completion poll interval (default 5 ms)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a run fails")
    args = p.parse_args(argv)
    if args.nodes is None:
        args.nodes = 200 if args.quick else 1000
    if args.concurrency is None:
        args.concurrency = args.nodes
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_signal_exit()
    runs: list[OaoRun] = []
    with RedisTarget(args.redis_url, args.embedded) as target, ProcessGroup(args.keep_logs) as procs:
        info = machine_info(target)
        info["busy_before_pct"] = check_idle()
        log(format_machine(info))
        floor, _ = measured(lambda: run_floor(args.nodes, args.delay), None, [], args, "floor")
        log(f"floor: {args.nodes} x asyncio.sleep({args.delay}) in {floor['wall_s']:.3f}s")
        prefix = f"oaobench-{secrets.token_hex(3)}"
        (worker,) = start_oao_workers(
            procs, target, prefix, 1, args.concurrency, log_level=args.worker_log_level
        )
        poll_s = args.poll_ms / 1000
        asyncio.run(submit_and_wait(target.url, prefix, build_spec(20, args.delay), poll_s, args.timeout))
        idle_rss = rss_bytes(worker.pid)
        log(f"worker pid {worker.pid} warm, idle RSS {idle_rss / MIB:.1f} MiB")
        spec = build_spec(args.nodes, args.delay)
        for rep in range(args.repeat):

            def body(rep: int = rep) -> tuple[dict[str, Any], RssSampler]:
                with (
                    PySpy(procs, args.py_spy, f"concurrency-r{rep}", [worker.pid], args.py_spy_native),
                    RssSampler(worker.pid, 0.05) as rss,
                ):
                    m = asyncio.run(submit_and_wait(target.url, prefix, spec, poll_s, args.timeout))
                return m, rss

            (m, rss), load = measured(body, target, [worker.pid], args, f"run {rep}")
            run = OaoRun(
                peak_rss_sampled=rss.peak,
                rss_samples=rss.samples,
                worker_cpu_s=load.workers_s,
                server_cpu_s=load.server_s,
                other_cpu_pct=load.other_pct,
                **m,
            )
            runs.append(run)
            log(
                f"oao: {args.nodes} nodes in {run.wall_s:.3f}s, "
                f"peak RSS {run.peak_rss_sampled / MIB:.1f} MiB, "
                f"last claim at +{run.last_claim_at_s:.3f}s, last finish at +{run.last_finish_at_s:.3f}s; "
                f"other load {run.other_cpu_pct:.0f}%"
            )
        hwm = vm_hwm(worker.pid)
        procs.stop_all([worker])

    wall = median([r.wall_s for r in runs])
    peak_sampled = max(r.peak_rss_sampled for r in runs)
    peak = max(peak_sampled, hwm or 0)
    wall_ok = wall <= TARGET_WALL_S
    rss_ok = peak / MIB <= TARGET_RSS_MIB
    mid = sorted(runs, key=lambda r: r.wall_s)[len(runs) // 2]
    headers = ["system", "nodes", "wall s", "vs floor", "peak RSS MiB", "RSS vs floor process"]
    rows = [
        [
            "asyncio.gather(sleep) floor",
            args.nodes,
            floor["wall_s"],
            "1.00x",
            floor["vm_hwm"] / MIB,
            "1.00x",
        ],
        [
            f"OAO, 1 worker, concurrency {args.concurrency}",
            args.nodes,
            wall,
            f"{wall / floor['wall_s']:.2f}x",
            peak / MIB,
            f"{peak / floor['vm_hwm']:.2f}x",
        ],
    ]
    detail_headers = ["run", "wall s", "submit s", "last claim +s", "first finish +s", "last finish +s",
                      "sampled peak MiB", "worker CPU s", "server CPU s", "other CPU %"]  # fmt: skip
    detail = [
        [
            i,
            r.wall_s,
            r.submit_s,
            r.last_claim_at_s,
            r.first_finish_at_s,
            r.last_finish_at_s,
            r.peak_rss_sampled / MIB,
            r.worker_cpu_s,
            r.server_cpu_s,
            round(r.other_cpu_pct),
        ]
        for i, r in enumerate(runs)
    ]
    verdict = [
        f"target wall <= {TARGET_WALL_S} s: {'MET' if wall_ok else 'MISSED'} ({wall:.3f} s"
        + ("" if wall_ok else f", {wall - TARGET_WALL_S:+.3f} s / {wall / TARGET_WALL_S:.2f}x the target")
        + ")",
        f"target RSS <= {TARGET_RSS_MIB:.0f} MiB: {'MET' if rss_ok else 'MISSED'} ({peak / MIB:.1f} MiB"
        + ("" if rss_ok else f", {peak / MIB - TARGET_RSS_MIB:+.1f} MiB")
        + f"; VmHWM {(hwm or 0) / MIB:.1f} MiB, sampled peak {peak_sampled / MIB:.1f} MiB, "
        f"idle after warm-up {idle_rss / MIB:.1f} MiB)",
    ]
    text = "\n".join(
        [
            format_machine(info),
            f"config: nodes={args.nodes}, delay={args.delay}s, concurrency={args.concurrency}, "
            f"repeat={args.repeat}, worker log level={args.worker_log_level}",
            "",
            format_table(headers, rows),
            "",
            "per run (times after submit, server clock):",
            format_table(detail_headers, detail),
            "",
            *verdict,
            "wall: median run; peak RSS: max of VmHWM (whole worker life) and the 50 ms samples.",
        ]
    )
    document = {
        "benchmark": "concurrency",
        "machine": info,
        "config": {
            k: getattr(args, k) for k in ("nodes", "delay", "concurrency", "repeat", "worker_log_level")
        },
        "floor": floor,
        "oao": {
            "wall_s": wall,
            "ratio_vs_floor": wall / floor["wall_s"],
            "peak_rss_bytes": peak,
            "vm_hwm_bytes": hwm,
            "peak_rss_sampled_bytes": peak_sampled,
            "idle_rss_bytes": idle_rss,
            "median_run": asdict(mid),
            "runs": [asdict(r) for r in runs],
        },
        "targets": {
            "wall_s": {"target": TARGET_WALL_S, "value": wall, "met": wall_ok},
            "rss_mib": {"target": TARGET_RSS_MIB, "value": peak / MIB, "met": rss_ok},
        },
    }
    emit(args.json, document, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
