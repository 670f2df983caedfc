"""The Dramatiq side of ``bench.throughput``: a Redis broker and one actor that does nothing.

Workers run ``dramatiq bench.dramatiq_tasks``; the URL comes from ``BENCH_REDIS_URL``.
The default middleware stack is kept (what a Dramatiq user gets out of the box);
``max_retries=0`` only matters if a job failed, which a no-op does not.
"""

from __future__ import annotations

import os
from uuid import uuid4

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import current_millis

from bench._common import DEFAULT_URL

broker = RedisBroker(url=os.environ.get("BENCH_REDIS_URL", DEFAULT_URL))
dramatiq.set_broker(broker)


@dramatiq.actor(max_retries=0)
def noop() -> None:
    """Does nothing: the job measures Dramatiq's own per-message cost."""


def send_pipelined(n: int, batch: int = 500) -> None:
    """Enqueue ``n`` ``noop`` messages, ``batch`` per round trip.

    Dramatiq has no bulk enqueue: ``actor.send()`` is one round trip per message, so a
    single producer caps the measured rate. This issues exactly what
    ``RedisBroker.enqueue`` issues (the broker's ``dispatch`` script, command
    ``enqueue``, a fresh ``redis_message_id``, the ``before/after_enqueue`` middleware
    hooks) through a non-transactional pipeline. It relies on RedisBroker internals
    (``scripts``, ``broker_id``, ``_max_unpack_size``) checked against dramatiq 2.2.
    """
    dispatch = broker.scripts["dispatch"]
    unpack = broker._max_unpack_size()
    queue = noop.queue_name
    left = n
    while left > 0:
        with broker.client.pipeline(transaction=False) as pipe:
            for _ in range(min(batch, left)):
                msg = noop.message().copy(options={"redis_message_id": str(uuid4())})
                broker.emit_before("enqueue", msg, None)
                dispatch(
                    keys=[broker.namespace],
                    args=[
                        "enqueue",
                        current_millis(),
                        queue,
                        broker.broker_id,
                        broker.heartbeat_timeout,
                        broker.dead_message_ttl,
                        0,
                        unpack,
                        msg.options["redis_message_id"],
                        msg.encode(),
                    ],
                    client=pipe,
                )
                broker.emit_after("enqueue", msg, None)
            pipe.execute()
        left -= batch
