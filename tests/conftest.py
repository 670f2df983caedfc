"""Fixtures: a real Valkey server (embedded, one per session) and, when
``OAO_TEST_REDIS_URL`` is set, the machine's Redis too. Each test gets its own key
prefix and its keys are deleted afterwards."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from oao_common.broker import Broker
from oao_common.connection import EmbeddedServer, connect

SERVERS = ["valkey"] + (["redis"] if os.environ.get("OAO_TEST_REDIS_URL") else [])


@pytest.fixture(scope="session")
def valkey_server() -> Iterator[EmbeddedServer]:
    with EmbeddedServer() as s:
        yield s


@pytest.fixture(params=SERVERS)
def redis_url(request: pytest.FixtureRequest, valkey_server: EmbeddedServer) -> str:
    if request.param == "redis":
        return os.environ["OAO_TEST_REDIS_URL"]
    return valkey_server.url


@pytest.fixture
def prefix() -> str:
    return f"oaotest-{uuid.uuid4().hex[:10]}"


async def delete_prefix(url: str, prefix: str) -> None:
    r = connect(url)
    try:
        batch = []
        async for k in r.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(k)
            if len(batch) >= 500:
                await r.delete(*batch)
                batch = []
        if batch:
            await r.delete(*batch)
    finally:
        await r.aclose()


@pytest.fixture
async def broker(redis_url: str, prefix: str) -> AsyncIterator[Broker]:
    r = connect(redis_url)
    b = Broker(r, prefix)
    try:
        yield b
    finally:
        await r.aclose()
        await delete_prefix(redis_url, prefix)
