"""Latency: submit -> single-node run SUCCEEDED on an idle fleet, p50 / p99.

One real ``oao-worker`` process is started and warmed up first. Each of ``--runs`` runs
submits a one-node spec (``examples.agents:noop``) with the real ``submit_spec`` and then
waits with ``XREAD BLOCK`` on the run's events stream until ``RUN_SUCCEEDED``; the
clock covers both. Between runs the fleet is left idle for ``--gap-ms``.

Baselines in the same run, on the same server with the same client library
(redis-py asyncio with hiredis, like OAO):

* ``PING`` round trip;
* ``LPUSH`` -> ``BRPOP`` handoff between two connections of this process;
* echo via a second process: this process pushes a request (``LPUSH``), a separate
  Python process pops it (``BRPOP``) and pushes a reply, this process pops the reply.
  That is the least "hand work to another process and hear that it is done" can cost
  here, so it is the floor OAO's figure is best compared with.

Target (from the issue): p50 <= 3 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from bench._common import (
    ProcessGroup,
    PySpy,
    RedisTarget,
    add_common_args,
    check_idle,
    emit,
    format_machine,
    format_table,
    install_signal_exit,
    log,
    machine_info,
    measured,
    percentile,
    start_oao_workers,
)

TARGET_P50_MS = 3.0
RUN_END = frozenset({"RUN_SUCCEEDED", "RUN_FAILED", "RUN_CANCELLED"})

ECHO_CODE = """
import asyncio, sys
from redis.asyncio import Redis

async def main(url, req, resp):
    r = Redis.from_url(url)
    await r.set(req + ":ready", 1)
    while True:
        _, item = await r.brpop([req], timeout=0)
        await r.lpush(resp, item)

