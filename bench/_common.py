"""The harness shared by the benchmarks: the Redis they own, worker subprocesses that are
always stopped, RSS and CPU sampling, py-spy attachment, machine facts and output.

Every benchmark owns one Redis database (``--redis-url``, default DB 14 of the local
server, flushed before and after each measurement) or a private embedded Valkey
(``--embedded``). DB 0 is refused so a shared database is never flushed by mistake.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, TypeVar
from urllib.parse import urlparse

import psutil
import redis

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
DEFAULT_URL = "redis://127.0.0.1:6379/14"
TERMINAL_RUN_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED", "PARTIAL"})


def log(msg: str) -> None:
    """A progress line on stderr (stdout is kept for the table or the JSON document)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def venv_bin(name: str) -> str:
    """The console script ``name`` installed next to this interpreter, else on ``PATH``."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"cannot find {name!r} next to {sys.executable} or on PATH")
    return found


def install_signal_exit() -> None:
    """Turn SIGTERM / SIGHUP into ``SystemExit`` so ``with`` blocks stop the subprocesses."""

    def _exit(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit)


# --------------------------------------------------------------------------- arguments


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """``--redis-url``, ``--embedded``, ``--quick``, ``--json``, ``--py-spy``, ``--keep-logs``."""
    parser.add_argument(
        "--redis-url",
        default=DEFAULT_URL,
        help=f"Redis the benchmark owns; its DB is FLUSHED (default: {DEFAULT_URL}; DB 0 is refused)",
    )
    parser.add_argument(
        "--embedded",
        action="store_true",
        help="use a private embedded Valkey (oao_common.connection.EmbeddedServer) instead",
    )
    parser.add_argument("--quick", action="store_true", help="a smaller, faster run (smoke test)")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document on stdout instead of the tables"
    )
    parser.add_argument(
        "--py-spy",
        metavar="DIR",
        default=None,
        help="also record each OAO worker with py-spy (collapsed stacks, one file per worker) "
        "into DIR during the measured phase; summarize with python -m bench.pyspy_top",
    )
    parser.add_argument(
        "--py-spy-native",
        action="store_true",
        help="with --py-spy: also sample native frames (shows time in the garbage collector, C code)",
    )
    parser.add_argument(
        "--idle-wait",
        type=float,
        default=120.0,
        help="before each measurement wait up to this many seconds for other load on the machine "
        "to stop (default 120; 0: do not wait)",
    )
    parser.add_argument(
        "--max-other-pct",
        type=float,
        default=15.0,
        help="a measurement during which other processes used more than this %% of a core is "
        "repeated (default 15)",
    )
    parser.add_argument(
        "--retries", type=int, default=3, help="repeats of a disturbed measurement (default 3)"
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the worker logs (their directory is printed)"
    )


# --------------------------------------------------------------------------- redis


def _db_of(url: str) -> int:
    u = urlparse(url)
    path = u.path.strip("/")
    if path.isdigit():
        return int(path)
    for part in u.query.split("&"):
        k, _, v = part.partition("=")
        if k == "db" and v.isdigit():
            return int(v)
    return 0


class RedisTarget:
    """The Redis server a benchmark owns for its lifetime.

    ``url`` is the database used by every system under test; :meth:`flush` empties it.
    With ``embedded``, a private Valkey is started (and stopped on exit) instead.
    """

    def __init__(self, url: str, embedded: bool = False) -> None:
        self._embedded: Any = None
        self.url = url
        if embedded:
            from oao_common.connection import EmbeddedServer

            self._embedded = EmbeddedServer()
        elif _db_of(url) == 0:
            raise SystemExit(
                f"refusing {url}: the benchmark flushes its database, give it one of its own "
                "(e.g. redis://127.0.0.1:6379/14) or use --embedded"
            )
        self.client: redis.Redis | None = None

    def __enter__(self) -> RedisTarget:
        if self._embedded is not None:
            self._embedded.start()
            self.url = self._embedded.url
        self.client = redis.Redis.from_url(self.url, decode_responses=True)
        try:
            self.client.ping()
        except redis.RedisError as e:
            self.__exit__(None, None, None)
            raise SystemExit(f"cannot reach Redis at {self.url}: {e}") from None
        self.flush()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.client is not None:
            with contextlib.suppress(redis.RedisError):
                self.flush()
            self.client.close()
            self.client = None
        if self._embedded is not None:
            self._embedded.stop()

    @property
    def r(self) -> redis.Redis:
        if self.client is None:
            raise RuntimeError("RedisTarget used outside its with block")
        return self.client

    def flush(self) -> None:
        """Empty the benchmark's own database (``FLUSHDB``: other databases are untouched)."""
        self.r.flushdb()

    def server_version(self) -> str:
        info = self.r.info("server")
        if "valkey_version" in info:
            return f"Valkey {info['valkey_version']}"
        return f"Redis {info.get('redis_version', '?')}"

    def server_cpu_s(self) -> float:
        """CPU seconds (user + sys) the server process has used so far (``INFO cpu``)."""
        info = self.r.info("cpu")
        return float(info.get("used_cpu_user", 0.0)) + float(info.get("used_cpu_sys", 0.0))


