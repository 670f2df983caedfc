"""Agents and tools used by the tests (importable as ``oao_test_agents``).

Counters that must survive worker processes live in files named by the task or
an env var, never in the runtime's own Redis keys.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

_calls: dict[str, int] = {}


def flaky(task: str) -> str:
    """Fails the first N calls per task (task = "<key>:<N>"), then succeeds."""
    key, _, n = task.partition(":")
    _calls[key] = _calls.get(key, 0) + 1
    if _calls[key] <= int(n or 0):
        raise ConnectionError(f"transient failure {_calls[key]} of {key}")
    return f"ok after {_calls[key]} calls"


def broken(task: str) -> str:
    raise ValueError(f"always broken: {task}")


async def sleeper(ctx: Any) -> str:
    """Sleeps float(task) seconds (cancellable), then returns."""
    await asyncio.sleep(float(ctx.task or 0))
    return f"slept {ctx.task}"


async def two_tools_then_wait(ctx: Any) -> str:
    """Two recorded side-effect steps, then blocks if the marker file exists (simulated crash
    point), then a third step."""
    a = await ctx.tool("side_effect", label="a")
    b = await ctx.tool("side_effect", label="b")
    marker = os.environ.get("OAO_TEST_BLOCK_MARKER")
    while marker and Path(marker).exists():
        await asyncio.sleep(0.05)
    c = await ctx.tool("side_effect", label="c")
    return f"{a}{b}{c}"


def side_effect(label: str) -> str:
    """Appends ``label`` to the ledger file named by OAO_TEST_LEDGER: an external effect."""
    path = os.environ["OAO_TEST_LEDGER"]
    with open(path, "a", encoding="utf-8") as f:
        f.write(label + "\n")
    return label


async def chatty(ctx: Any) -> str:
    """Calls the model twice."""
    r1 = await ctx.llm("first")
    r2 = await ctx.llm("second " + r1.content)
    return r2.content


async def noop(ctx: Any) -> str:
    return "ok"


def ext_ledger(label: str) -> str:
    """A side effect outside the runtime: appends "<idempotency key> <attempt> <label>"
    to the file named by OAO_TEST_LEDGER (O_APPEND: one write per line, so lines of
    concurrent processes never interleave)."""
    from oao_worker.tools import current_call

    info = current_call()
    assert info is not None
    line = f"{info.key} {info.attempt} {info.run_id}/{info.node_id}#{info.seq} {label}\n"
    fd = os.open(os.environ["OAO_TEST_LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    return label


async def chaos_agent(ctx: Any) -> str:
    """Several steps: model, side effect, model, side effect."""
    out = []
    for i in range(2):
        r = await ctx.llm(f"step {i} of {ctx.node_id}")
        out.append(await ctx.tool("ext", label=f"{ctx.node_id}-{i}-{r.content}"))
    return ",".join(out)


async def zombie_agent(ctx: Any) -> str:
    """Side effect, slow model call, side effect, slow model call, side effect."""
    a = await ctx.tool("ext", label="a")
    await ctx.llm("think")
    b = await ctx.tool("ext", label="b")
    await ctx.llm("think more")
    c = await ctx.tool("ext", label="c")
    return a + b + c


async def one_call(ctx: Any) -> str:
    """One model call bounded by max_tokens = int(task) (0: unbounded)."""
    n = int(ctx.task or 0)
    reply = await ctx.llm("go", max_tokens=n or None)
    return reply.content


async def call_denied_tool(ctx: Any) -> str:
    return await ctx.tool("side_effect", label="x")


async def one_effect(ctx: Any) -> str:
    """A single side effect through the tool named by the task."""
    return str(await ctx.tool(ctx.task or "ext", label="once"))


async def many_tools(ctx: Any) -> str:
    """Calls side_effect int(task) times."""
    for i in range(int(ctx.task or 1)):
        await ctx.tool("side_effect", label=str(i))
    return "done"


async def many_calls(ctx: Any) -> str:
    """Calls the model int(task) times."""
    for _ in range(int(ctx.task or 1)):
        await ctx.llm("again")
    return "done"


async def stream_then_fail_once(ctx: Any) -> str:
    """One model call, then a transient failure on the first attempt only: the node's
    retry replays the recorded call."""
    reply = await ctx.llm("write")
    if ctx.attempt == 1:
        raise ConnectionError("transient failure after the model call")
    return str(reply.content)


def echo(text: str) -> str:
    """An idempotent tool: returns its argument."""
    return text


async def traced_steps(ctx: Any) -> str:
    """A model call and a tool call; then, while the file named by the task exists (a
    crash point for the tracing test), waits; then one more model call."""
    first = await ctx.llm("hello from " + ctx.node_id)
    echoed = await ctx.tool("echo", text=first.content)
    marker = ctx.task.strip()
    while marker and Path(marker).exists():
        await asyncio.sleep(0.05)
    last = await ctx.llm("bye " + echoed)
    return str(last.content)


async def leaky(ctx: Any) -> str:
    """Fails with secrets in its message: a URL password, a bearer token and the value
    of LEAK_TEST_API_KEY (an openai model of the spec reads it as its API key)."""
    raise ValueError(
        "cannot reach redis://svc:hunter2pw@db.internal:6379/0 with Authorization: Bearer tok_abcdefghijk "
        f"and key {os.environ.get('LEAK_TEST_API_KEY')}"
    )
