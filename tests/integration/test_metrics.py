"""Prometheus metrics over a real HTTP socket, from real worker and serve processes."""

from __future__ import annotations

import re
import socket
import time
import urllib.request
from pathlib import Path

from proc import cli, start_serve, start_worker, stop


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int, timeout_s: float = 20) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                return str(r.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def value(text: str, name: str, **labels: str) -> float:
    """The sample ``name{labels}`` (labels in any order), 0 if absent."""
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:{{(.*)}})? (\S+)$", line)
        if not m:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(m.group(2))
    return 0.0


def test_worker_and_serve_metrics(redis_url: str, prefix: str, tmp_path: Path) -> None:
    wport, sport = free_port(), free_port()
    w = start_worker(redis_url, prefix, "--metrics-port", str(wport), log=tmp_path / "w.log")
    s = start_serve(
        redis_url, prefix, "--metrics-port", str(sport), "--reaper-interval", "0.1", log=tmp_path / "s.log"
    )
    try:
        r = cli("submit", "examples/blog_post.yaml", "--wait", "--redis-url", redis_url, "--prefix", prefix)
        assert r.returncode == 0, r.stderr
        m = scrape(wport)
        assert value(m, "oao_executions_total", status="succeeded", agent_type="llm") == 3
        assert value(m, "oao_executions_total", status="succeeded", agent_type="python") == 1
        assert value(m, "oao_tool_calls_total", tool="notes.search", outcome="ok") == 1
        assert value(m, "oao_steps_total", kind="llm", mode="executed") == 6
        assert value(m, "oao_token_usage_total", model="writer-model", kind="input") > 0
        assert value(m, "oao_active_agents") == 0
        assert value(m, "oao_execution_duration_seconds_count", agent_type="llm") == 3
        deadline = time.monotonic() + 20
        while value(scrape(sport), "oao_workers", state="alive") != 1:
            assert time.monotonic() < deadline, scrape(sport)
            time.sleep(0.1)
        sm = scrape(sport)
        assert "oao_jobs_dead_lettered_total" in sm
        assert value(sm, "oao_fleet_slots", state="total") == 10
        assert value(sm, "oao_queue_depth", queue="default", band="normal", state="ready") == 0
        assert value(m, "oao_worker_concurrency") == 10
        assert value(m, "oao_step_duration_seconds_count", kind="llm") == 6
    finally:
        stop(w, s)
