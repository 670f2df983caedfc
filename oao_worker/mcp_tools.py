"""Tools served by Model Context Protocol servers, through the official ``mcp`` SDK.

A spec's ``tools: {fs: {mcp: {command: [...]}}}`` (a child process speaking MCP over
stdio) or ``{mcp: {url: https://...}}`` (streamable HTTP) makes every tool the server
lists an OAO tool named ``fs.<tool>``. Such a tool is called like any other, through
``ctx.tool`` and so the step loop (``oao_worker/context.py``): allow- and deny-lists,
budgets, rate limits and circuit breakers, a started marker, the idempotency key and a
ledger record whose result a replay or a resumed node serves without calling the server.

Each call sends the step's idempotency key (and run, node and step) in the request's
``_meta`` (``oao/idempotency_key``, ``oao/run_id``, ``oao/node_id``, ``oao/step``), so
a server may deduplicate a repeated side effect.

A result is the call's ``structuredContent`` if the server sent one, else its text
(one text block: the string; several: a list of strings), else its content blocks as
JSON. A result with ``isError`` raises :class:`MCPToolError`, which ``try_tool`` turns
into the error text the ``llm`` agent hands back to the model. A broken connection (the
process died, the HTTP server went away) or a call past ``timeout_s`` is a
:class:`~oao_common.errors.TransientError`; the next call starts the server again.

Trust (docs/security.md): a stdio ``command`` must pass
:meth:`~oao_common.trust.TrustPolicy.check_mcp_command` before anything is started, the
child gets a minimal environment (the SDK's: ``PATH``, ``HOME``, ``USER``... plus the
spec's ``env``, never the worker's own variables such as ``OAO_REDIS_URL``); a ``url``
passes the network rules and every connection goes through
:class:`~oao_common.safe_http.GuardedTransport2`; ``api_key_env`` passes the API-key
rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass
from typing import Any, cast

import httpx2
from mcp import types
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from oao_common.errors import PermanentError, TransientError, TrustError
from oao_common.log import get_logger
from oao_common.safe_http import BlockedDestination2, guarded_client2
from oao_common.spec import MCPServerSpec, ToolSpec
from oao_common.trust import DEFAULT_TRUST, TrustPolicy

from .tools import RunSync, Tool, ToolCallInfo

META_PREFIX = "oao/"
"""Prefix of the ``_meta`` keys OAO sends with a call (MCP's reverse-DNS-style prefix)."""


class MCPToolError(RuntimeError):
    """The MCP server answered a call with ``isError``: the tool's own failure (its
    text is the message). An ordinary exception: ``try_tool`` records it as the step's
    result and the ``llm`` agent shows it to the model."""


def _unwrap(exc: BaseException) -> BaseException:
    """The first leaf of an exception group (anyio task groups wrap errors)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


class MCPConnection:
    """One MCP server of one run on one worker.

    A background task owns the transport and the ``ClientSession`` (the SDK's anyio
    task groups must be entered and left by one task); calls from node tasks go through
    the session. :meth:`start` connects, initializes and lists the tools (paginated);
    :meth:`aclose` stops the task, which closes the session and stops the process.
    """

    def __init__(self, name: str, spec: MCPServerSpec, trust: TrustPolicy = DEFAULT_TRUST) -> None:
        self.name = name
        self.spec = spec
        self.trust = trust
        self.where = f"tools.{name}.mcp"
        if spec.command is not None:
            trust.check_mcp_command(spec.command, f"{self.where}.command")
        if spec.url is not None:
            trust.check_url(spec.url, f"{self.where}.url")
        self._headers = dict(spec.headers)
        if spec.api_key_env is not None:
            trust.check_api_key_env(spec.api_key_env, f"{self.where}.api_key_env")
            key = os.environ.get(spec.api_key_env)
            if key:
                self._headers["Authorization"] = f"Bearer {key}"
        self._session: ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None
        self._lock = asyncio.Lock()
        self.listed: list[types.Tool] = []
        self.log = get_logger(component="mcp", server=name)

    def _what(self) -> str:
        if self.spec.command is not None:
            return f"MCP server {self.name!r} ({self.spec.command[0]})"
        return f"MCP server {self.name!r} ({self.spec.url})"

    async def start(self) -> list[types.Tool]:
        """Start (or restart) the server and list its tools; raises
        :class:`TransientError` when it cannot be started or reached within
        ``timeout_s`` seconds, :class:`~oao_common.errors.TrustError` for a refused
        address."""
        async with self._lock:
            if self._session is not None:
                return self.listed
            await self._stop_task()
            loop = asyncio.get_running_loop()
            ready: asyncio.Future[list[types.Tool]] = loop.create_future()
            self._stop = asyncio.Event()
            self._task = loop.create_task(self._run(ready, self._stop), name=f"mcp:{self.name}")
            try:
                async with asyncio.timeout(self.spec.timeout_s):
                    self.listed = await asyncio.shield(ready)
            except TimeoutError:
                await self._stop_task()
                raise TransientError(
                    f"{self._what()}: not ready within {self.spec.timeout_s}s (start, initialize, list tools)"
                ) from None
            except (TrustError, PermanentError):
                await self._stop_task()
                raise
            except Exception as e:
                await self._stop_task()
                raise TransientError(f"{self._what()}: cannot start: {type(e).__name__}: {e}") from None
            return self.listed

    async def _run(self, ready: asyncio.Future[list[types.Tool]], stop: asyncio.Event) -> None:
        spec = self.spec
        try:
            async with contextlib.AsyncExitStack() as stack:
                if spec.command is not None:
                    params = StdioServerParameters(
                        command=spec.command[0],
                        args=spec.command[1:],
                        env=dict(spec.env) or None,
                        cwd=spec.cwd,
                    )
                    read, write = await stack.enter_async_context(stdio_client(params))
                else:
                    assert spec.url is not None
                    http = guarded_client2(
                        self.trust,
                        f"{self.where}.url",
                        headers=self._headers,
                        timeout=httpx2.Timeout(spec.timeout_s, read=max(spec.timeout_s, 300.0)),
                    )
                    await stack.enter_async_context(http)
                    read, write = await stack.enter_async_context(
                        streamable_http_client(spec.url, http_client=http)
                    )
                session = await stack.enter_async_context(
                    ClientSession(read, write, read_timeout_seconds=spec.timeout_s)
                )
                await session.initialize()
                listed: list[types.Tool] = []
                cursor: str | None = None
                while True:
                    page = await session.list_tools(
                        params=types.PaginatedRequestParams(cursor=cursor) if cursor else None
                    )
                    listed.extend(page.tools)
                    cursor = page.next_cursor
                    if not cursor:
                        break
                self._session = session
                if not ready.done():
                    ready.set_result(listed)
                await stop.wait()
        except BaseException as e:
            leaf = _unwrap(e)
            if isinstance(leaf, BlockedDestination2) or isinstance(leaf.__cause__, BlockedDestination2):
                leaf = TrustError(
                    f"{self._what()}: {leaf if isinstance(leaf, BlockedDestination2) else leaf.__cause__}"
                )
            if not ready.done():
                ready.set_exception(leaf if isinstance(leaf, Exception) else TransientError(str(leaf)))
            elif not isinstance(leaf, asyncio.CancelledError):
                self.log.warning("mcp.connection_lost", error=f"{type(leaf).__name__}: {leaf}")
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            self._session = None

    async def call(self, tool: str, args: dict[str, Any], meta: dict[str, Any]) -> types.CallToolResult:
        """Call ``tool`` of the server with ``args`` (started first if needed). Raises
        :class:`TransientError` for a broken connection or a call past ``timeout_s``."""
        await self.start()
        session = self._session
        if session is None:
            raise TransientError(f"{self._what()}: the connection closed")
        try:
            async with asyncio.timeout(self.spec.timeout_s + 1):
                result = await session.call_tool(
                    tool, args, read_timeout_seconds=self.spec.timeout_s, meta=cast(Any, meta)
                )
        except TimeoutError:
            raise TransientError(
                f"{self._what()}: tool {tool!r} did not answer within {self.spec.timeout_s}s"
            ) from None
        except Exception as e:
            leaf = _unwrap(e)
            if self._task is None or self._task.done() or self._session is None:
                raise TransientError(
                    f"{self._what()}: the connection broke during tool {tool!r}: "
                    f"{type(leaf).__name__}: {leaf}"
                ) from None
            raise TransientError(f"{self._what()}: tool {tool!r}: {type(leaf).__name__}: {leaf}") from None
        if not isinstance(result, types.CallToolResult):  # pragma: no cover - extensions OAO never asks for
            raise PermanentError(f"{self._what()}: tool {tool!r} returned {type(result).__name__}")
        return result

    async def _stop_task(self) -> None:
        task, self._task = self._task, None
        if self._stop is not None:
            self._stop.set()
        if task is not None and not task.done():
            try:
                async with asyncio.timeout(10):
                    await asyncio.shield(task)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            except BaseException:
                pass
        self._session = None

    async def aclose(self) -> None:
        """Close the session and stop the server (a stdio process is terminated)."""
        async with self._lock:
            await self._stop_task()


def result_value(result: types.CallToolResult, listed: types.Tool | None = None) -> Any:
    """The JSON value of a successful call (see the module docstring). A structured
    result ``{"result": x}`` of a tool whose output schema has that one property (how
    MCP servers wrap a value that is not an object) is ``x``."""
    sc = result.structured_content
    if sc is not None:
        props = ((listed.output_schema if listed is not None else None) or {}).get("properties")
        if isinstance(props, dict) and set(props) == {"result"} and set(sc) == {"result"}:
            return sc["result"]
        return sc
    blocks = list(result.content or [])
    if blocks and all(isinstance(b, types.TextContent) for b in blocks):
        texts = [b.text for b in blocks if isinstance(b, types.TextContent)]
        return texts[0] if len(texts) == 1 else texts
    return [b.model_dump(mode="json", by_alias=True, exclude_none=True) for b in blocks]


def _error_text(result: types.CallToolResult) -> str:
    texts = [b.text for b in result.content or [] if isinstance(b, types.TextContent)]
    return "; ".join(texts) or "the tool reported an error"


@dataclass(slots=True)
class MCPTool(Tool):
    """Tool ``remote`` of an MCP server, as the OAO tool ``name`` (``<server>.<remote>``)."""

    connection: MCPConnection | None = None
    remote: str = ""
    listed: types.Tool | None = None

    @property
    def description(self) -> str:
        t = self.listed
        return (t.description or t.title or self.name) if t is not None else self.name

    def schema(self) -> dict[str, Any]:
        """The OpenAI-style function description, its parameters the server's input schema."""
        params = dict(self.listed.input_schema) if self.listed is not None else {}
        params.setdefault("type", "object")
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": params},
        }

    async def call(self, args: dict[str, Any], info: ToolCallInfo, run_sync: RunSync | None = None) -> Any:
        """Call the server's tool with ``args``; the value of :func:`result_value`, or
        :class:`MCPToolError` for an ``isError`` result."""
        assert self.connection is not None
        meta = {
            f"{META_PREFIX}idempotency_key": info.key,
            f"{META_PREFIX}run_id": info.run_id,
            f"{META_PREFIX}node_id": info.node_id,
            f"{META_PREFIX}step": info.seq,
        }
        result = await self.connection.call(self.remote, args, meta)
        if result.is_error:
            raise MCPToolError(f"{self.name}: {_error_text(result)}")
        return result_value(result, self.listed)