# --------------------------------------------------------------------------- processes


class ProcessGroup:
    """Subprocesses started by a benchmark, each the leader of its own process group
    (``start_new_session``) so that stopping it also ends whatever it forked.

    Used as a context manager: every process still running is stopped on exit, errors
    and interrupts included. Output goes to one log file per process in :attr:`logdir`.
    """

    def __init__(self, keep_logs: bool = False) -> None:
        self.logdir = Path(tempfile.mkdtemp(prefix="oao-bench-"))
        self.keep_logs = keep_logs
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: dict[int, Path] = {}

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        stdout: int | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in the repository root; stderr (and stdout unless given) go to
        ``<logdir>/<name>.log``."""
        path = self.logdir / f"{name}.log"
        with path.open("ab") as logf:
            proc = subprocess.Popen(
                list(argv),
                cwd=REPO,
                env=env if env is not None else os.environ.copy(),
                stdin=subprocess.DEVNULL,
                stdout=stdout if stdout is not None else logf,
                stderr=logf,
                start_new_session=True,
            )
        self._procs.append(proc)
        self._logs[proc.pid] = path
        return proc

    def log_tail(self, proc: subprocess.Popen[bytes], lines: int = 20) -> str:
        path = self._logs.get(proc.pid)
        if path is None or not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def check_alive(self, procs: Sequence[subprocess.Popen[bytes]]) -> None:
        """Raise with the log tail of the first process that has exited."""
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"process {p.args!r} exited with {p.returncode}:\n{self.log_tail(p)}")

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def stop(
        self, proc: subprocess.Popen[bytes], timeout_s: float = 20.0, sig: int = signal.SIGTERM
    ) -> int | None:
        """``sig`` to the process group, then SIGKILL after ``timeout_s``; returns the exit code."""
        if proc.poll() is None:
            self._signal_group(proc, sig)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log(f"pid {proc.pid} ({proc.args!r}): no exit after {timeout_s}s, killing")
                self._signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=10)
        # children the leader forked (dramatiq workers, RQ work horses) that outlived it
        self._signal_group(proc, signal.SIGKILL)
        if proc in self._procs:
            self._procs.remove(proc)
        return proc.returncode

    def stop_all(self, procs: Sequence[subprocess.Popen[bytes]] | None = None) -> None:
        """Stop ``procs`` (default: all) together: signal all first, then wait for each."""
        todo = list(self._procs if procs is None else procs)
        for p in todo:
            if p.poll() is None:
                self._signal_group(p, signal.SIGTERM)
        for p in todo:
            self.stop(p)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()
        if self.keep_logs or exc_type is not None:
            log(f"worker logs kept in {self.logdir}")
        else:
            shutil.rmtree(self.logdir, ignore_errors=True)


def wait_until(
    predicate: Any,
    what: str,
    timeout_s: float = 30.0,
    interval_s: float = 0.02,
    check: Any = None,
) -> None:
    """Poll ``predicate()`` until true; ``check()`` may raise (e.g. a dead worker)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


# --------------------------------------------------------------------------- OAO workers


def oao_worker_argv(url: str, prefix: str, concurrency: int, log_level: str = "info") -> list[str]:
    """The real ``oao-worker`` command line (``--app-dir`` is the repository root, so
    ``examples.agents:noop`` and ``bench.agents:*`` import).

    ``$BENCH_OAO_WORKER``, split like a shell command, replaces the ``oao-worker``
    executable, e.g. to measure a patched build with the same harness.
    """
    override = os.environ.get("BENCH_OAO_WORKER")
    return [
        *(shlex.split(override) if override else [venv_bin("oao-worker")]),
        "--redis-url",
        url,
        "--prefix",
        prefix,
        "--queues",
        "default",
        "--concurrency",
        str(concurrency),
        "--app-dir",
        str(REPO),
        "--log-level",
        log_level,
    ]


