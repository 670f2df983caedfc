"""An entrypoint module that leaves a trace when imported: it writes the file named by
``TRUST_PROBE_MARKER`` (if set) at import time. Tests of ``--allow-entrypoints`` check the
file does not exist, proving a refused entrypoint was never imported."""

from __future__ import annotations

import os
from pathlib import Path

_marker = os.environ.get("TRUST_PROBE_MARKER")
if _marker:
    Path(_marker).write_text(f"imported by pid {os.getpid()}\n")


def run(task: str) -> str:
    """A plain agent: returns a fixed answer."""
    return "probe ran"
