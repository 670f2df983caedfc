"""The HTTP API served for tests over a real socket on 127.0.0.1: uvicorn running
``create_app`` in a thread with its own event loop and Redis client (as
``oao-scheduler api`` would). Shared by the API and the browser tests."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn

from oao_common.broker import Broker
from oao_common.connection import connect
from oao_scheduler.api import create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveAPI:
    """uvicorn serving the API on 127.0.0.1 in a thread with its own event loop and
    its own Redis client (as ``oao-scheduler api`` would)."""

    def __init__(self, redis_url: str, prefix: str, tokens: list[str] | None = None) -> None:
        self.redis_url, self.prefix, self.tokens = redis_url, prefix, tokens
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: uvicorn.Server | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        redis = connect(self.redis_url, socket_connect_timeout=1.0)
        app = create_app(Broker(redis, self.prefix), self.tokens, sse_keepalive_ms=200)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        try:
            await self.server.serve()
        finally:
            await redis.aclose()

    def __enter__(self) -> LiveAPI:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not (self.server is not None and self.server.started):
            assert self.thread.is_alive(), "the API server thread died"
            assert time.monotonic() < deadline, "the API server did not start within 15 s"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive(), "the API server did not stop within 15 s"
