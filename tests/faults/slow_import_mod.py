"""A module whose import blocks for ``OAO_TEST_SLOW_IMPORT_S`` seconds (``time.sleep`` at
import time, like a module that loads a big model), for tests/faults/test_agent_faults.py.
Python imports it once per process: use a fresh worker process per test."""

from __future__ import annotations

import os
import time

time.sleep(float(os.environ.get("OAO_TEST_SLOW_IMPORT_S", "0")))


def agent(task: str) -> str:
    """A sync agent: returns at once."""
    return f"imported slowly: {task}"