def start_oao_workers(
    procs: ProcessGroup,
    target: RedisTarget,
    prefix: str,
    n: int,
    concurrency: int,
    log_level: str = "info",
    timeout_s: float = 60.0,
) -> list[subprocess.Popen[bytes]]:
    """Start ``n`` worker processes and return once all are in the ``workers`` zset
    (so process start-up is never part of a measurement)."""
    from oao_common.keys import Keys

    env = {**os.environ, "OAO_LOG_FORMAT": "json"}
    workers = [
        procs.start(
            f"oao-worker-{prefix}-{i}", oao_worker_argv(target.url, prefix, concurrency, log_level), env=env
        )
        for i in range(n)
    ]
    key = Keys(prefix).workers
    wait_until(
        lambda: target.r.zcard(key) >= n,
        f"{n} OAO workers to register in {key}",
        timeout_s=timeout_s,
        check=lambda: procs.check_alive(workers),
    )
    return workers


# --------------------------------------------------------------------------- measuring


class RssSampler:
    """Samples the RSS of process ``pid`` every ``interval_s`` in a thread (psutil).

    ``peak`` is the largest sample in bytes; use as a context manager around the
    measured phase.
    """

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self._proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def rss_bytes(pid: int) -> int:
    """The current RSS of ``pid`` in bytes."""
    return int(psutil.Process(pid).memory_info().rss)


def vm_hwm(pid: int) -> int | None:
    """The kernel's peak RSS of ``pid`` in bytes (``VmHWM`` of /proc/PID/status), if readable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds used so far by ``pids``, their live children and the
    children they have already waited for."""
    total = 0.0
    for pid in pids:
        try:
            p = psutil.Process(pid)
            group = [p, *p.children(recursive=True)]
        except psutil.Error:
            continue
        for q in group:
            with contextlib.suppress(psutil.Error):
                t = q.cpu_times()
                # children_*: children already waited for (e.g. RQ's forked work horses)
                total += t.user + t.system + t.children_user + t.children_system
    return total


