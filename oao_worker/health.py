"""The worker's health endpoint, for Kubernetes liveness and readiness probes
(``oao-worker --health-port PORT``).

``GET /livez`` answers 200 while the worker is *alive*, ``GET /readyz`` 200 while it is
*ready*, ``GET /healthz`` 200 when both hold; otherwise 503. Every answer carries the
same JSON document (``alive``, ``ready``, ``reasons`` and the figures they come from).

- **alive**: the worker's event loop ran a callback posted from this server within
  ``max_stall_s`` seconds, and its heartbeat thread (``oao_worker/heartbeat.py``) is
  running and finished a heartbeat within ``max_stall_s`` plus the beat interval (a
  third of the TTL), successful or failed on a Redis error. A Redis outage therefore
  leaves the worker alive (its loops wait the outage out; restarting it would not help)
  but not ready. The default stall, 60 s, is above the longest heartbeat attempt against
  an unreachable server (four tries of the 10 s socket timeout,
  ``oao_common/connection.py``).
- **ready**: alive, not stopping (a draining worker is not ready), and the last
  heartbeat succeeded less than the heartbeat TTL ago: the worker's key in Redis is
  live, so Redis is reachable and accepts the worker's writes.

The server runs in its own thread (``http.server``), so it answers while the event loop
is blocked, and it pings the loop itself every ``poll_s`` seconds: the loop lag is
known even before the heartbeat thread starts. docs/deployment.md shows the probes.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

    from .worker import Worker

DEFAULT_MAX_STALL_S = 60.0


class LoopProbe:
    """Measures how long a callback posted to ``loop`` from another thread waits.

    :meth:`poke` posts a callback unless one is still waiting; :meth:`lag_s` is the
    seconds the waiting one has waited (0.0 when none waits).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._sent: float | None = None
        self._answered = time.monotonic()
        self.closed = False

    def poke(self) -> None:
        """Post a ping to the loop (thread-safe; at most one waits at a time)."""
        with self._lock:
            if self._sent is not None and self._answered < self._sent:
                return
            self._sent = time.monotonic()
        try:
            self._loop.call_soon_threadsafe(self._answer)
        except RuntimeError:  # the loop is closed: the worker is gone
            self.closed = True

    def _answer(self) -> None:
        self._answered = time.monotonic()

    def lag_s(self) -> float:
        """Seconds the unanswered ping has waited (0.0 if the last one was answered)."""
        sent = self._sent
        if sent is None or self._answered >= sent:
            return 0.0
        return time.monotonic() - sent


@dataclass(slots=True)
class Health:
    """One evaluation of a worker's health (see the module docstring)."""

    alive: bool
    ready: bool
    reasons: list[str] = field(default_factory=list)
    doc: dict[str, Any] = field(default_factory=dict)


def evaluate(worker: Worker, probe: LoopProbe, max_stall_s: float) -> Health:
    """Judge ``worker`` now. ``max_stall_s``: seconds the event loop or the heartbeat
    thread may go without progress before the worker is no longer alive."""
    now = time.monotonic()
    reasons: list[str] = []
    alive = True
    lag = probe.lag_s()
    if probe.closed:
        alive = False
        reasons.append("event loop closed")
    elif lag > max_stall_s:
        alive = False
        reasons.append(f"event loop unresponsive for {lag:.1f} s (limit {max_stall_s:g} s)")
    hb = worker.heartbeat
    beat_age: float | None = None
    if hb is None:
        thread = "not started"
        reasons.append("not registered in Redis yet")
    else:
        thread = "running" if hb.alive else "dead"
        if not hb.alive:
            alive = False
            reasons.append("heartbeat thread is dead")
        # beats are due every TTL/3 (or sooner, after a failure)
        progress = hb.last_done if hb.last_done is not None else hb.started_at
        if progress is not None and now - progress > max_stall_s + hb.ttl_s / 3:
            alive = False
            reasons.append(f"heartbeat thread made no progress for {now - progress:.1f} s")
        if hb.last_ok is not None:
            beat_age = now - hb.last_ok
        if beat_age is None or beat_age > hb.ttl_s:
            reasons.append(
                "no heartbeat yet"
                if beat_age is None
                else f"last heartbeat {beat_age:.1f} s ago (TTL {hb.ttl_s:g} s): Redis unreachable"
            )
    stopping = worker.stopping
    if stopping:
        reasons.append("stopping (draining in-flight nodes)")
    fresh = beat_age is not None and hb is not None and beat_age <= hb.ttl_s
    ready = alive and fresh and not stopping
    doc = {
        "worker_id": worker.id,
        "alive": alive,
        "ready": ready,
        "reasons": reasons,
        "loop_lag_s": round(lag, 3),
        "heartbeat_age_s": None if beat_age is None else round(beat_age, 3),
        "heartbeat_thread": thread,
        "inflight": worker.inflight,
        "stopping": stopping,
    }
    return Health(alive, ready, reasons, doc)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], worker: Worker, probe: LoopProbe, max_stall_s: float) -> None:
        super().__init__(addr, _Handler)
        self.worker = worker
        self.probe = probe
        self.max_stall_s = max_stall_s

    def service_actions(self) -> None:  # called by serve_forever every poll interval
        self.probe.poke()


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path not in ("/livez", "/readyz", "/healthz"):
            self.send_error(404, "try /livez, /readyz or /healthz")
            return
        s = self.server
        s.probe.poke()
        h = evaluate(s.worker, s.probe, s.max_stall_s)
        ok = {"/livez": h.alive, "/readyz": h.ready, "/healthz": h.alive and h.ready}[path]
        data = json.dumps(h.doc).encode()
        self.send_response(200 if ok else 503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: no access log
        return


class HealthServer:
    """Serves the health endpoint of ``worker`` (whose event loop is ``loop``) on
    ``host:port`` from a daemon thread. ``max_stall_s``: see :func:`evaluate`;
    ``poll_s``: seconds between loop pings.

    Raises ``OSError`` when the address cannot be bound (the socket is bound here).
    """

    def __init__(
        self,
        worker: Worker,
        loop: asyncio.AbstractEventLoop,
        port: int,
        host: str = "0.0.0.0",
        max_stall_s: float = DEFAULT_MAX_STALL_S,
        poll_s: float = 0.5,
    ) -> None:
        self.probe = LoopProbe(loop)
        self._server = _Server((host, port), worker, self.probe, max_stall_s)
        self._poll_s = poll_s
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(poll_s,), name=f"{worker.id}-health", daemon=True
        )

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        self.probe.poke()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (waits up to one poll interval)."""
        self._server.shutdown()
        self._server.server_close()
