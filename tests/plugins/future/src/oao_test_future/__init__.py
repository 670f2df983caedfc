"""A plugin written for OAO plugin API 2.0: an OAO providing 1.0 must refuse it
before calling ``register``."""

from __future__ import annotations

from typing import Any

from oao.plugins import Plugin


def register(api: Any) -> None:
    raise AssertionError("register of an incompatible plugin must never be called")


plugin = Plugin(api_version="2.0", register=register, description="needs a newer OAO")
