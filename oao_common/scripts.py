"""Loads the Lua scripts of ``oao_common/lua`` and calls them with the key templates.

Each ``<name>.lua`` is prefixed with ``_lib.lua`` (shared helpers) and registered
with redis-py, which runs it by ``EVALSHA`` and falls back to ``EVAL`` after a
server restart flushed the script cache.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from .keys import Keys

SCRIPT_NAMES = (
    "submit",
    "claim",
    "append_events",
    "begin_step",
    "budget",
    "record_step",
    "record_usage",
    "complete",
    "fail",
    "promote",
    "reap",
    "handback",
    "cancel",
    "ratelimit",
    "circuit",
    "heartbeat",
    "prune",
    "depths",
)


@cache
def script_source(name: str) -> str:
    """The full source of script ``name``: ``_lib.lua`` followed by ``<name>.lua``."""
    lua = resources.files("oao_common") / "lua"
    return (lua / "_lib.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


class Scripts:
    """Registered scripts of one connection; ``await scripts.call(name, keys, args)``."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._templates = json.dumps(keys.templates(), separators=(",", ":"))
        self._scripts: dict[str, AsyncScript] = {
            name: redis.register_script(script_source(name)) for name in SCRIPT_NAMES
        }

    async def call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run script ``name`` with ``KEYS=keys`` and ``ARGV=[templates_json, *args]``."""
        return await self._scripts[name](keys=keys, args=[self._templates, *args])
