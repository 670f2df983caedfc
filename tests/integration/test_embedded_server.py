"""Embedded Valkey servers started at once by parallel processes or threads each find
a port of their own (a port taken before the server binds it is replaced)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import redis

from oao_common.connection import EmbeddedServer


def test_servers_started_at_once_all_come_up() -> None:
    servers = [EmbeddedServer() for _ in range(6)]
    try:
        with ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(lambda s: s.start(), servers))
        urls = {s.url for s in servers}
        assert len(urls) == len(servers)
        for url in urls:
            assert redis.Redis.from_url(url, socket_timeout=5).ping() is True
    finally:
        for s in servers:
            s.stop()
