"""Helpers of the Redis fault tests: a fault-injecting TCP proxy, waits with deadlines,
and the end-of-run checks.

Self-contained on purpose (it only uses APIs that the fault-tolerant code and the code
before it both have), so the same tests can be run against an older checkout to show
that they fail there.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from oao_common.broker import Broker
from oao_common.scripts import script_source

#: Directory of this file: passed to workers as ``--app-dir`` so that
#: ``redis_fault_agents:<name>`` entrypoints import.
HERE = Path(__file__).resolve().parent

TERMINAL_RUN = ("SUCCEEDED", "FAILED", "CANCELLED", "PARTIAL")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_until(
    probe: Callable[[], Any], want: Any, timeout_s: float, what: str, logs: tuple[Path, ...] = ()
) -> Any:
    """Poll ``probe`` (sync or async) every 20 ms until it returns ``want`` (or
    ``want(value)`` is true); fail after ``timeout_s`` seconds with the last value (and
    the tails of ``logs``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        v = probe()
        if inspect.isawaitable(v):
            v = await v
        if want(v) if callable(want) else v == want:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout_s}s for {what}: last value {v!r}{log_tails(*logs)}")
        await asyncio.sleep(0.02)


async def live_workers(broker: Broker) -> int:
    """How many workers have a live heartbeat key."""
    return len([k async for k in broker.redis.scan_iter(match=f"{broker.keys.prefix}:w:*:hb")])


def log_tails(*paths: Path, chars: int = 1500) -> str:
    """The last ``chars`` characters of each log, for failure messages."""
    return "".join(f"\n--- {p.name}:\n{p.read_text(errors='replace')[-chars:]}" for p in paths if p.exists())


async def wait_run_end(broker: Broker, run_id: str, timeout_s: float, logs: tuple[Path, ...] = ()) -> str:
    """Wait for the run to reach a terminal state; returns it. Fails after ``timeout_s``
    with the node states that did not finish (and the tails of ``logs``)."""
    deadline = time.monotonic() + timeout_s
    rk = broker.keys.run(run_id)
    while True:
        status = await broker.redis.hget(rk, "status")
        if status in TERMINAL_RUN:
            return str(status)
        if time.monotonic() >= deadline:
            run = await broker.get_run(run_id)
            nodes = await broker.get_nodes(run_id, run["node_ids"].split(","))
            stuck = [
                (n["id"], n.get("status"), n.get("lease")) for n in nodes if n.get("status") != "SUCCEEDED"
            ]
            raise AssertionError(
                f"run {run_id} still {status} after {timeout_s}s; unfinished nodes: {stuck[:8]}; "
                f"left in lists: {(await leftovers(broker, run_id))[:8]}{log_tails(*logs)}"
            )
        await asyncio.sleep(0.05)


async def leftovers(broker: Broker, run_id: str) -> list[str]:
    """Every job still in a ready list, an active list, the delayed set or the run's
    parked list (the same scan as tests/chaos/chaoskit.py)."""
    r = broker.redis
    out: list[str] = []
    async for k in r.scan_iter(match=f"{broker.keys.prefix}:q:*"):
        out += await r.lrange(k, 0, -1)
    async for k in r.scan_iter(match=f"{broker.keys.prefix}:w:*:active"):
        out += [f"{k}: {j}" for j in await r.lrange(k, 0, -1)]
    out += await r.zrange(broker.keys.delayed, 0, -1)
    out += await r.lrange(broker.keys.parked(run_id), 0, -1)
    return out


async def check_run_succeeded(broker: Broker, run_id: str) -> list[Any]:
    """Assert: run SUCCEEDED, every node SUCCEEDED with exactly one NODE_SUCCEEDED event
    (of its last started attempt), no job left in any list. Returns the run's events."""
    run = await broker.get_run(run_id)
    node_ids = run["node_ids"].split(",")
    nodes = await broker.get_nodes(run_id, node_ids)
    bad = [(n["id"], n.get("status"), n.get("error")) for n in nodes if n.get("status") != "SUCCEEDED"]
    assert not bad, bad[:5]
    assert run["status"] == "SUCCEEDED", run
    left = await leftovers(broker, run_id)
    assert not left, f"jobs left behind: {left[:8]}"
    events = await broker.events(run_id)
    succeeded = Counter(e.node for e in events if e.type == "NODE_SUCCEEDED")
    assert all(succeeded[n] == 1 for n in node_ids), {n: succeeded[n] for n in node_ids if succeeded[n] != 1}
    last_start: dict[str, int] = {}
    for e in events:
        if e.type == "NODE_STARTED":
            last_start[e.node] = e.attempt
        elif e.type == "NODE_SUCCEEDED":
            assert e.attempt == last_start.get(e.node), (e.node, e.attempt, last_start.get(e.node))
    return events


def read_logs(*paths: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in paths if p.exists())


# ---------------------------------------------------------------------- the proxy


def _marks(script: str) -> tuple[bytes, bytes]:
    """What identifies a call of OAO script ``script`` in a command: its SHA (EVALSHA)
    or the first line of its own source (EVAL after NOSCRIPT)."""
    return hashlib.sha1(script_source(script).encode()).hexdigest().encode(), f"-- {script}.lua:".encode()


class _Conn:
    """One proxied client connection and its upstream connection."""

    def __init__(self, cw: asyncio.StreamWriter, uw: asyncio.StreamWriter) -> None:
        self.cw = cw
        self.uw = uw
        self.pending: str | None = None  # the script whose reply comes next
        self.tail = b""

    def abort(self) -> None:
        for w in (self.cw, self.uw):
            w.transport.abort()