def _no_local_call(**_kw: Any) -> Any:  # pragma: no cover - MCPTool.call never uses func
    raise PermanentError("an MCP tool runs on its server")


async def connect_mcp_tools(
    specs: dict[str, ToolSpec], trust: TrustPolicy = DEFAULT_TRUST
) -> tuple[dict[str, Tool], list[MCPConnection]]:
    """Start every MCP server of a spec's ``tools`` (concurrently) and return its tools,
    named ``<entry>.<tool>``, with the connections to close. Raises what
    :meth:`MCPConnection.start` raises (after closing the connections already made), and
    :class:`PermanentError` when ``mcp.tools`` names a tool the server does not list."""
    servers = {n: s for n, s in specs.items() if s.mcp is not None}
    if not servers:
        return {}, []
    conns = [MCPConnection(n, s.mcp, trust) for n, s in servers.items() if s.mcp is not None]
    results = await asyncio.gather(*(c.start() for c in conns), return_exceptions=True)
    failed = next((r for r in results if isinstance(r, BaseException)), None)
    if failed is not None:
        for c in conns:
            await c.aclose()
        raise failed
    tools: dict[str, Tool] = {}
    for conn in conns:
        spec = specs[conn.name]
        wanted = conn.spec.tools
        by_name = {t.name: t for t in conn.listed}
        if wanted is not None:
            missing = sorted(set(wanted) - set(by_name))
            if missing:
                for c in conns:
                    await c.aclose()
                raise PermanentError(
                    f"tools.{conn.name}.mcp.tools: the server lists no tool {', '.join(map(repr, missing))} "
                    f"(it has: {', '.join(sorted(by_name)) or 'none'})"
                )
        for remote, listed in sorted(by_name.items()):
            if wanted is not None and remote not in wanted:
                continue
            name = f"{conn.name}.{remote}"
            tools[name] = MCPTool(name, _no_local_call, spec, connection=conn, remote=remote, listed=listed)
    return tools, conns
