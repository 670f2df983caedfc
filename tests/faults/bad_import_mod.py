"""A module that raises ``ValueError`` while it is imported (a broken configuration
read at import time), for tests/faults/test_agent_faults.py."""

from __future__ import annotations

raise ValueError("bad configuration at import time")


def agent(task: str) -> str:  # never reached
    return task
