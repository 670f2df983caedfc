"""``oao-worker`` with candidate performance fixes patched in, to size them before anyone
writes them for real. Nothing here changes the package; it is an experiment harness.

Select fixes with ``WHATIF`` (comma-separated) and point the benchmarks at this script::

    WHATIF=singleflight,pool BENCH_OAO_WORKER="python -m bench.whatif_worker" \\
        python -m bench.concurrency

* ``singleflight``: one spec fetch + validation per run id in ``RuntimeCache.get``;
  concurrent callers await the same result instead of each parsing the spec again.
* ``nodeindex``: ``Spec.node(id)`` through a dict instead of a scan of ``spec.nodes``.
* ``pool``: a ``BlockingConnectionPool`` of 64 connections, so a burst of concurrent
  writes waits for a connection instead of failing with "Too many connections" (the
  default pool's limit, 100) and going through the fenced-write retry backoff.
* ``gcfreeze``: ``gc.freeze()`` after imports; ``gcthreshold``: ``gc.set_threshold(20000, 50, 100)``.

The patches reach into package internals as of the commit measured in
docs/benchmarks.md and may need updating when those change.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from typing import Any

OPTIONS = frozenset(filter(None, os.environ.get("WHATIF", "").split(",")))


def patch_singleflight() -> None:
    from oao_worker import runtime

    original = runtime.RuntimeCache.get
    inflight: dict[tuple[int, str], asyncio.Future[Any]] = {}

    async def get(self: Any, run_id: str) -> Any:
        rt = self._items.get(run_id)
        if rt is not None:
            self._items.move_to_end(run_id)
            return rt
        key = (id(self), run_id)
        fut = inflight.get(key)
        if fut is None:
            fut = asyncio.ensure_future(original(self, run_id))
            inflight[key] = fut
            fut.add_done_callback(lambda _f: inflight.pop(key, None))
        return await asyncio.shield(fut)

    runtime.RuntimeCache.get = get  # type: ignore[method-assign]


def patch_nodeindex() -> None:
    from oao_common import spec as specmod

    index: dict[int, tuple[Any, dict[str, Any]]] = {}

    def node(self: Any, nid: str) -> Any:
        entry = index.get(id(self))
        if entry is None or entry[0] is not self:
            entry = index[id(self)] = (self, {n.id: n for n in self.nodes})
        try:
            return entry[1][nid]
        except KeyError:
            raise KeyError(nid) from None

    specmod.Spec.node = node  # type: ignore[method-assign]


def patch_pool(max_connections: int = 64) -> None:
    from redis.asyncio import BlockingConnectionPool, Redis

    from oao_common import connection
    from oao_worker import cli

    original = connection.connect

    def connect(url: str, **kwargs: Any) -> Redis:
        options = dict(original(url, **kwargs).connection_pool.connection_kwargs)
        pool = BlockingConnectionPool(max_connections=max_connections, timeout=None, **options)
        return Redis(connection_pool=pool)

    cli.connect = connect


def main() -> None:
    if "singleflight" in OPTIONS:
        patch_singleflight()
    if "nodeindex" in OPTIONS:
        patch_nodeindex()
    if "pool" in OPTIONS:
        patch_pool()
    from oao_worker.cli import main as worker_main

    if "gcfreeze" in OPTIONS:
        gc.collect()
        gc.freeze()
    if "gcthreshold" in OPTIONS:
        gc.set_threshold(20000, 50, 100)
    sys.argv[0] = "oao-worker"
    worker_main()


if __name__ == "__main__":
    main()
