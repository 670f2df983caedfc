"""Throughput: no-op jobs per second through OAO, Dramatiq and RQ on one Redis server.

For each process count (default 1 and 2) this runs, against the same Redis database:

* OAO: ``--jobs`` no-op nodes (``examples.agents:noop``) as one run, through real
  ``oao-worker`` processes, in two DAG shapes: ``wide`` (independent nodes) and
  ``chain`` (each node depends on the previous one);
* Dramatiq: the same number of no-op messages (``RedisBroker``, ``dramatiq`` worker
  processes with ``--dramatiq-threads`` threads each);
* RQ: the same number of no-op jobs through ``rq worker`` processes, once with
  ``rq.worker.SimpleWorker`` (jobs run in the worker process) and once with RQ's default
  worker, which forks a work horse per job.

Workers are started first and the clock starts only once all are registered (OAO: the
``workers`` zset; Dramatiq: the heartbeat zset; RQ: the ``rq:workers`` set). It runs from
the first submit / enqueue call until the last job is done: OAO's run hash says
SUCCEEDED, Dramatiq's message hash is empty (every message acked), RQ's finished
registry holds every job. All three are polled every ``--poll-ms``.

Ratios are against Dramatiq with the same process count, measured in the same run.
The chain shape has no analogue in the baselines (they run flat jobs); its ratio
compares it with their flat throughput all the same.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from bench._common import (
    REPO,
    TERMINAL_RUN_STATES,
    ProcessGroup,
    PySpy,
    RedisTarget,
    add_common_args,
    cpu_seconds,
    emit,
    format_machine,
    format_table,
    install_signal_exit,
    log,
    machine_info,
    median,
    start_oao_workers,
    venv_bin,
    wait_until,
)

SYSTEMS = ("oao", "dramatiq", "rq-simple", "rq-fork")
SHAPES = ("wide", "chain")


@dataclass(slots=True)
class Result:
    """One measured configuration (``seconds`` is the median over ``--repeat`` runs)."""

    system: str
    processes: int
    shape: str
    jobs: int
    seconds: float
    submit_s: float
    jobs_per_s: float
    server_cpu_pct: float
    worker_cpu_pct: float
    runs: list[float] = field(default_factory=list)
    ratio_vs_dramatiq: float | None = None


# --------------------------------------------------------------------------- OAO


def build_spec(n: int, shape: str, entrypoint: str = "examples.agents:noop") -> Any:
    """A validated spec of ``n`` no-op nodes: independent (``wide``) or a ``chain``."""
    from oao_common.spec import Spec

    nodes: list[dict[str, Any]] = []
    for i in range(n):
        node: dict[str, Any] = {"id": f"n{i:05d}", "agent": "noop"}
        if shape == "chain" and i > 0:
            node["depends_on"] = [f"n{i - 1:05d}"]
        nodes.append(node)
    return Spec.model_validate(
        {
            "name": f"bench-{shape}-{n}",
            "agents": {"noop": {"kind": "python", "entrypoint": entrypoint}},
            "nodes": nodes,
        }
    )


async def _oao_once(url: str, prefix: str, spec: Any, poll_s: float, timeout_s: float) -> tuple[float, float]:
    """Submit ``spec`` and poll its run until terminal: ``(seconds, submit_seconds)``."""
    from oao_common.broker import Broker
    from oao_common.connection import connect
    from oao_scheduler.submit import submit_spec

    r = connect(url)
    try:
        broker = Broker(r, prefix)
        await r.ping()  # connection and scripts warm before the clock starts
        t0 = time.perf_counter()
        sub = await submit_spec(broker, spec)
        t_submit = time.perf_counter() - t0
        key = broker.keys.run(sub.run_id)
        while True:
            status = await r.hget(key, "status")
            if status in TERMINAL_RUN_STATES:
                break
            if time.perf_counter() - t0 > timeout_s:
                raise TimeoutError(f"OAO run {sub.run_id} still {status} after {timeout_s}s")
            await asyncio.sleep(poll_s)
        elapsed = time.perf_counter() - t0
        if status != "SUCCEEDED":
            raise RuntimeError(f"OAO run {sub.run_id} ended {status}")
        return elapsed, t_submit
    finally:
        await r.aclose()


def run_oao(
    args: argparse.Namespace, target: RedisTarget, procs: ProcessGroup, processes: int, shape: str
) -> Result:
    target.flush()
    prefix = f"oaobench-{secrets.token_hex(3)}"
    workers = start_oao_workers(
        procs, target, prefix, processes, args.oao_concurrency, log_level=args.worker_log_level
    )
    try:
        spec = build_spec(args.jobs, shape)
        asyncio.run(
            _oao_once(
                target.url, prefix, build_spec(min(50, args.jobs), shape), args.poll_ms / 1000, args.timeout
            )
        )  # warm-up run
        times: list[float] = []
        submits: list[float] = []
        cpu_server = cpu_workers = 0.0
        for rep in range(args.repeat):
            s0, w0 = target.server_cpu_s(), cpu_seconds([w.pid for w in workers])
            label = f"oao-{shape}-p{processes}-r{rep}"
            with PySpy(procs, args.py_spy, label, [w.pid for w in workers]):
                elapsed, t_submit = asyncio.run(
                    _oao_once(target.url, prefix, spec, args.poll_ms / 1000, args.timeout)
                )
            cpu_server += target.server_cpu_s() - s0
            cpu_workers += cpu_seconds([w.pid for w in workers]) - w0
            times.append(elapsed)
            submits.append(t_submit)
            log(
                f"oao {shape} p={processes}: {args.jobs} nodes in {elapsed:.3f}s "
                f"(submit {t_submit:.3f}s) = {args.jobs / elapsed:,.0f}/s"
            )
    finally:
        procs.stop_all(workers)
    return _result("oao", processes, shape, args.jobs, times, submits, cpu_server, cpu_workers)


def _result(
    system: str,
    processes: int,
    shape: str,
    jobs: int,
    times: list[float],
    submits: list[float],
    cpu_server: float,
    cpu_workers: float,
) -> Result:
    sec = median(times)
    total = sum(times)
    return Result(
        system=system,
        processes=processes,
        shape=shape,
        jobs=jobs,
        seconds=sec,
        submit_s=median(submits),
        jobs_per_s=jobs / sec,
        server_cpu_pct=100 * cpu_server / total,
        worker_cpu_pct=100 * cpu_workers / total,
        runs=times,
    )


# --------------------------------------------------------------------------- Dramatiq


def run_dramatiq(
    args: argparse.Namespace, target: RedisTarget, procs: ProcessGroup, processes: int
) -> Result:
    target.flush()
    os.environ["BENCH_REDIS_URL"] = target.url
    from bench import dramatiq_tasks

    env = {
        **os.environ,
        "BENCH_REDIS_URL": target.url,
        # idle consumers back off up to this many ms between empty fetches (default 1000)
        "dramatiq_worker_timeout": str(args.dramatiq_worker_timeout_ms),
    }
    proc = procs.start(
        f"dramatiq-p{processes}",
        [
            venv_bin("dramatiq"),
            "bench.dramatiq_tasks",
            "--processes",
            str(processes),
            "--threads",
            str(args.dramatiq_threads),
            "--path",
            str(REPO),
            "--queues",
            "default",
        ],
        env=env,
    )
    r = target.r
    ns = dramatiq_tasks.broker.namespace
    msgs_key = f"{ns}:default.msgs"
    try:
        wait_until(
            lambda: r.zcard(f"{ns}:__heartbeats__") >= processes,
            f"{processes} dramatiq worker processes",
            timeout_s=60,
            check=lambda: procs.check_alive([proc]),
        )
        # the master forks; the workers are its children
        pids = [proc.pid]

        def once(n: int) -> tuple[float, float]:
            t0 = time.perf_counter()
            if args.dramatiq_enqueue == "pipeline":
                dramatiq_tasks.send_pipelined(n)
            else:
                for _ in range(n):
                    dramatiq_tasks.noop.send()
            t_submit = time.perf_counter() - t0
            _poll(lambda: r.hlen(msgs_key) == 0, args, "dramatiq")
            return time.perf_counter() - t0, t_submit

        once(min(50, args.jobs))  # warm-up
        times, submits, cpu_server, cpu_workers = _repeat(args, target, pids, once, "dramatiq", processes)
    finally:
        procs.stop(proc)
    return _result("dramatiq", processes, "flat", args.jobs, times, submits, cpu_server, cpu_workers)


def _poll(done: Any, args: argparse.Namespace, what: str) -> None:
    t0 = time.perf_counter()
    poll_s = args.poll_ms / 1000
    while not done():
        if time.perf_counter() - t0 > args.timeout:
            raise TimeoutError(f"{what}: jobs not done after {args.timeout}s")
        time.sleep(poll_s)


def _repeat(
    args: argparse.Namespace, target: RedisTarget, pids: list[int], once: Any, system: str, processes: int
) -> tuple[list[float], list[float], float, float]:
    times: list[float] = []
    submits: list[float] = []
    cpu_server = cpu_workers = 0.0
    for _ in range(args.repeat):
        s0, w0 = target.server_cpu_s(), cpu_seconds(pids)
        elapsed, t_submit = once(args.jobs)
        cpu_server += target.server_cpu_s() - s0
        cpu_workers += cpu_seconds(pids) - w0
        times.append(elapsed)
        submits.append(t_submit)
        log(
            f"{system} p={processes}: {args.jobs} jobs in {elapsed:.3f}s "
            f"(enqueue {t_submit:.3f}s) = {args.jobs / elapsed:,.0f}/s"
        )
    return times, submits, cpu_server, cpu_workers


# --------------------------------------------------------------------------- RQ


def run_rq(
    args: argparse.Namespace, target: RedisTarget, procs: ProcessGroup, processes: int, fork: bool
) -> Result:
    from redis import Redis
    from rq import Queue

    from bench import rq_tasks

    target.flush()
    system = "rq-fork" if fork else "rq-simple"
    token = secrets.token_hex(3)
    argv_tail = [] if fork else ["--worker-class", "rq.worker.SimpleWorker"]
    workers: list[subprocess.Popen[bytes]] = [
        procs.start(
            f"{system}-p{processes}-{i}",
            [
                venv_bin("rq"),
                "worker",
                "--url",
                target.url,
                "--path",
                str(REPO),
                "--name",
                f"bench-{token}-{i}",
                "--logging_level",
                args.worker_log_level.upper(),
                *argv_tail,
                "default",
            ],
        )
        for i in range(processes)
    ]
    conn = Redis.from_url(target.url)
    try:
        wait_until(
            lambda: target.r.scard("rq:workers") >= processes,
            f"{processes} rq workers",
            timeout_s=60,
            check=lambda: procs.check_alive(workers),
        )
        q = Queue("default", connection=conn)
        finished_key = "rq:finished:default"
        failed_key = "rq:failed:default"

        def once(n: int) -> tuple[float, float]:
            before = target.r.zcard(finished_key)
            t0 = time.perf_counter()
            q.enqueue_many([Queue.prepare_data(rq_tasks.noop) for _ in range(n)])
            t_submit = time.perf_counter() - t0

            def done() -> bool:
                if target.r.zcard(failed_key):
                    raise RuntimeError(f"{system}: a job failed")
                return bool(target.r.zcard(finished_key) - before >= n)

            _poll(done, args, system)
            return time.perf_counter() - t0, t_submit

        once(min(50, args.jobs))  # warm-up
        times, submits, cpu_server, cpu_workers = _repeat(
            args, target, [w.pid for w in workers], once, system, processes
        )
    finally:
        procs.stop_all(workers)
        conn.close()
    return _result(system, processes, "flat", args.jobs, times, submits, cpu_server, cpu_workers)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.throughput",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Run from the repository root. Prints a table (or --json) with ratios against "
        "Dramatiq measured in the same run.",
    )
    add_common_args(p)
    p.add_argument("--jobs", type=int, default=None, help="jobs per measurement (default 5000; --quick 1000)")
    p.add_argument("--processes", default="1,2", help="worker process counts (default 1,2)")
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated subset of {', '.join(SYSTEMS)} (default: all)",
    )
    p.add_argument("--shapes", default=",".join(SHAPES), help="OAO DAG shapes (default wide,chain)")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measurements per configuration; the median is reported (default 1)",
    )
    p.add_argument(
        "--oao-concurrency",
        type=int,
        default=32,
        help="oao-worker --concurrency per process (default 32)",
    )
    p.add_argument(
        "--dramatiq-threads",
        type=int,
        default=8,
        help="dramatiq --threads per process (default 8, Dramatiq's own default)",
    )
    p.add_argument(
        "--dramatiq-enqueue",
        choices=("pipeline", "send"),
        default="pipeline",
        help="pipeline: 500 messages per round trip (default; see bench/dramatiq_tasks.py); "
        "send: actor.send() per message, one round trip each",
    )
    p.add_argument(
        "--dramatiq-worker-timeout-ms",
        type=int,
        default=100,
        help="cap of Dramatiq's idle back-off between empty fetches (default 100 ms; "
        "Dramatiq's default is 1000)",
    )
    p.add_argument(
        "--worker-log-level",
        default="info",
        help="log level of oao-worker and rq worker (default info, their default)",
    )
    p.add_argument("--poll-ms", type=float, default=5.0, help="completion poll interval (default 5 ms)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a measurement fails")
    args = p.parse_args(argv)
    if args.jobs is None:
        args.jobs = 1000 if args.quick else 5000
    args.process_counts = [int(x) for x in args.processes.split(",") if x.strip()]
    args.system_list = [s.strip() for s in args.systems.split(",") if s.strip()]
    args.shape_list = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for s in args.system_list:
        if s not in SYSTEMS:
            p.error(f"unknown system {s!r}")
    for s in args.shape_list:
        if s not in SHAPES:
            p.error(f"unknown shape {s!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_signal_exit()
    results: list[Result] = []
    with RedisTarget(args.redis_url, args.embedded) as target, ProcessGroup(args.keep_logs) as procs:
        info = machine_info(target)
        log(format_machine(info))
        for n in args.process_counts:
            if "dramatiq" in args.system_list:
                results.append(run_dramatiq(args, target, procs, n))
            if "rq-simple" in args.system_list:
                results.append(run_rq(args, target, procs, n, fork=False))
            if "rq-fork" in args.system_list:
                results.append(run_rq(args, target, procs, n, fork=True))
            if "oao" in args.system_list:
                for shape in args.shape_list:
                    results.append(run_oao(args, target, procs, n, shape))
    base = {r.processes: r.jobs_per_s for r in results if r.system == "dramatiq"}
    for r in results:
        if r.processes in base:
            r.ratio_vs_dramatiq = r.jobs_per_s / base[r.processes]
    config = {
        "jobs": args.jobs,
        "repeat": args.repeat,
        "oao_concurrency": args.oao_concurrency,
        "dramatiq_threads": args.dramatiq_threads,
        "dramatiq_worker_timeout_ms": args.dramatiq_worker_timeout_ms,
        "dramatiq_enqueue": args.dramatiq_enqueue,
        "worker_log_level": args.worker_log_level,
        "poll_ms": args.poll_ms,
    }
    headers = [
        "system",
        "processes",
        "shape",
        "jobs",
        "seconds",
        "jobs/s",
        "vs Dramatiq",
        "enqueue s",
        "server CPU %",
        "worker CPU %",
    ]
    rows = [
        [
            r.system,
            r.processes,
            r.shape,
            r.jobs,
            r.seconds,
            round(r.jobs_per_s),
            f"{r.ratio_vs_dramatiq:.2f}x" if r.ratio_vs_dramatiq is not None else None,
            r.submit_s,
            round(r.server_cpu_pct),
            round(r.worker_cpu_pct),
        ]
        for r in results
    ]
    text = "\n".join(
        [
            format_machine(info),
            f"config: {config}",
            "",
            format_table(headers, rows),
            "",
            "vs Dramatiq: jobs/s divided by Dramatiq's with the same process count, same run. "
            "OAO's chain shape has no analogue in the baselines: it is compared with their flat runs.",
        ]
    )
    emit(
        args.json,
        {
            "benchmark": "throughput",
            "machine": info,
            "config": config,
            "results": [asdict(r) for r in results],
        },
        text,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