def machine_busy_s() -> float:
    """Non-idle CPU seconds of the whole machine so far (all cores, all processes)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def own_cpu_s() -> float:
    """CPU seconds of this (harness) process so far."""
    t = psutil.Process().cpu_times()
    return float(t.user + t.system)


class LoadWatch:
    """CPU used during a ``with`` block by the Redis server, by ``pids`` (with their
    children) and by the rest of the machine (``other``: neither those, nor this
    harness). ``other`` should be ~0; on a shared 2-core machine it is the load that
    skews a measurement. Figures are CPU seconds; ``*_pct`` are of one core."""

    def __init__(self, target: RedisTarget | None, pids: Sequence[int]) -> None:
        self.target = target
        self.pids = list(pids)
        self.wall_s = self.server_s = self.workers_s = self.other_s = 0.0

    def _server(self) -> float:
        return self.target.server_cpu_s() if self.target is not None else 0.0

    def __enter__(self) -> LoadWatch:
        self._t0 = time.perf_counter()
        self._s0, self._w0 = self._server(), cpu_seconds(self.pids)
        self._m0, self._h0 = machine_busy_s(), own_cpu_s()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._t0
        self.server_s = self._server() - self._s0
        self.workers_s = cpu_seconds(self.pids) - self._w0
        ours = self.server_s + self.workers_s + own_cpu_s() - self._h0
        self.other_s = max(0.0, machine_busy_s() - self._m0 - ours)

    @property
    def other_pct(self) -> float:
        return 100 * self.other_s / self.wall_s if self.wall_s else 0.0


def measured(
    body: Callable[[], T],
    target: RedisTarget | None,
    pids: Sequence[int],
    args: argparse.Namespace,
    what: str,
) -> tuple[T, LoadWatch]:
    """Run ``body()`` under a :class:`LoadWatch`, after waiting for the machine to be
    idle (``--idle-wait``). A run during which other processes used more than
    ``--max-other-pct`` of a core is discarded and run again, up to ``--retries`` times;
    the last one is kept (its ``other_pct`` shows the disturbance)."""
    for attempt in range(args.retries + 1):
        if args.idle_wait:
            wait_for_idle(args.idle_wait)
        with LoadWatch(target, pids) as load:
            result = body()
        if load.other_pct <= args.max_other_pct or attempt == args.retries:
            return result, load
        log(f"{what}: other processes used {load.other_pct:.0f}% of a core meanwhile; running it again")
    raise AssertionError("unreachable")


def busy_pct(seconds: float) -> float:
    """Busy % of the machine (100 = one core) over the next ``seconds``."""
    b0 = machine_busy_s()
    time.sleep(seconds)
    return 100 * (machine_busy_s() - b0) / seconds


def check_idle(seconds: float = 1.0, limit_pct: float = 25.0) -> float:
    """Busy % of the machine over ``seconds``; warns above ``limit_pct``: other load on
    a 2-core machine skews every figure."""
    pct = busy_pct(seconds)
    if pct > limit_pct:
        log(f"WARNING: the machine is not idle ({pct:.0f}% of a core busy before the benchmark)")
    return pct


def wait_for_idle(max_wait_s: float, limit_pct: float = 25.0, window_s: float = 0.5) -> float:
    """Wait (up to ``max_wait_s``) until the machine is quiet: busy below ``limit_pct``
    over a ``window_s`` window. Returns the last busy %. Idle benchmark workers of
    the configuration about to be measured count too, so keep the limit loose."""
    deadline = time.monotonic() + max_wait_s
    warned = False
    while True:
        pct = busy_pct(window_s)
        if pct < limit_pct or time.monotonic() > deadline:
            if pct >= limit_pct:
                log(f"WARNING: still {pct:.0f}% busy after waiting {max_wait_s}s; measuring anyway")
            return pct
        if not warned:
            log(f"machine busy ({pct:.0f}% of a core): waiting up to {max_wait_s}s for it to be idle")
            warned = True


class PySpy:
    """``py-spy record`` attached to each pid while the ``with`` block runs (collapsed
    stacks; each sample pauses the target briefly, so profiled runs are not the timed
    ones); a no-op when ``outdir`` is None. ``native`` adds C frames (GC, hiredis)."""

    def __init__(
        self,
        procs: ProcessGroup,
        outdir: str | None,
        label: str,
        pids: Sequence[int],
        native: bool = False,
        rate: int = 250,
    ) -> None:
        self.procs = procs
        self.outdir = Path(outdir) if outdir else None
        self.label = label
        self.pids = list(pids)
        self.native = native
        self.rate = rate
        self.files: list[Path] = []
        self._spies: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> PySpy:
        if self.outdir is None:
            return self
        self.outdir.mkdir(parents=True, exist_ok=True)
        for i, pid in enumerate(self.pids):
            out = self.outdir / f"{self.label}-w{i}.txt"
            self.files.append(out)
            argv = [venv_bin("py-spy"), "record", "--pid", str(pid), "--format", "raw"]
            argv += ["--rate", str(self.rate), "--output", str(out)]
            if self.native:
                argv.append("--native")
            self._spies.append(self.procs.start(f"py-spy-{self.label}-{i}", argv))
        time.sleep(0.5)  # let py-spy attach before the measured phase starts
        return self

    def __exit__(self, *exc: object) -> None:
        for spy in self._spies:
            self.procs.stop(spy, timeout_s=30.0, sig=signal.SIGINT)
        if self._spies:
            log("py-spy profiles: " + ", ".join(str(f) for f in self.files))


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) with linear interpolation between closest ranks."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 0.5)


# --------------------------------------------------------------------------- reporting


def machine_info(target: RedisTarget) -> dict[str, Any]:
    """What the figures were measured on (CPU, Python, server and package versions)."""
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str | None] = {}
    for pkg in ("oao", "redis", "hiredis", "pydantic", "dramatiq", "rq"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "commit": _git_commit(),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "server": target.server_version(),
        "redis_url": target.url,
        "packages": versions,
    }


def _git_commit() -> str | None:
    """The checked-out commit, with ``+dirty`` when the work tree has changes (read-only)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def format_machine(info: dict[str, Any]) -> str:
    pk = info["packages"]
    return (
        f"commit {info['commit']}; busy before start {info.get('busy_before_pct', 0):.0f}% of a core; "
        f"machine: {info['nproc']} CPUs ({info['cpu']}), "
        f"{info['memory_gib']} GiB, {info['os']}; "
        f"Python {info['python']}; {info['server']}; " + ", ".join(f"{k} {v}" for k, v in pk.items() if v)
    )


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown pipe table (readable in a terminal, pasteable into docs)."""
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def emit(as_json: bool, document: dict[str, Any], text: str) -> None:
    """Print the JSON document or the human-readable text on stdout."""
    if as_json:
        print(json.dumps(document, indent=2, default=str))
    else:
        print(text)
