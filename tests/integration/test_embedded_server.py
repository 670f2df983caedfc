"""The embedded Valkey finds another port when the one it picked is taken before it
binds (parallel test runs on one machine)."""

from __future__ import annotations

import socket
from urllib.parse import urlparse

import redis

from oao_common.connection import EmbeddedServer


def test_a_port_taken_before_start_is_replaced() -> None:
    server = EmbeddedServer()
    picked = urlparse(server.url).port
    assert picked is not None
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", picked))
        taken.listen()
        with server:
            port = urlparse(server.url).port
            assert port != picked
            assert redis.Redis.from_url(server.url).ping() is True
