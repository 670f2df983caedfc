"""Starting real OAO processes (CLI entry points) for end-to-end and chaos tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), e.get("PYTHONPATH", "")])
    e["OAO_LOG_FORMAT"] = "json"
    e.pop("OAO_REDIS_URL", None)
    e.update(extra)
    return e


def cli(*args: str, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run ``oao-scheduler ARGS`` to completion."""
    return subprocess.run(
        [str(BIN / "oao-scheduler"), *args],
        cwd=ROOT,
        env=kw.pop("env", env()),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def start_worker(
    url: str, prefix: str, *args: str, log: Path | None = None, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        [str(BIN / "oao-worker"), "--redis-url", url, "--prefix", prefix, *args],
        cwd=ROOT,
        env=env(**(extra_env or {})),
        stdout=out,
        stderr=out,
    )


def start_serve(
    url: str, prefix: str, *args: str, log: Path | None = None, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        [str(BIN / "oao-scheduler"), "serve", "--redis-url", url, "--prefix", prefix, *args],
        cwd=ROOT,
        env=env(**(extra_env or {})),
        stdout=out,
        stderr=out,
    )


def stop(*procs: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL whatever is still alive after ``timeout`` seconds."""
    for p in procs:
        if p.poll() is None:
            with _suppress():
                p.send_signal(signal.SIGCONT)
                p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return isinstance(exc[1], ProcessLookupError)
