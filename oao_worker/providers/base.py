"""The model-provider interface: one chat completion, streamed, with tool calls.

Messages and tools use the OpenAI chat-completions shapes (the de-facto standard):
``{"role": "user", "content": "..."}``, ``{"type": "function", "function": {...}}``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
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
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(slots=True)
class ModelReply:
    """A finished completion. ``to_dict`` / ``from_dict`` round-trip through the ledger."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    model: str = ""
    finish_reason: str = "stop"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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
            import json

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
        (network, timeout, 429, 5xx) and ``PermanentError`` for the others."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections (optional)."""
