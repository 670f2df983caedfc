"""Tools: Python functions named in a spec's ``tools:`` section.

A tool is ``module:function`` (sync or async). Its JSON schema for tool-calling
models is derived from the signature with pydantic; its description is the spec's
``description`` or the docstring's first line. While a tool runs,
:func:`idempotency_key` returns the key of the current call, for a tool that passes
it on to an external API (docs/guarantees.md, "Tool calls and side effects").
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import sys
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from pydantic import create_model

from oao_common.errors import PermanentError
from oao_common.spec import ToolSpec
from oao_common.trust import DEFAULT_TRUST, TrustPolicy


@dataclass(frozen=True, slots=True)
class ToolCallInfo:
    """The tool call running in this context: its idempotency key, run, node, step
    sequence number and attempt."""

    key: str
    run_id: str = ""
    node_id: str = ""
    seq: int = 0
    attempt: int = 0


#: Runs a sync callable off the event loop: ``await run_sync(fn, *args, **kwargs)``.
RunSync = Callable[..., Awaitable[Any]]

_current: ContextVar[ToolCallInfo | None] = ContextVar("oao_tool_call", default=None)


def current_call() -> ToolCallInfo | None:
    """The :class:`ToolCallInfo` of the tool call running in this context, else ``None``."""
    return _current.get()


def idempotency_key() -> str | None:
    """The idempotency key of the tool call running in this context, else ``None``."""
    info = _current.get()
    return info.key if info else None


def load_entrypoint(entrypoint: str, trust: TrustPolicy = DEFAULT_TRUST) -> Any:
    """Import ``module:attr.path``; raises :class:`PermanentError` with the cause, for
    any exception the module raises while it is imported, and
    :class:`~oao_common.errors.TrustError` (nothing imported) for an entrypoint that
    ``trust`` does not allow. Blocking: workers call it through their executor
    (``oao_worker/executor.py``), never on the event loop."""
    trust.check_entrypoint(entrypoint)  # before any import (docs/security.md)
    module_name, _, attr_path = entrypoint.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # any failure of the module's code, not only ImportError
        raise PermanentError(f"cannot import {entrypoint!r}: {type(e).__name__}: {e}") from None
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PermanentError(f"{entrypoint!r}: {module_name} has no attribute {attr_path!r}") from None
    trust.check_target(entrypoint, obj)
    return obj


def runs_no_code(entrypoint: str) -> bool:
    """True if resolving ``entrypoint`` runs none of its code: its module is imported
    already and the target is not a class (whose constructor a worker would call).
    Such entrypoints are loaded on the event loop; the others through the executor."""
    module_name, _, attr_path = entrypoint.partition(":")
    obj: Any = sys.modules.get(module_name)
    if obj is None:
        return False
    for part in attr_path.split("."):
        obj = inspect.getattr_static(obj, part, None)
        if obj is None:
            return False
    return not inspect.isclass(obj)


@dataclass(slots=True)
class Tool:
    name: str
    func: Callable[..., Any]
    spec: ToolSpec

    @property
    def description(self) -> str:
        doc = inspect.getdoc(self.func) or ""
        return self.spec.description or (doc.splitlines()[0] if doc else self.name)

    def schema(self) -> dict[str, Any]:
        """The OpenAI ``{"type": "function", "function": {...}}`` description of this tool."""
        fields: dict[str, Any] = {}
        for p in inspect.signature(self.func).parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            ann = p.annotation if p.annotation is not inspect.Parameter.empty else Any
            default = p.default if p.default is not inspect.Parameter.empty else ...
            fields[p.name] = (ann, default)
        params = create_model(f"{self.name.replace('.', '_')}_args", **fields).model_json_schema()
        params.pop("title", None)
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": params,
            },
        }

    async def call(self, args: dict[str, Any], info: ToolCallInfo, run_sync: RunSync | None = None) -> Any:
        """Run the tool with keyword ``args`` under ``info``: async tools on the loop,
        sync tools through ``run_sync`` (the worker's bounded executor; default
        ``asyncio.to_thread``).

        A ``TypeError`` from binding the arguments becomes :class:`PermanentError`.
        """
        try:
            inspect.signature(self.func).bind(**args)
        except TypeError as e:
            raise PermanentError(f"bad arguments for tool {self.name!r}: {e}") from None
        token = _current.set(info)
        try:
            if inspect.iscoroutinefunction(self.func):
                return await self.func(**args)
            return await (run_sync or asyncio.to_thread)(self.func, **args)
        finally:
            _current.reset(token)


def load_tools(specs: dict[str, ToolSpec], trust: TrustPolicy = DEFAULT_TRUST) -> dict[str, Tool]:
    """Resolve every Python tool of a spec (MCP servers are started by
    :func:`oao_worker.mcp_tools.connect_mcp_tools`); raises :class:`PermanentError`
    for a bad entrypoint (``TrustError`` for one ``trust`` does not allow)."""
    tools = {}
    for name, s in specs.items():
        if s.entrypoint is None:
            continue
        func = load_entrypoint(s.entrypoint, trust)
        if not callable(func):
            raise PermanentError(f"tool {name!r}: {s.entrypoint} is not callable")
        tools[name] = Tool(name, func, s)
    return tools
