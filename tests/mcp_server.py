"""A small MCP tool server for tests, written with the ``mcp`` SDK's server API.

``python mcp_server.py`` serves over stdio; ``python mcp_server.py --http PORT`` serves
streamable HTTP on 127.0.0.1:PORT (path ``/mcp``). Every tool call appends one JSON
line ``{"tool", "args", "meta"}`` to the file named by ``MCP_LOG`` (when set), so a
test sees how often the server was really called and with which ``_meta``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("oao-test-tools")


def _log(tool: str, args: dict[str, Any], ctx: Context | None) -> None:
    path = os.environ.get("MCP_LOG")
    if not path:
        return
    meta = getattr(getattr(ctx, "request_context", None), "meta", None) if ctx is not None else None
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"tool": tool, "args": args, "meta": dict(meta) if meta else None}) + "\n")


@server.tool()
def add(a: int, b: int, ctx: Context) -> int:
    """Add two integers."""
    _log("add", {"a": a, "b": b}, ctx)
    return a + b


@server.tool()
def shout(text: str, ctx: Context) -> str:
    """The text in capitals."""
    _log("shout", {"text": text}, ctx)
    return text.upper()


@server.tool()
def fail(reason: str, ctx: Context) -> str:
    """Always fails with ``reason``."""
    _log("fail", {"reason": reason}, ctx)
    raise ToolError(reason)


@server.tool()
def env_names(ctx: Context) -> list[str]:
    """The names of the server process's environment variables."""
    _log("env_names", {}, ctx)
    return sorted(os.environ)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--http":
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run()
