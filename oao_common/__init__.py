"""Shared pieces of OAO: spec, policy, events, Redis keys, Lua scripts, the broker."""

__version__ = "0.1.0"
