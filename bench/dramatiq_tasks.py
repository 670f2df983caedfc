"""The Dramatiq side of ``bench.throughput``: a Redis broker and one actor that does nothing.

Workers run ``dramatiq bench.dramatiq_tasks``; the URL comes from ``BENCH_REDIS_URL``.
The default middleware stack is kept (what a Dramatiq user gets out of the box);
``max_retries=0`` only matters if a job failed, which a no-op does not.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from bench._common import DEFAULT_URL

broker = RedisBroker(url=os.environ.get("BENCH_REDIS_URL", DEFAULT_URL))
dramatiq.set_broker(broker)


@dramatiq.actor(max_retries=0)
def noop() -> None:
    """Does nothing: the job measures Dramatiq's own per-message cost."""
