"""``oao-scheduler top`` through a pseudo-terminal: it draws queues, workers and a run in
flight, and ``q`` quits it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

from proc import BIN, ROOT, cli, env, start_worker, stop

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>78]")

SPEC = """
name: watched
models:
  m: {provider: scripted, replies: [{content: "hi"}]}
tools:
  echo: {entrypoint: "oao_test_agents:echo", idempotent: true}
agents:
  stepper: {kind: python, entrypoint: "oao_test_agents:traced_steps", model: m, tools: [echo]}
nodes:
  - {id: held, agent: stepper, queue: topq, task: "MARKER"}
  - {id: after, agent: stepper, queue: topq, depends_on: [held], task: ""}
"""


def read_until(fd: int, want: list[str], timeout_s: float) -> str:
    """Read the terminal until every string of ``want`` was drawn (ANSI stripped)."""
    buf = b""
    deadline = time.monotonic() + timeout_s
    while True:
        text = ANSI.sub("", buf.decode(errors="replace"))
        if all(w in text for w in want):
            return text
        left = deadline - time.monotonic()
        assert left > 0, f"never drew {[w for w in want if w not in text]}; screen: {text[-2000:]}"
        r, _, _ = select.select([fd], [], [], min(left, 0.2))
        if r:
            with contextlib.suppress(OSError):
                buf += os.read(fd, 65536)


def test_top_in_a_pty(redis_url: str, prefix: str, tmp_path: Path) -> None:
    marker = tmp_path / "hold"
    marker.write_text("1")
    spec = tmp_path / "watched.yaml"
    spec.write_text(SPEC.replace("MARKER", str(marker)))
    w = start_worker(redis_url, prefix, "--queues", "topq", "--worker-id", "top-w1", "--concurrency", "3")
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    top = None
    try:
        r = cli("submit", str(spec), "--redis-url", redis_url, "--prefix", prefix)
        assert r.returncode == 0, r.stderr
        rid = r.stdout.split()[0]
        top = subprocess.Popen(
            [
                str(BIN / "oao-scheduler"),
                "top",
                "--refresh",
                "0.2",
                "--redis-url",
                redis_url,
                "--prefix",
                prefix,
            ],
            cwd=ROOT,
            env={**env(), "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "50"},
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
        os.close(slave)
        slave = -1
        screen = read_until(master, ["OAO top", "queues", "topq", "top-w1", "alive", "1/3", rid, "0/2"], 30)
        assert "q quits" in screen
        os.write(master, b"q")
        assert top.wait(timeout=15) == 0
    finally:
        if slave >= 0:
            os.close(slave)
        if top is not None and top.poll() is None:
            top.kill()
            top.wait()
        os.close(master)
        marker.unlink(missing_ok=True)
        stop(w)


def test_top_once_without_a_terminal(redis_url: str, prefix: str) -> None:
    r = cli("top", "--once", "--redis-url", redis_url, "--prefix", prefix)
    assert r.returncode == 0, r.stderr
    assert "OAO top" in r.stdout and "queues" in r.stdout and "tokens/min" in r.stdout
