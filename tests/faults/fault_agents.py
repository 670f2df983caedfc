"""Misbehaving agents and tools for tests/faults/test_agent_faults.py.

Importable as ``faults.fault_agents`` in worker processes (``tests`` is on their
``PYTHONPATH``, see tests/proc.py) and in the test process. Durations come from the
node's task so that each test picks its own; files that must be seen across processes
live in the directory named by ``OAO_TEST_MARKER_DIR``.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any


def _marker_dir() -> Path:
    return Path(os.environ["OAO_TEST_MARKER_DIR"])


async def block_loop(ctx: Any) -> str:
    """Blocks the worker's event loop: ``time.sleep(float(task))`` inside ``async def``."""
    time.sleep(float(ctx.task))
    return f"blocked {ctx.task}"


async def quick(ctx: Any) -> str:
    """Returns at once."""
    return "quick"


async def marked_sleep(ctx: Any) -> str:
    """Creates the file ``<OAO_TEST_MARKER_DIR>/<node id>`` (the node runs in a worker),
    then sleeps float(task) seconds (cancellable)."""
    d = _marker_dir()
    d.mkdir(parents=True, exist_ok=True)
    (d / ctx.node_id).write_text(str(ctx.attempt))
    await asyncio.sleep(float(ctx.task))
    return f"slept {ctx.task}"


def sync_sleep(task: str) -> str:
    """A sync agent (run in the worker's executor) that sleeps float(task) seconds."""
    time.sleep(float(task))
    return f"slept {task}"


def hang(task: str) -> str:
    """A sync agent that marks (a file ``hang-<pid>-<thread>``) that its thread started,
    then sleeps float(task) seconds: past its node's time limit, it hangs the thread."""
    d = _marker_dir()
    d.mkdir(parents=True, exist_ok=True)
    (d / f"hang-{os.getpid()}-{time.monotonic_ns()}").write_text(task)
    time.sleep(float(task))
    return "woke up"


def _quick_sync(node_id: str) -> str:
    return f"quick {node_id}"


async def quick_sync_after_hangs(ctx: Any) -> str:
    """Waits (on the loop, without a thread) until int(task) hang calls have started,
    then does its sync work through the worker's executor (``ctx.run_sync``): so the
    hung calls hold the threads first, whatever order the nodes were claimed in."""
    want = int(ctx.task)
    while len(list(_marker_dir().glob("hang-*"))) < want:
        await asyncio.sleep(0.02)
    return str(await ctx.run_sync(_quick_sync, ctx.node_id))


async def tool_with_name_arg(ctx: Any) -> str:
    """Calls the tool ``echo`` with an argument called ``name``."""
    return str(await ctx.tool("echo", name="x"))


def echo(name: str) -> str:
    """Returns its argument ``name``."""
    return name
