"""Throughput: no-op jobs per second through OAO, Dramatiq and RQ on one Redis server.

For each process count (default 1 and 2) this runs, against the same Redis database:

* OAO: ``--jobs`` no-op nodes (``examples.agents:noop``) as one run, through real
  ``oao-worker`` processes, in two DAG shapes: ``wide`` (independent nodes) and
  ``chain`` (each node depends on the previous one);
* Dramatiq: the same number of no-op messages (``RedisBroker``, a ``dramatiq`` master
  with that many worker processes, ``--dramatiq-threads`` threads each);
* RQ: the same number of no-op jobs through ``rq worker`` processes, with
  ``rq.worker.SimpleWorker`` (jobs run in the worker process) and with RQ's default
  worker, which forks a work horse per job.

Workers are started first and the clock starts only once all are registered (OAO: the
``workers`` zset; Dramatiq: its heartbeat zset; RQ: the ``rq:workers`` set), after one
small warm-up batch. It runs from the first submit / enqueue call until the last job is
done: OAO's run hash says SUCCEEDED, Dramatiq's message hash is empty (every message
acked), RQ's finished registry holds every job; each is polled every ``--poll-ms``.

Ratios are against Dramatiq (its first ``--dramatiq-threads`` setting) with the same
process count, measured in the same run. The chain shape has no analogue in the
baselines (they run flat jobs); its ratio compares it with their flat throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from bench._common import (
    REPO,
    TERMINAL_RUN_STATES,
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
    median,
    start_oao_workers,
    venv_bin,
    wait_until,
)

SYSTEMS = ("oao", "dramatiq", "rq-simple", "rq-fork")
SHAPES = ("wide", "chain")
WARMUP_JOBS = 50

#: one measurement: given a job count, returns (seconds to done, seconds spent enqueueing)
Once = Callable[[int], tuple[float, float]]


@dataclass(slots=True)
class Result:
    """One measured configuration (``seconds`` is the median over ``--repeat`` runs)."""

    system: str
    config: str
    processes: int
    shape: str
    jobs: int
    seconds: float
    submit_s: float
    jobs_per_s: float
    server_cpu_pct: float
    worker_cpu_pct: float
    other_cpu_pct: float
    runs: list[float] = field(default_factory=list)
    ratio_vs_dramatiq: float | None = None


def measure(
    args: argparse.Namespace,
    target: RedisTarget,
    pids: list[int],
    once: Once,
    system: str,
    config: str,
    processes: int,
    shape: str = "flat",
    profile: Callable[[int], Any] | None = None,
    repeat: int | None = None,
) -> Result:
    """Warm up, then run ``once(args.jobs)`` ``repeat`` (default ``--repeat``) times; CPU of
    the server and of the worker processes (children included) is accounted over the
    measured runs."""
    once(min(WARMUP_JOBS, args.jobs))
    times: list[float] = []
    submits: list[float] = []
    cpu_server = cpu_workers = cpu_other = 0.0
    for rep in range(repeat or args.repeat):

        def body(rep: int = rep) -> tuple[float, float]:
            if profile is None:
                return once(args.jobs)
            with profile(rep):
                return once(args.jobs)

        (elapsed, t_submit), load = measured(body, target, pids, args, f"{system} {shape} p={processes}")
        cpu_server += load.server_s
        cpu_workers += load.workers_s
        cpu_other += load.other_s
        times.append(elapsed)
        submits.append(t_submit)
        log(
            f"{system} [{config}] {shape} p={processes}: {args.jobs} jobs in {elapsed:.3f}s "
            f"(enqueue {t_submit:.3f}s) = {args.jobs / elapsed:,.0f}/s; other load {load.other_pct:.0f}%"
        )
    sec = median(times)
    total = sum(times)  # CPU shares are over the measured runs only (~ their wall time)
    return Result(
        system=system,
        config=config,
        processes=processes,
        shape=shape,
        jobs=args.jobs,
        seconds=sec,
        submit_s=median(submits),
        jobs_per_s=args.jobs / sec,
        server_cpu_pct=100 * cpu_server / total,
        worker_cpu_pct=100 * cpu_workers / total,
        other_cpu_pct=100 * cpu_other / total,
        runs=times,
    )


def poll_until(done: Callable[[], bool], args: argparse.Namespace, what: str) -> None:
    """Poll ``done()`` every ``--poll-ms`` until true; fail after ``--timeout``."""
    t0 = time.perf_counter()
    poll_s = args.poll_ms / 1000
    while not done():
        if time.perf_counter() - t0 > args.timeout:
            raise TimeoutError(f"{what}: jobs not done after {args.timeout}s")
        time.sleep(poll_s)


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


async def oao_submit_and_wait(
    url: str, prefix: str, spec: Any, poll_s: float, timeout_s: float
) -> tuple[float, float]:
    """Submit ``spec`` with ``submit_spec`` and poll the run's status until terminal:
    ``(seconds, submit_seconds)``; raises unless the run SUCCEEDED."""
    from oao_common.broker import Broker
    from oao_common.connection import connect
    from oao_scheduler.submit import submit_spec

    r: Any = connect(url)  # decode_responses=True: replies are str
    try:
        broker = Broker(r, prefix)
        await r.ping()  # connect before the clock starts
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
    args: argparse.Namespace,
    target: RedisTarget,
    procs: ProcessGroup,
    processes: int,
    shape: str,
    concurrency: int,
) -> Result:
    target.flush()
    prefix = f"oaobench-{secrets.token_hex(3)}"
    workers = start_oao_workers(
        procs, target, prefix, processes, concurrency, log_level=args.worker_log_level
    )
    pids = [w.pid for w in workers]

    def once(n: int) -> tuple[float, float]:
        spec = build_spec(n, shape)
        return asyncio.run(oao_submit_and_wait(target.url, prefix, spec, args.poll_ms / 1000, args.timeout))

    def profile(rep: int) -> PySpy:
        return PySpy(
            procs, args.py_spy, f"oao-{shape}-c{concurrency}-p{processes}-r{rep}", pids, args.py_spy_native
        )

    try:
        return measure(
            args, target, pids, once, "oao", f"concurrency={concurrency}", processes, shape, profile
        )
    finally:
        procs.stop_all(workers)


# --------------------------------------------------------------------------- Dramatiq


def run_dramatiq(
    args: argparse.Namespace, target: RedisTarget, procs: ProcessGroup, processes: int, threads: int
) -> Result:
    target.flush()
    os.environ["BENCH_REDIS_URL"] = target.url
    from bench import dramatiq_tasks

    env = {
        **os.environ,
        # idle consumers back off up to this many ms between empty fetches (default 1000)
        "dramatiq_worker_timeout": str(args.dramatiq_worker_timeout_ms),
    }
    argv = [
        venv_bin("dramatiq"), "bench.dramatiq_tasks", "--processes", str(processes),
        "--threads", str(threads), "--path", str(REPO), "--queues", "default",
    ]  # fmt: skip
    master = procs.start(f"dramatiq-p{processes}-t{threads}", argv, env=env)
    r = target.r
    ns = dramatiq_tasks.broker.namespace
    msgs_key = f"{ns}:default.msgs"

    def once(n: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        if args.dramatiq_enqueue == "pipeline":
            dramatiq_tasks.send_pipelined(n)
        else:
            for _ in range(n):
                dramatiq_tasks.noop.send()
        t_submit = time.perf_counter() - t0
        poll_until(lambda: r.hlen(msgs_key) == 0, args, "dramatiq")
        return time.perf_counter() - t0, t_submit

    try:
        wait_until(
            lambda: r.zcard(f"{ns}:__heartbeats__") >= processes,
            f"{processes} dramatiq worker processes",
            timeout_s=60,
            check=lambda: procs.check_alive([master]),
        )
        # the worker processes are children of the master: cpu_seconds counts them
        config = f"threads={threads}, enqueue={args.dramatiq_enqueue}"
        return measure(args, target, [master.pid], once, "dramatiq", config, processes)
    finally:
        procs.stop(master)


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
    worker_class = [] if fork else ["--worker-class", "rq.worker.SimpleWorker"]
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
                *worker_class,
                "default",
            ],
        )
        for i in range(processes)
    ]
    conn = Redis.from_url(target.url)
    q = Queue("default", connection=conn)
    r = target.r

    def once(n: int) -> tuple[float, float]:
        before = r.zcard("rq:finished:default")
        t0 = time.perf_counter()
        q.enqueue_many([Queue.prepare_data(rq_tasks.noop) for _ in range(n)])
        t_submit = time.perf_counter() - t0

        def done() -> bool:
            if r.zcard("rq:failed:default"):
                raise RuntimeError(f"{system}: a job failed")
            return bool(r.zcard("rq:finished:default") - before >= n)

        poll_until(done, args, system)
        return time.perf_counter() - t0, t_submit

    try:
        wait_until(
            lambda: r.scard("rq:workers") >= processes,
            f"{processes} rq workers",
            timeout_s=60,
            check=lambda: procs.check_alive(workers),
        )
        config = "fork per job (default Worker)" if fork else "SimpleWorker (no fork)"
        repeat = args.rq_fork_repeat if fork else args.repeat
        return measure(args, target, [w.pid for w in workers], once, system, config, processes, repeat=repeat)
    finally:
        procs.stop_all(workers)
        conn.close()


# --------------------------------------------------------------------------- main


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str, allowed: tuple[str, ...], p: argparse.ArgumentParser, what: str) -> list[str]:
    out = [s.strip() for s in text.split(",") if s.strip()]
    for s in out:
        if s not in allowed:
            p.error(f"unknown {what} {s!r} (choose from {', '.join(allowed)})")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(p)
    p.add_argument("--jobs", type=int, default=None, help="jobs per measurement (default 5000; --quick 1000)")
    p.add_argument("--processes", default="1,2", help="worker process counts (default 1,2)")
    p.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"subset of {','.join(SYSTEMS)} (default all)"
    )
    p.add_argument("--shapes", default=",".join(SHAPES), help="OAO DAG shapes (default wide,chain)")
    p.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="runs per configuration, median reported (default 3; --quick 1)",
    )
    p.add_argument(
        "--rq-fork-repeat",
        type=int,
        default=1,
        help="runs of the forking RQ worker, ~1 min each at 5000 jobs (default 1)",
    )
    p.add_argument(
        "--oao-concurrency",
        default="10",
        help="oao-worker --concurrency per process; a list measures each (default 10, the CLI's default)",
    )
    p.add_argument(
        "--dramatiq-threads",
        default="8,32",
        help="dramatiq --threads per process; a list measures each, the first is the ratio baseline "
        "(default 8,32: Dramatiq's default, then a tuned setting near its peak on 2 cores)",
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
        help="cap of Dramatiq's idle back-off between empty fetches (default 100; Dramatiq's is 1000)",
    )
    p.add_argument(
        "--worker-log-level",
        default="info",
        help="log level of oao-worker and rq worker (default info, both CLIs' default)",
    )
    p.add_argument("--poll-ms", type=float, default=5.0, help="completion poll interval (default 5 ms)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a measurement fails")
    args = p.parse_args(argv)
    if args.jobs is None:
        args.jobs = 1000 if args.quick else 5000
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    args.process_counts = _ints(args.processes)
    args.oao_concurrencies = _ints(args.oao_concurrency)
    args.thread_counts = _ints(args.dramatiq_threads)
    args.system_list = _names(args.systems, SYSTEMS, p, "system")
    args.shape_list = _names(args.shapes, SHAPES, p, "shape")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_signal_exit()
    results: list[Result] = []
    with RedisTarget(args.redis_url, args.embedded) as target, ProcessGroup(args.keep_logs) as procs:
        info = machine_info(target)
        info["busy_before_pct"] = check_idle()
        log(format_machine(info))
        for n in args.process_counts:
            if "dramatiq" in args.system_list:
                results += [run_dramatiq(args, target, procs, n, t) for t in args.thread_counts]
            if "rq-simple" in args.system_list:
                results.append(run_rq(args, target, procs, n, fork=False))
            if "rq-fork" in args.system_list:
                results.append(run_rq(args, target, procs, n, fork=True))
            if "oao" in args.system_list:
                for shape in args.shape_list:
                    results += [run_oao(args, target, procs, n, shape, c) for c in args.oao_concurrencies]
    base_config = f"threads={args.thread_counts[0]}, enqueue={args.dramatiq_enqueue}"
    base = {r.processes: r.jobs_per_s for r in results if r.system == "dramatiq" and r.config == base_config}
    for r in results:
        if r.processes in base:
            r.ratio_vs_dramatiq = r.jobs_per_s / base[r.processes]
    config = {
        k: getattr(args, k)
        for k in (
            "jobs", "repeat", "rq_fork_repeat", "oao_concurrency", "dramatiq_threads", "dramatiq_enqueue",
            "dramatiq_worker_timeout_ms", "worker_log_level", "poll_ms",
        )
    }  # fmt: skip
    headers = [
        "system", "config", "procs", "shape", "jobs", "seconds", "jobs/s", "vs Dramatiq",
        "enqueue s", "server CPU %", "worker CPU %", "other CPU %",
    ]  # fmt: skip
    rows = [
        [
            r.system,
            r.config,
            r.processes,
            r.shape,
            r.jobs,
            r.seconds,
            round(r.jobs_per_s),
            f"{r.ratio_vs_dramatiq:.2f}x" if r.ratio_vs_dramatiq is not None else None,
            r.submit_s,
            round(r.server_cpu_pct),
            round(r.worker_cpu_pct),
            round(r.other_cpu_pct),
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
            f"vs Dramatiq: jobs/s over Dramatiq's ({base_config}) with the same process count, same run.",
            "seconds: median of the runs, from the first enqueue to the last job done.",
            "OAO's chain shape has no analogue in the baselines: it is compared with their flat runs.",
            "CPU %: of one core, over the measured runs (worker: all worker processes and children;",
            "other: the rest of the machine except this harness, should be ~0).",
        ]
    )
    document = {
        "benchmark": "throughput",
        "machine": info,
        "config": config,
        "results": [asdict(r) for r in results],
    }
    emit(args.json, document, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
