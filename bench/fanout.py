"""A wide fan-out DAG (one root, ``--nodes`` no-op children) through ``oao-scheduler run``
versus ``oao-scheduler submit`` + separate ``oao-worker`` processes.

Modes (``--modes``, each a fresh run of the same spec file on the same Redis):

* ``submit`` (the baseline): ``oao-worker`` x ``--workers`` (``--concurrency`` each) and
  ``oao-scheduler serve`` are started and registered before the clock; the clock runs
  from launching ``oao-scheduler submit SPEC`` until this script sees the run ended
  (one ``HGET`` of the run's status every 10 ms).
* ``run``: ``oao-scheduler run SPEC --workers W --concurrency C`` (its progress view on
  stderr, a pipe; the report on stdout, a file), from launch to exit.
* ``run-tty``: the same inside a pseudo-terminal, so ``run`` draws its live view.
* ``submit-wait``: the baseline's fleet, and ``submit SPEC --wait`` (progress lines and
  report) from launch to exit.
* ``submit-1proc``: like ``submit`` with one ``oao-worker`` holding all the slots
  (``--workers`` x ``--concurrency``): the one process ``run`` has for its workers.

Each row splits the wall time with the run's own timestamps (server clock, same host):
*to submitted* (launch → the run's ``created_at``: start-up, validation, submit),
*execution* (``created_at`` → ``finished_at``) and *after* (``finished_at`` → the end:
noticing it, the report, shutting down). CPU seconds are those of the OAO processes and
of the Redis server meanwhile. Ratios are against ``submit`` in the same invocation.

    python -m bench.fanout                                  # 20,000 children, all modes
    python -m bench.fanout --nodes 2000 --modes submit,run  # smaller
    python -m bench.fanout --tree /tmp/oao-main             # OAO processes from another checkout

``--tree DIR`` puts DIR first on the OAO processes' ``PYTHONPATH`` and makes it their
``--app-dir`` (e.g. a ``git archive`` of an older commit), to measure old code with this
same script.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pty
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script too

from bench._common import (
    REPO,
    TERMINAL_RUN_STATES,
    ProcessGroup,
    RedisTarget,
    add_common_args,
    cpu_seconds,
    emit,
    format_machine,
    format_table,
    log,
    machine_busy_s,
    machine_info,
    oao_worker_argv,
    own_cpu_s,
    venv_bin,
    wait_for_idle,
    wait_until,
)

MODES = ("submit", "run", "run-tty", "submit-wait", "submit-1proc")


@dataclass
class Row:
    mode: str
    nodes: int
    status: str
    wall_s: float
    to_submitted_s: float
    execution_s: float
    after_s: float
    oao_cpu_s: float
    redis_cpu_s: float
    other_pct: float
    exit_code: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def write_spec(path: Path, n: int) -> None:
    nodes: list[dict[str, Any]] = [{"id": "root", "agent": "noop"}]
    nodes += [{"id": f"c{i:05d}", "agent": "noop", "depends_on": ["root"]} for i in range(n)]
    doc = {
        "name": f"fanout-{n}",
        "agents": {"noop": {"kind": "python", "entrypoint": "examples.agents:noop"}},
        "nodes": nodes,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def children_cpu_s() -> float:
    """CPU seconds of this process' children that have been waited for."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_times(target: RedisTarget, prefix: str) -> tuple[str, dict[str, str]]:
    """The single run under ``prefix``: ``(run_id, run hash fields)``."""
    rid = str(target.r.zrange(f"{prefix}:runs", 0, 0)[0])
    fields = target.r.hmget(f"{prefix}:run:{{{rid}}}", "status", "created_at", "finished_at")
    return rid, dict(zip(("status", "created_at", "finished_at"), map(str, fields), strict=True))


def oao_env(tree: str | None) -> dict[str, str]:
    env = {**os.environ, "OAO_LOG_LEVEL": "warning", "OAO_LOG_FORMAT": "json"}
    if tree:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (tree, env.get("PYTHONPATH", "")) if p)
    return env


def launch_in_pty(argv: list[str], env: dict[str, str], out: Path) -> tuple[subprocess.Popen[bytes], Any]:
    """Start ``argv`` with stdout to ``out`` and stderr on a pseudo-terminal whose output
    is read (and discarded) by a thread: ``run`` sees a terminal and draws live."""
    master, slave = pty.openpty()
    with out.open("wb") as f:
        proc = subprocess.Popen(
            argv, cwd=REPO, env={**env, "COLUMNS": "120", "LINES": "40", "TERM": "xterm"},
            stdin=subprocess.DEVNULL, stdout=f, stderr=slave, start_new_session=True,
        )  # fmt: skip
    os.close(slave)
    seen = {"bytes": 0}

    def drain() -> None:
        with contextlib.suppress(OSError):
            while chunk := os.read(master, 65536):
                seen["bytes"] += len(chunk)
        os.close(master)

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    return proc, (t, seen)


