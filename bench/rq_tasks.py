"""The RQ side of ``bench.throughput``: a job function that does nothing."""

from __future__ import annotations


def noop() -> None:
    """Does nothing: the job measures RQ's own per-job cost."""
