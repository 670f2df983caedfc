"""Agents of the container fleet test (tests/deployment/test_container_fleet.py), run by
``oao-worker`` in containers with the repository's ``tests`` directory mounted as
``--app-dir``: importable there as ``deployment.fleet_agents``.

Side effects go through ``oao_test_agents:ext_ledger`` (the file ``OAO_TEST_LEDGER``,
on a directory shared by every container), so the test can tell which recorded steps
ran more than once.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any


async def gated(ctx: Any) -> str:
    """A model call and a side effect, then a (cancellable) wait until the file named by
    ``OAO_FLEET_GATE`` exists, then another model call and side effect. Until the test
    opens the gate these nodes hold their workers' slots, so a container killed or
    stopped at that point certainly has nodes in flight with recorded steps."""
    r = await ctx.llm(f"before the gate: {ctx.node_id}")
    a = await ctx.tool("ext", label=f"{ctx.node_id}-pre-{r.content}")
    gate = Path(os.environ["OAO_FLEET_GATE"])
    while not gate.exists():
        await asyncio.sleep(0.1)
    r = await ctx.llm(f"after the gate: {ctx.node_id}")
    b = await ctx.tool("ext", label=f"{ctx.node_id}-post-{r.content}")
    return f"{a},{b}"