def app_dir(args: argparse.Namespace) -> str:
    """Where the OAO processes import entrypoints from (``--app-dir``): the ``--tree``, so
    that nothing of this checkout shadows the code measured, else this repository."""
    return str(args.tree or REPO)


def scheduler(args: argparse.Namespace) -> list[str]:
    return [venv_bin("oao-scheduler"), "--app-dir", app_dir(args)]


def start_fleet(
    args: argparse.Namespace,
    target: RedisTarget,
    procs: ProcessGroup,
    prefix: str,
    env: dict[str, str],
    one_process: bool = False,
) -> list[subprocess.Popen[bytes]]:
    """``--workers`` ``oao-worker`` processes (or one with all their slots) and
    ``oao-scheduler serve``, registered."""
    n, concurrency = (1, args.workers * args.concurrency) if one_process else (args.workers, args.concurrency)
    worker_argv = oao_worker_argv(target.url, prefix, concurrency, "warning")
    worker_argv[worker_argv.index("--app-dir") + 1] = app_dir(args)
    fleet = [procs.start(f"worker-{prefix}-{i}", worker_argv, env=env) for i in range(n)]
    serve = [*scheduler(args), "serve", "--redis-url", target.url, "--prefix", prefix]
    fleet.append(procs.start(f"serve-{prefix}", serve, env=env))
    wait_until(
        lambda: target.r.zcard(f"{prefix}:workers") >= n,
        "the workers to register",
        timeout_s=60,
        check=lambda: procs.check_alive(fleet),
    )
    return fleet


def launch(mode: str, argv: list[str], env: dict[str, str], out: Path) -> tuple[subprocess.Popen[bytes], Any]:
    if mode == "run-tty":
        return launch_in_pty(argv, env, out)
    with out.open("wb") as f:
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    return proc, None


def measure_once(
    args: argparse.Namespace, target: RedisTarget, procs: ProcessGroup, mode: str, spec: Path
) -> Row:
    prefix = f"fanout-{secrets.token_hex(3)}"
    env = oao_env(args.tree)
    common = ["--redis-url", target.url, "--prefix", prefix]
    one_process = mode == "submit-1proc"
    fleet = start_fleet(args, target, procs, prefix, env, one_process) if mode.startswith("submit") else []
    if mode in ("submit", "submit-1proc"):
        argv = [*scheduler(args), "submit", str(spec), *common]
    elif mode == "submit-wait":
        argv = [*scheduler(args), "submit", str(spec), *common, "--wait"]
    else:
        argv = [*scheduler(args), "run", str(spec), *common, "--workers", str(args.workers)]
        argv += ["--concurrency", str(args.concurrency)]
    if args.idle_wait:
        wait_for_idle(args.idle_wait, limit_pct=40.0)
    out = procs.logdir / f"{mode}-{prefix}.out"
    pids = [p.pid for p in fleet]
    redis0, fleet0, kids0 = target.server_cpu_s(), cpu_seconds(pids), children_cpu_s()
    busy0, own0 = machine_busy_s(), own_cpu_s()
    extra: dict[str, Any] = {}
    t0 = time.time()
    proc, tty = launch(mode, argv, env, out)
    try:
        code = proc.wait(timeout=args.timeout)
        t_end = time.time()
        if mode in ("submit", "submit-1proc"):  # the command returned at once: wait for the end
            rid = str(target.r.zrange(f"{prefix}:runs", 0, 0)[0])
            key = f"{prefix}:run:{{{rid}}}"
            deadline = time.monotonic() + args.timeout
            while target.r.hget(key, "status") not in TERMINAL_RUN_STATES:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{mode}: run {rid} not done after {args.timeout}s")
                time.sleep(0.01)
            t_end = time.time()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    if tty is not None:
        reader, seen = tty
        reader.join(5)
        extra["terminal_bytes"] = seen["bytes"]
    wall = t_end - t0
    oao_cpu = cpu_seconds(pids) - fleet0 + children_cpu_s() - kids0
    redis_cpu = target.server_cpu_s() - redis0
    other = max(0.0, machine_busy_s() - busy0 - oao_cpu - redis_cpu - (own_cpu_s() - own0))
    rid, times = run_times(target, prefix)
    if code != 0 or times["status"] != "SUCCEEDED":
        raise RuntimeError(f"{mode}: exit {code}, run {rid} {times['status']}; see {out}")
    created, finished = int(times["created_at"]) / 1000, int(times["finished_at"]) / 1000
    procs.stop_all(fleet)
    target.flush()
    return Row(
        mode=mode,
        nodes=args.nodes + 1,
        status=times["status"],
        wall_s=wall,
        to_submitted_s=created - t0,
        execution_s=finished - created,
        after_s=t_end - finished,
        oao_cpu_s=oao_cpu,
        redis_cpu_s=redis_cpu,
        other_pct=100 * other / wall if wall else 0.0,
        exit_code=code,
        extra=extra,
    )