class FaultProxy:
    """A TCP proxy between OAO clients and one Redis server, on a free loopback port.

    Faults, armed by the test:

    * :meth:`drop_replies` ``(script, n, refuse_s)``: the next ``n`` replies to calls of
      the Lua script ``script`` (``"claim"``, ``"complete"``...; error replies such as
      ``NOSCRIPT`` and a claim's empty reply do not count) are swallowed and the
      connection is closed: the server ran the call, the client never saw the answer
      and re-sends the command on a new connection (redis-py's retry on connection
      errors). With ``refuse_s``, new connections are then refused for that many
      seconds (``math.inf``: until :meth:`reopen`), so the re-sends fail too and the
      caller sees the error; with ``cut_all`` every open connection is closed as well:
      the client is cut off from Redis altogether.
    * :meth:`break_spec_reads` ``(for_s, most)``: from the first read of a run's spec
      (the ``HMGET <run> spec ... started_at`` of a worker's runtime cache) on, for
      ``for_s`` seconds (and at most ``most`` times), every such command's connection is
      closed before the command reaches Redis: a Redis blip while a fresh worker loads
      the spec.

    Counters: :attr:`dropped` (script -> replies dropped), :attr:`spec_reads_broken`,
    :attr:`refused`.
    """

    def __init__(self, upstream_url: str) -> None:
        hostport = upstream_url.split("://", 1)[1].split("/", 1)[0]
        host, port = hostport.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.dropped: Counter[str] = Counter()
        self.spec_reads_broken = 0
        self.refused = 0
        self._to_drop: dict[str, int] = {}
        self._marks: dict[str, tuple[bytes, bytes]] = {}
        self._refuse_s = 0.0
        self._refuse_until = 0.0
        self._cut_all = False
        self._break_spec_for: float | None = None
        self._break_until: float | None = None
        self._break_most: int | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def drop_replies(self, script: str, n: int, refuse_s: float = 0.0, cut_all: bool = False) -> None:
        """Swallow the next ``n`` replies to ``script`` (see the class doc)."""
        self._marks[script] = _marks(script)
        self._to_drop[script] = self._to_drop.get(script, 0) + n
        self._refuse_s = refuse_s
        self._cut_all = cut_all

    def reopen(self) -> None:
        """Accept connections again (ends a ``refuse_s`` window early)."""
        self._refuse_until = 0.0

    def break_spec_reads(self, for_s: float, most: int | None = None) -> None:
        """Break spec reads for ``for_s`` seconds from the next one, at most ``most`` of
        them (see the class doc)."""
        self._break_spec_for = for_s
        self._break_until = None
        self._break_most = most

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in list(self._conns):
            c.abort()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------------ internals

    def _armed_script(self, conn: _Conn, data: bytes) -> str | None:
        window = conn.tail + data
        conn.tail = data[-64:]
        if b"\r\nEVALSHA\r\n" not in window and b"\r\nEVAL\r\n" not in window:
            return None  # not a script call (SCRIPT LOAD carries the source too)
        for script, marks in self._marks.items():
            if self._to_drop.get(script, 0) > 0 and any(m in window for m in marks):
                return script
        return None

    def _breaks_spec_read(self, data: bytes) -> bool:
        if self._break_spec_for is None:
            return False
        if not (b"HMGET" in data and b"\r\nspec\r\n" in data and b"\r\nstarted_at\r\n" in data):
            return False
        now = time.monotonic()
        if self._break_until is None:
            self._break_until = now + self._break_spec_for
        if now < self._break_until and (
            self._break_most is None or self.spec_reads_broken < self._break_most
        ):
            return True
        self._break_spec_for = None
        return False

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            if time.monotonic() < self._refuse_until:
                self.refused += 1
                cw.transport.abort()
                return
            try:
                ur, uw = await asyncio.open_connection(*self.upstream)
            except OSError:
                cw.transport.abort()
                return
            conn = _Conn(cw, uw)
            self._conns.add(conn)
            try:
                await asyncio.gather(self._up(conn, cr), self._down(conn, ur))
            finally:
                self._conns.discard(conn)
                conn.abort()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _up(self, conn: _Conn, cr: asyncio.StreamReader) -> None:
        try:
            while data := await cr.read(65536):
                if self._breaks_spec_read(data):
                    self.spec_reads_broken += 1
                    conn.abort()
                    return
                script = self._armed_script(conn, data)
                if script is not None:
                    conn.pending = script
                conn.uw.write(data)
                await conn.uw.drain()
        except OSError:
            pass
        finally:
            conn.abort()

    async def _down(self, conn: _Conn, ur: asyncio.StreamReader) -> None:
        try:
            while data := await ur.read(65536):
                script, conn.pending = conn.pending, None
                # Only replies of calls that ran: not an error (NOSCRIPT, OOM...), nor a
                # claim that took nothing.
                ran = not data.startswith(b"-") and not (script == "claim" and data.startswith(b"*0\r\n"))
                if script is not None and self._to_drop.get(script, 0) > 0 and ran:
                    self._to_drop[script] -= 1
                    self.dropped[script] += 1
                    if self._refuse_s:
                        self._refuse_until = time.monotonic() + self._refuse_s
                    for c in list(self._conns) if self._cut_all else [conn]:
                        c.abort()
                    return
                conn.cw.write(data)
                await conn.cw.drain()
        except OSError:
            pass
        finally:
            conn.abort()
