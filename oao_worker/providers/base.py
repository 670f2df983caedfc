"""The model-provider interface: one chat completion, streamed, with tool calls.

Messages and tools use the OpenAI chat-completions shapes (the de-facto standard):
``{"role": "user", "content": "..."}``, ``{"type": "function", "function": {...}}``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

ChunkCallback = Callable[[str, int], Awaitable[None]]
"""``await on_chunk(text_delta, output_tokens_so_far)`` for every streamed piece; an
exception raised in it must close the stream and propagate unchanged (it is how budgets
stop a model mid-stream). It may await (e.g. to extend a budget reservation)."""


def estimate_tokens(text: str) -> int:
    """Rough token count: ceil(characters / 4), OpenAI's rule of thumb for English."""
    return math.ceil(len(text) / 4) if text else 0


def estimate_message_tokens(messages: list[dict[str, Any]]) -> int:
    """Rough input tokens of a message list (content plus 4 tokens of framing each)."""
    total = 0
    for m in messages:
        total += 4 + estimate_tokens(str(m.get("content") or ""))
        for tc in m.get("tool_calls") or []:
            total += estimate_tokens(str(tc))
    return total


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    args: dict[str, Any]


@dataclass(slots=True)
class Usage:
    """Tokens of one model call. ``input_tokens`` counts every input token, cached ones
    included; ``cache_read_tokens`` and ``cache_write_tokens`` say how many of them were
    read from or written to the provider's prompt cache (priced apart, see
    :class:`~oao_common.pricing.Price`)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens

    def to_dict(self) -> dict[str, int]:
        """The ledger form: cache fields only when non-zero (older records have none)."""
        d = {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}
        if self.cache_read_tokens:
            d["cache_read_tokens"] = self.cache_read_tokens
        if self.cache_write_tokens:
            d["cache_write_tokens"] = self.cache_write_tokens
        return d


@dataclass(slots=True)
class ModelReply:
    """A finished completion. ``to_dict`` / ``from_dict`` round-trip through the ledger."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    model: str = ""
    finish_reason: str = "stop"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["usage"] = self.usage.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelReply:
        return cls(
            content=d.get("content") or "",
            tool_calls=[ToolCall(**t) for t in d.get("tool_calls") or []],
            usage=Usage(**(d.get("usage") or {})),
            model=d.get("model", ""),
            finish_reason=d.get("finish_reason", "stop"),
        )

    def assistant_message(self) -> dict[str, Any]:
        """This reply as an assistant message for the next turn."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = [
                {
                    "id": t.id,
                    "type": "function",
                    "function": {"name": t.name, "arguments": json.dumps(t.args, sort_keys=True)},
                }
                for t in self.tool_calls
            ]
        return msg


@dataclass(slots=True)
class ModelRequest:
    """What an agent asks a model. ``context`` carries template variables for the
    scripted provider (task, inputs, nodes, node_id, call_index) and is not hashed."""

    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] = field(default_factory=list)
    max_tokens: int | None = None
    temperature: float | None = None
    context: dict[str, Any] = field(default_factory=dict)

    def hash_view(self) -> dict[str, Any]:
        """The part of the request that identifies it for replay (docs/guarantees.md, promise 4)."""
        return {
            "model": self.model,
            "messages": self.messages,
            "tools": sorted(t.get("function", {}).get("name", "") for t in self.tools),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }


class Provider(ABC):
    """A model backend. Implementations must call ``on_chunk`` for every streamed piece
    of content and close the stream when it raises."""

    @abstractmethod
    async def complete(self, request: ModelRequest, on_chunk: ChunkCallback) -> ModelReply:
        """Run one completion. Raises ``TransientError`` for retriable failures
        (network, timeout, 429, 5xx, a stream cut short) and ``PermanentError`` for the
        others. An exception raised after the model started answering carries what the
        call consumed (:func:`attach_usage`), so it is recorded even though the call
        failed."""

    async def count_input_tokens(self, request: ModelRequest) -> int:
        """Input tokens ``request`` will cost, for budget checks and reservations before
        the call: ``ceil(chars / 4)`` per message plus framing (:func:`estimate_message_tokens`)
        unless the provider has a tokenizer."""
        return estimate_message_tokens(request.messages)

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections (optional)."""


# ------------------------------------------------------------------ shared helpers


def attach_usage(exc: BaseException, usage: Usage) -> BaseException:
    """Mark ``exc`` (raised by a call that had started consuming tokens) with what the
    call consumed so far; returns ``exc``. The step loop records it (docs/governance.md)."""
    exc.oao_usage = usage  # type: ignore[attr-defined]
    return exc


def consumed_usage(exc: BaseException) -> Usage | None:
    """The usage :func:`attach_usage` put on ``exc``, else ``None``."""
    u = getattr(exc, "oao_usage", None)
    return u if isinstance(u, Usage) else None


API_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
"""What OpenAI's and Anthropic's APIs accept as a tool (function) name."""


def api_tool_names(names: Iterable[str]) -> dict[str, str]:
    """OAO tool name → a name the model APIs accept (:data:`API_TOOL_NAME`), one-to-one.

    A valid name is kept. Others (``notes.search``, MCP tools ``fs.read_file``) have
    each character outside ``[a-zA-Z0-9_-]`` replaced by ``_``; a name that is then
    empty, longer than 64 characters, or equal to another tool's API name gets the
    first 8 hex digits of the sha256 of the OAO name as a suffix (cut to fit). The
    mapping depends only on the set of names, not their order.
    """
    unique = sorted(set(names))
    out: dict[str, str] = {}
    taken = {n for n in unique if API_TOOL_NAME.match(n)}
    for n in unique:
        if API_TOOL_NAME.match(n):
            out[n] = n
    for n in unique:
        if n in out:
            continue
        cand = re.sub(r"[^a-zA-Z0-9_-]", "_", n)
        if not cand or len(cand) > 64 or cand in taken:
            suffix = hashlib.sha256(n.encode()).hexdigest()[:8]
            cand = f"{cand[: 64 - 9]}_{suffix}" if cand else f"tool_{suffix}"
        taken.add(cand)
        out[n] = cand
    return out


def error_detail(body: Any, limit: int = 300) -> str:
    """The human-readable message of an HTTP error body: ``error.message`` (OpenAI,
    Anthropic, LiteLLM), ``error`` as text, ``message``, ``detail`` (FastAPI servers;
    a list of validation errors is joined), ``msg``, else the body as compact JSON.
    Cut to ``limit`` characters; ``""`` for an empty body."""
    if body is None or body == "":
        return ""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return body.strip()[:limit]
    text = ""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            text = str(err.get("message") or err.get("detail") or "")
        elif isinstance(err, str):
            text = err
        if not text:
            for key in ("message", "detail", "msg"):
                v = body.get(key)
                if isinstance(v, list):
                    v = "; ".join(str(i.get("msg", i)) if isinstance(i, dict) else str(i) for i in v)
                if v:
                    text = str(v)
                    break
    if not text:
        text = json.dumps(body, separators=(",", ":"), default=str)
    return text.strip()[:limit]