def measure(args: argparse.Namespace, target: RedisTarget, procs: ProcessGroup, mode: str, spec: Path) -> Row:
    """:func:`measure_once`, again (up to ``--retries``) if other processes used more than
    ``--max-other-pct`` of a core meanwhile."""
    for attempt in range(args.retries + 1):
        row = measure_once(args, target, procs, mode, spec)
        log(
            f"{mode}: {row.nodes:,} nodes in {row.wall_s:.2f}s (to submitted {row.to_submitted_s:.2f}, "
            f"execution {row.execution_s:.2f}, after {row.after_s:.2f}); other load {row.other_pct:.0f}%"
        )
        if row.other_pct <= args.max_other_pct or attempt == args.retries:
            return row
        log(f"{mode}: other processes used {row.other_pct:.0f}% of a core meanwhile; running it again")
    raise AssertionError("unreachable")


def render(rows: list[Row], info: dict[str, Any], args: argparse.Namespace) -> str:
    base = next((r for r in rows if r.mode == "submit"), None)
    table = []
    for r in rows:
        ratio = f"{r.wall_s / base.wall_s:.2f}x" if base else "-"
        exec_ratio = f"{r.execution_s / base.execution_s:.2f}x" if base else "-"
        table.append(
            [
                r.mode,
                r.wall_s,
                ratio,
                r.to_submitted_s,
                r.execution_s,
                exec_ratio,
                r.after_s,
                r.oao_cpu_s,
                r.redis_cpu_s,
                f"{r.other_pct:.0f}%",
                ", ".join(f"{w:.1f}" for w in r.extra.get("walls_s", [])),
            ]
        )
    head = (
        f"fan-out: 1 root + {args.nodes:,} no-op children; {args.workers} workers x concurrency "
        f"{args.concurrency}" + (f"; OAO from {args.tree}" if args.tree else "")
    )
    cols = ["mode", "wall s", "vs submit", "to submitted s", "execution s", "vs submit", "after s"]
    cols += ["OAO CPU s", "Redis CPU s", "other", "all walls s"]
    return "\n".join([head, format_machine(info), "", format_table(cols, table)])


def wall(row: Row) -> float:
    return row.wall_s


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--nodes", type=int, default=20_000, help="children of the root (default 20000)")
    p.add_argument("--workers", type=int, default=2, help="worker processes / run --workers (default 2)")
    p.add_argument("--concurrency", type=int, default=8, help="per worker (default 8, run's default)")
    p.add_argument("--modes", default="submit,run,run-tty,submit-wait", help=f"of {', '.join(MODES)}")
    p.add_argument("--repeat", type=int, default=1, help="measurements per mode; the median is shown")
    p.add_argument("--tree", default=None, help="run the OAO processes from this checkout (PYTHONPATH)")
    p.add_argument("--timeout", type=float, default=900.0, help="per measurement, seconds")
    a = p.parse_args(argv)
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in a.modes if m not in MODES]
    if bad:
        p.error(f"unknown modes {bad}; choose from {MODES}")
    if a.quick:
        a.nodes = min(a.nodes, 500)
    if a.tree:
        a.tree = str(Path(a.tree).resolve())
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="oao-fanout-") as tmp, ProcessGroup(args.keep_logs) as procs:
        spec = Path(tmp) / "fanout.yaml"
        write_spec(spec, args.nodes)
        with RedisTarget(args.redis_url, args.embedded) as target:
            info = machine_info(target)
            info["cpu_count_logical"] = psutil.cpu_count()
            rows = []
            for m in args.modes:  # the median (by wall time) of --repeat measurements
                runs = sorted((measure(args, target, procs, m, spec) for _ in range(args.repeat)), key=wall)
                row = runs[len(runs) // 2]
                row.extra["walls_s"] = [round(r.wall_s, 2) for r in runs]
                rows.append(row)
    emit(
        args.json,
        {"machine": info, "args": vars(args), "rows": [asdict(r) for r in rows]},
        render(rows, info, args),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