asyncio.run(main(*sys.argv[1:4]))
"""


@dataclass(slots=True)
class Series:
    """Latencies of one measured operation, in milliseconds."""

    name: str
    samples_ms: list[float]

    @property
    def p50(self) -> float:
        return percentile(self.samples_ms, 0.50)

    @property
    def p99(self) -> float:
        return percentile(self.samples_ms, 0.99)

    def summary(self) -> dict[str, Any]:
        s = self.samples_ms
        return {
            "name": self.name,
            "n": len(s),
            "p50_ms": self.p50,
            "p90_ms": percentile(s, 0.90),
            "p99_ms": self.p99,
            "min_ms": min(s),
            "max_ms": max(s),
        }


async def sample(n: int, op: Callable[[], Awaitable[Any]], gap_s: float = 0.0) -> list[float]:
    """Time ``op()`` ``n`` times (ms), sleeping ``gap_s`` between calls. An ``op`` that
    returns a number times itself: that number (seconds) is used instead."""
    out: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        own = await op()
        elapsed = own if isinstance(own, float) else time.perf_counter() - t0
        out.append(elapsed * 1000)
        if gap_s:
            await asyncio.sleep(gap_s)
    return out


# --------------------------------------------------------------------------- baselines


async def baseline_ping(url: str, n: int) -> Series:
    r = Redis.from_url(url)
    try:
        await sample(50, r.ping)  # warm-up
        return Series("PING round trip", await sample(n, r.ping))
    finally:
        await r.aclose()


async def baseline_handoff(url: str, n: int) -> Series:
    """LPUSH on one connection until BRPOP returns it on another (same process)."""
    a, b = Redis.from_url(url), Redis.from_url(url)
    key = f"bench:handoff:{secrets.token_hex(3)}"

    async def op() -> float:
        waiter = asyncio.ensure_future(b.brpop([key], timeout=5))
        await asyncio.sleep(0.001)  # the BRPOP is blocked in the server before the clock starts
        t0 = time.perf_counter()
        await a.lpush(key, "x")
        if await waiter is None:
            raise TimeoutError("BRPOP handoff timed out")
        return time.perf_counter() - t0

    try:
        await sample(20, op)
        return Series("LPUSH->BRPOP handoff, 2 connections", await sample(n, op))
    finally:
        await a.delete(key)
        await a.aclose()
        await b.aclose()


class EchoProcess:
    """A second Python process that pops each request (``BRPOP``) and pushes it back as a
    reply (``LPUSH``), with redis-py asyncio like an OAO worker; stopped when the ``with``
    block ends."""

    def __init__(self, url: str, procs: ProcessGroup) -> None:
        token = secrets.token_hex(3)
        self.url = url
        self.procs = procs
        self.req, self.resp = f"bench:echo:{token}:req", f"bench:echo:{token}:resp"
        self.proc = procs.start(f"echo-{token}", [sys.executable, "-c", ECHO_CODE, url, self.req, self.resp])

    def __enter__(self) -> EchoProcess:
        import redis

        r = redis.Redis.from_url(self.url)
        try:
            deadline = time.monotonic() + 30
            while not r.exists(f"{self.req}:ready"):
                self.procs.check_alive([self.proc])
                if time.monotonic() > deadline:
                    raise TimeoutError("echo process did not start")
                time.sleep(0.02)
        finally:
            r.close()
        return self

    def __exit__(self, *exc: object) -> None:
        self.procs.stop(self.proc)


async def baseline_echo(echo: EchoProcess, n: int, gap_s: float) -> Series:
    """LPUSH a request, the echo process BRPOPs it and LPUSHes a reply, BRPOP the reply."""
    r = Redis.from_url(echo.url)

    async def op() -> None:
        await r.lpush(echo.req, "x")
        if await r.brpop([echo.resp], timeout=5) is None:
            raise TimeoutError("echo reply timed out")

    try:
        await sample(20, op)
        return Series("echo via a 2nd process (LPUSH/BRPOP x2)", await sample(n, op, gap_s))
    finally:
        await r.delete(echo.req, echo.resp, f"{echo.req}:ready")
        await r.aclose()


# --------------------------------------------------------------------------- OAO


async def measure_oao(url: str, prefix: str, n: int, gap_s: float, warmup: int) -> dict[str, list[float]]:
    """``n`` one-node runs: total, submit call, and submit -> NODE_STARTED seen (ms)."""
    from oao_common.broker import Broker
    from oao_common.connection import connect
    from oao_common.spec import Spec
    from oao_scheduler.submit import submit_spec

    spec = Spec.model_validate(
        {
            "name": "bench-latency",
            "agents": {"noop": {"kind": "python", "entrypoint": "examples.agents:noop"}},
            "nodes": [{"id": "only", "agent": "noop"}],
        }
    )
    r: Any = connect(url)  # decode_responses=True: replies are str
    broker = Broker(r, prefix)
    total: list[float] = []
    submit: list[float] = []
    started: list[float] = []
    try:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            sub = await submit_spec(broker, spec)
            t_sub = time.perf_counter()
            t_started = None
            last = "0-0"
            key = broker.keys.events(sub.run_id)
            done = None
            while done is None:
                res = await r.xread({key: last}, block=5000)
                if not res:
                    raise TimeoutError(f"run {sub.run_id}: no event for 5 s")
                now = time.perf_counter()
                for _key, entries in res:
                    for eid, fields in entries:
                        last = eid
                        if fields.get("type") == "NODE_STARTED" and t_started is None:
                            t_started = now
                        if fields.get("type") in RUN_END:
                            done = fields["type"]
            t_end = time.perf_counter()
            if done != "RUN_SUCCEEDED":
                raise RuntimeError(f"run {sub.run_id} ended {done}")
            if i >= warmup:
                total.append((t_end - t0) * 1000)
                submit.append((t_sub - t0) * 1000)
                started.append(((t_started or t_end) - t0) * 1000)
            await asyncio.sleep(gap_s)
    finally:
        await r.aclose()
    return {"total": total, "submit": submit, "started": started}


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(p)
    p.add_argument("--runs", type=int, default=None, help="measured OAO runs (default 200; --quick 50)")
    p.add_argument("--warmup", type=int, default=20, help="unmeasured OAO runs first (default 20)")
    p.add_argument(
        "--baseline-samples",
        type=int,
        default=None,
        help="samples per baseline (default 1000; --quick 200)",
    )
    p.add_argument("--gap-ms", type=float, default=10.0, help="idle time between runs (default 10 ms)")
    p.add_argument(
        "--concurrency", type=int, default=10, help="oao-worker --concurrency (default 10, the CLI's)"
    )
    p.add_argument("--worker-log-level", default="info", help="oao-worker log level (default info)")
    args = p.parse_args(argv)
    if args.runs is None:
        args.runs = 50 if args.quick else 200
    if args.baseline_samples is None:
        args.baseline_samples = 200 if args.quick else 1000
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_signal_exit()
    gap_s = args.gap_ms / 1000
    n_base = args.baseline_samples
    with RedisTarget(args.redis_url, args.embedded) as target, ProcessGroup(args.keep_logs) as procs:
        info = machine_info(target)
        info["busy_before_pct"] = check_idle()
        log(format_machine(info))
        url = target.url
        ping, _ = measured(lambda: asyncio.run(baseline_ping(url, n_base)), target, [], args, "ping")
        handoff, _ = measured(lambda: asyncio.run(baseline_handoff(url, n_base)), target, [], args, "handoff")
        with EchoProcess(url, procs) as ep:
            echo, _ = measured(
                lambda: asyncio.run(baseline_echo(ep, n_base, gap_s / 10)),
                target,
                [ep.proc.pid],
                args,
                "echo",
            )
        log(f"baselines p50: ping {ping.p50:.3f} ms, handoff {handoff.p50:.3f} ms, echo {echo.p50:.3f} ms")
        prefix = f"oaobench-{secrets.token_hex(3)}"
        (worker,) = start_oao_workers(
            procs, target, prefix, 1, args.concurrency, log_level=args.worker_log_level
        )

        def body() -> dict[str, list[float]]:
            with PySpy(procs, args.py_spy, "latency", [worker.pid], args.py_spy_native):
                return asyncio.run(measure_oao(url, prefix, args.runs, gap_s, args.warmup))

        oao, load = measured(body, target, [worker.pid], args, "OAO latency")
        log(f"OAO runs done; other load {load.other_pct:.0f}% of a core")
        procs.stop_all([worker])
    total = Series("OAO submit -> RUN_SUCCEEDED (1 node)", oao["total"])
    parts = [
        Series("  of which: submit_spec call", oao["submit"]),
        Series("  of which: submit -> NODE_STARTED seen", oao["started"]),
    ]
    baselines = [ping, handoff, echo]
    headers = ["operation", "n", "p50 ms", "p99 ms", "OAO p50 / this p50", "OAO p99 / this p99"]
    rows = [[total.name, len(total.samples_ms), total.p50, total.p99, "1.00x", "1.00x"]]
    rows += [[s.name, len(s.samples_ms), s.p50, s.p99, None, None] for s in parts]
    rows += [
        [s.name, len(s.samples_ms), s.p50, s.p99, f"{total.p50 / s.p50:.1f}x", f"{total.p99 / s.p99:.1f}x"]
        for s in baselines
    ]
    met = total.p50 <= TARGET_P50_MS
    verdict = f"target p50 <= {TARGET_P50_MS} ms: {'MET' if met else 'MISSED'} (p50 {total.p50:.3f} ms" + (
        ")"
        if met
        else f", {total.p50 - TARGET_P50_MS:+.3f} ms / {total.p50 / TARGET_P50_MS:.2f}x the target)"
    )
    text = "\n".join(
        [
            format_machine(info),
            f"config: runs={args.runs} (+{args.warmup} warm-up), gap={args.gap_ms} ms, "
            f"worker concurrency={args.concurrency}, log level={args.worker_log_level}",
            "",
            format_table(headers, rows),
            "",
            verdict,
            f"other load on the machine during the OAO runs: {load.other_pct:.0f}% of a core",
        ]
    )
    document = {
        "benchmark": "latency",
        "machine": info,
        "config": {
            k: getattr(args, k) for k in ("runs", "warmup", "baseline_samples", "gap_ms", "concurrency")
        },
        "oao": total.summary(),
        "oao_parts": [s.summary() for s in parts],
        "baselines": [s.summary() for s in baselines],
        "target": {"p50_ms": TARGET_P50_MS, "value": total.p50, "met": met},
        "other_cpu_pct": load.other_pct,
        "samples_ms": {"oao": total.samples_ms, **{s.name: s.samples_ms for s in baselines}},
    }
    emit(args.json, document, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
