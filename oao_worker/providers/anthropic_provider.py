"""The ``anthropic`` provider: Anthropic's Messages API through the official ``anthropic``
SDK (or any server speaking it at ``base_url``).

OAO's messages and tools are OpenAI-shaped (``oao_worker/providers/base.py``); this
module translates both ways: ``system`` messages become the ``system`` parameter,
assistant tool calls become ``tool_use`` blocks, ``tool`` messages become
``tool_result`` blocks of a user message (consecutive messages of one role are merged,
as the API wants them alternating), and tool definitions become ``input_schema`` tools
with names the API accepts (:func:`~.base.api_tool_names`). ``tool_choice`` is
``auto`` when tools are offered.

Usage: ``input_tokens`` of a :class:`~.base.Usage` is every input token, i.e.
Anthropic's ``input_tokens`` + ``cache_creation_input_tokens`` +
``cache_read_input_tokens``; the two cache figures are kept apart for pricing.

As for the ``openai`` provider: the SDK's own retries are off (OAO retries steps);
HTTP 429 and 5xx (529 "overloaded" included), timeouts, connection failures, a stream
cut off or ending without ``message_stop``, and error events of type
``overloaded_error`` / ``api_error`` / ``rate_limit_error`` inside a stream are
:class:`~oao_common.errors.TransientError` (with the ``retry-after`` hint); other 4xx
are :class:`~oao_common.errors.PermanentError`. The fleet's trust policy governs
``api_key_env`` and every connection (``GuardedTransport2``); the key never appears in
an error message.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx2

from oao_common.errors import OAOError, PermanentError, TransientError, TrustError
from oao_common.ratelimit import retry_after_from_headers
from oao_common.safe_http import BlockedDestination2, guarded_client2
from oao_common.spec import AnthropicModelSpec
from oao_common.trust import DEFAULT_TRUST, TrustPolicy

from .base import (
    ChunkCallback,
    ModelReply,
    ModelRequest,
    Provider,
    ToolCall,
    Usage,
    api_tool_names,
    attach_usage,
    error_detail,
    estimate_tokens,
)

NO_KEY = "not-needed"
"""The API key sent when ``spec.api_key_env`` is unset (local servers ignore it)."""

STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
"""Anthropic ``stop_reason`` → OAO's (OpenAI's) ``finish_reason``; others pass unchanged."""

TRANSIENT_ERROR_TYPES = frozenset({"overloaded_error", "api_error", "rate_limit_error", "timeout_error"})
"""Error types (``error.type`` of an error body or stream event) worth retrying."""

_CACHE = {"type": "ephemeral"}


@dataclass(slots=True)
class _Block:
    """A content block being assembled from stream events."""

    type: str
    text: str = ""
    id: str = ""
    name: str = ""
    json: str = ""


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def _blocks(content: Any) -> list[dict[str, Any]]:
    """A user message's content as Anthropic blocks (text parts kept, others passed on)."""
    if isinstance(content, list):
        out = []
        for p in content:
            if isinstance(p, dict) and p.get("type") == "text":
                out.append({"type": "text", "text": str(p.get("text", ""))})
            elif isinstance(p, dict):
                out.append(p)
        return out
    text = _text(content)
    return [{"type": "text", "text": text}] if text else []


def to_anthropic(
    messages: list[dict[str, Any]], names: dict[str, str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """OpenAI-shaped ``messages`` → (``system`` text blocks, Anthropic ``messages``);
    ``names`` maps OAO tool names to API names. Raises :class:`PermanentError` for
    tool-call arguments that are not a JSON object."""
    system: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": list(blocks)})

    for m in messages:
        role = m.get("role")
        if role in ("system", "developer"):
            text = _text(m.get("content"))
            if text:
                system.append({"type": "text", "text": text})
        elif role == "assistant":
            blocks = _blocks(m.get("content"))
            for tc in m.get("tool_calls") or []:
                fn = tc.get("function") or {}
                raw = fn.get("arguments") or "{}"
                try:
                    args = json.loads(raw) if isinstance(raw, str) else raw
                except json.JSONDecodeError:
                    args = None
                if not isinstance(args, dict):
                    raise PermanentError(f"tool call {fn.get('name')!r}: arguments are not a JSON object")
                name = str(fn.get("name", ""))
                blocks.append(
                    {"type": "tool_use", "id": tc.get("id", ""), "name": names.get(name, name), "input": args}
                )
            add("assistant", blocks)
        elif role == "tool":
            add(
                "user",
                [
                    {
                        "type": "tool_result",
                        "tool_use_id": str(m.get("tool_call_id", "")),
                        "content": _text(m.get("content")),
                    }
                ],
            )
        else:
            add("user", _blocks(m.get("content")))
    return system, out


def _called_tool_names(messages: list[dict[str, Any]]) -> list[str]:
    return [
        str((c.get("function") or {}).get("name"))
        for m in messages
        for c in m.get("tool_calls") or []
        if (c.get("function") or {}).get("name")
    ]


class AnthropicProvider(Provider):
    """Model ``name`` of a DAG spec, served by Anthropic's Messages API.

    ``spec.base_url`` selects the server (``None``: api.anthropic.com); the API key is
    read from the variable named by ``spec.api_key_env`` at construction (``"not-needed"``
    when unset) and sent as the SDK sends it. Every HTTP call is bounded by
    ``spec.timeout_s`` seconds (connect, and each read). ``trust`` must allow
    ``spec.api_key_env`` and ``spec.base_url`` (else
    :class:`~oao_common.errors.TrustError` here) and every address connected to (else
    ``TrustError`` from :meth:`complete`).
    """

    def __init__(self, name: str, spec: AnthropicModelSpec, trust: TrustPolicy = DEFAULT_TRUST) -> None:
        self.name = name
        self.spec = spec
        where = f"models.{name}"
        trust.check_api_key_env(spec.api_key_env, f"{where}.api_key_env")
        if spec.base_url:
            trust.check_url(spec.base_url, f"{where}.base_url")
        self._api_key = os.environ.get(spec.api_key_env) or NO_KEY
        self._http = guarded_client2(
            trust,
            f"{where}.base_url",
            transport_kw={"limits": httpx2.Limits(max_connections=1000, max_keepalive_connections=100)},
            timeout=spec.timeout_s,
            follow_redirects=True,  # every hop is checked
        )
        self._client = anthropic.AsyncAnthropic(
            api_key=self._api_key,
            base_url=spec.base_url,
            timeout=spec.timeout_s,
            max_retries=0,
            http_client=self._http,
        )

    def _who(self) -> str:
        return f"model {self.spec.model!r} (models.{self.name})"

    def _kwargs(self, request: ModelRequest) -> tuple[dict[str, Any], dict[str, str]]:
        """The SDK arguments of ``request`` and the API → OAO tool-name map."""
        offered = [str(t.get("function", {}).get("name", "")) for t in request.tools]
        names = api_tool_names(offered + _called_tool_names(request.messages))
        system, messages = to_anthropic(request.messages, names)
        kwargs: dict[str, Any] = {
            "model": self.spec.model,
            "messages": messages,
            "max_tokens": request.max_tokens or self.spec.max_tokens,
        }
        if system:
            if self.spec.cache_prompt:
                system[-1] = {**system[-1], "cache_control": _CACHE}
            kwargs["system"] = system
        if request.tools:
            tools = []
            for t in request.tools:
                fn = t.get("function") or {}
                tools.append(
                    {
                        "name": names.get(str(fn.get("name", "")), str(fn.get("name", ""))),
                        "description": str(fn.get("description") or ""),
                        "input_schema": fn.get("parameters") or {"type": "object", "properties": {}},
                    }
                )
            if self.spec.cache_prompt:
                tools[-1]["cache_control"] = _CACHE
            kwargs["tools"] = tools
            kwargs["tool_choice"] = {"type": "auto"}
        temperature = request.temperature if request.temperature is not None else self.spec.temperature
        if temperature is not None:
            # Recent SDKs have no sampling parameters; servers and models that take one
            # read it from the body.
            kwargs["extra_body"] = {"temperature": temperature}
        return kwargs, {api: oao for oao, api in names.items()}

    async def complete(self, request: ModelRequest, on_chunk: ChunkCallback) -> ModelReply:
        """Run one Messages call of ``spec.model`` over ``request.messages``.

        Streams when ``spec.stream`` is true: ``on_chunk(text_delta, output_tokens)`` for
        every text delta, with ``ceil(chars / 4)`` of the output so far (the API reports
        output tokens only at the end); if ``on_chunk`` raises, the stream is closed at
        once and the exception propagates unchanged. Without streaming ``on_chunk`` is
        called once with the whole text.

        Returns a :class:`ModelReply`: text, tool calls (OAO tool names, decoded
        ``args``), usage with cache tokens, the model the server named, and the finish
        reason mapped by :data:`STOP_REASONS`. Raises as the module docstring says; an
        error after the model started answering carries the usage consumed so far.
        """
        kwargs, back = self._kwargs(request)
        input_estimate = await self.count_input_tokens(request)
        if self.spec.stream:
            reply = await self._complete_stream(kwargs, on_chunk, input_estimate)
        else:
            reply = await self._complete_once(kwargs, on_chunk)
        for call in reply.tool_calls:
            call.name = back.get(call.name, call.name)
        return reply

    @staticmethod
    def _usage(u: Any, input_fallback: int = 0) -> Usage:
        plain = getattr(u, "input_tokens", None)
        write = int(getattr(u, "cache_creation_input_tokens", None) or 0)
        read = int(getattr(u, "cache_read_input_tokens", None) or 0)
        total_in = (input_fallback if plain is None else int(plain)) + write + read
        return Usage(total_in, int(getattr(u, "output_tokens", None) or 0), read, write)

    async def _complete_stream(
        self, kwargs: dict[str, Any], on_chunk: ChunkCallback, input_estimate: int
    ) -> ModelReply:
        try:
            stream = await self._client.messages.create(stream=True, **kwargs)
        except anthropic.AnthropicError as exc:
            raise self._map_error(exc) from None
        blocks: dict[int, _Block] = {}
        usage: Usage | None = None
        model = ""
        stop_reason: str | None = None
        stopped = False
        events = 0
        text = ""
        try:
            async with stream:
                while True:
                    try:
                        event = await stream.__anext__()
                    except StopAsyncIteration:
                        break
                    except anthropic.AnthropicError as exc:
                        raise self._map_error(exc, events=events) from None
                    except httpx2.TimeoutException:  # the SDK lets read errors of a stream through
                        raise TransientError(
                            f"{self._who()}: the stream stalled after {events} events: "
                            f"no data for {self.spec.timeout_s}s"
                        ) from None
                    except httpx2.TransportError as exc:
                        raise TransientError(
                            self._redact(
                                f"{self._who()}: the stream was cut off after {events} events: "
                                f"{type(exc).__name__}: {exc}"
                            )
                        ) from None
                    events += 1
                    kind = event.type
                    if kind == "message_start":
                        model = event.message.model or model
                        usage = self._usage(event.message.usage, input_estimate)
                    elif kind == "content_block_start":
                        cb = event.content_block
                        blocks[event.index] = _Block(
                            cb.type,
                            text=getattr(cb, "text", "") or "",
                            id=getattr(cb, "id", "") or "",
                            name=getattr(cb, "name", "") or "",
                        )
                    elif kind == "content_block_delta":
                        block = blocks.setdefault(event.index, _Block("text"))
                        delta = event.delta
                        if delta.type == "text_delta":
                            block.text += delta.text
                            text += delta.text
                            await on_chunk(delta.text, self._out_estimate(text, blocks))
                        elif delta.type == "input_json_delta":
                            block.json += delta.partial_json
                    elif kind == "message_delta":
                        stop_reason = event.delta.stop_reason or stop_reason
                        u = event.usage
                        if usage is None:
                            usage = self._usage(u, input_estimate)
                        else:
                            usage.output_tokens = int(u.output_tokens or usage.output_tokens)
                            if getattr(u, "input_tokens", None) is not None:
                                usage = self._usage(u, input_estimate)
                    elif kind == "message_stop":
                        stopped = True
            if not stopped:
                raise TransientError(
                    f"{self._who()}: the stream ended after {events} events without message_stop: "
                    "the reply is incomplete"
                )
            calls = [self._decode_call(b, i) for i, b in sorted(blocks.items()) if b.type == "tool_use"]
        except BaseException as exc:
            if events:  # the prompt was taken and (some) output produced: that was paid for
                partial = usage or Usage(input_estimate, 0)
                partial.output_tokens = max(partial.output_tokens, self._out_estimate(text, blocks))
                attach_usage(exc, partial)
            raise
        assert usage is not None
        return ModelReply(
            content="".join(b.text for _, b in sorted(blocks.items()) if b.type == "text"),
            tool_calls=calls,
            usage=usage,
            model=model or self.spec.model,
            finish_reason=STOP_REASONS.get(stop_reason or "", stop_reason or "stop"),
        )

    @staticmethod
    def _out_estimate(text: str, blocks: dict[int, _Block]) -> int:
        return estimate_tokens(text) + sum(estimate_tokens(b.name + b.json) for b in blocks.values())

    async def _complete_once(self, kwargs: dict[str, Any], on_chunk: ChunkCallback) -> ModelReply:
        try:
            resp = await self._client.messages.create(stream=False, **kwargs)
        except anthropic.AnthropicError as exc:
            raise self._map_error(exc) from None
        usage = self._usage(resp.usage)
        text = ""
        calls: list[ToolCall] = []
        try:
            for i, b in enumerate(resp.content):
                if b.type == "text":
                    text += b.text
                elif b.type == "tool_use":
                    calls.append(self._decode_call(_Block("tool_use", id=b.id, name=b.name), i, b.input))
            await on_chunk(text, usage.output_tokens)
        except BaseException as exc:
            attach_usage(exc, usage)
            raise
        return ModelReply(
            content=text,
            tool_calls=calls,
            usage=usage,
            model=resp.model or self.spec.model,
            finish_reason=STOP_REASONS.get(resp.stop_reason or "", resp.stop_reason or "stop"),
        )

    def _decode_call(self, block: _Block, index: int, args: Any = None) -> ToolCall:
        """A finished ``tool_use`` block; its input must be a JSON object."""
        where = f"{self._who()} tool call {block.name!r}"
        if args is None:
            try:
                args = json.loads(block.json) if block.json.strip() else {}
            except json.JSONDecodeError as exc:
                raise PermanentError(
                    f"{where}: input is not valid JSON ({exc.msg} at char {exc.pos}): {block.json[:200]!r}"
                ) from None
        if not isinstance(args, dict):
            raise PermanentError(f"{where}: input must be a JSON object, got {type(args).__name__}")
        if not block.name:
            raise PermanentError(f"{where}: tool call #{index} has no name")
        return ToolCall(id=block.id or f"toolu_{index}", name=block.name, args=args)

    def _redact(self, text: str) -> str:
        if self._api_key != NO_KEY and len(self._api_key) >= 4:
            text = text.replace(self._api_key, "***")
        return text

    @staticmethod
    def _error_type(body: Any) -> str:
        if isinstance(body, dict):
            err = body.get("error")
            if isinstance(err, dict):
                return str(err.get("type") or "")
            return str(body.get("type") or "")
        return ""

    def _map_error(self, exc: anthropic.AnthropicError, events: int | None = None) -> OAOError:
        """The OAO error for an SDK error (never containing the API key). ``events`` is set
        for an error while reading a stream: how many events had arrived."""
        who = self._who()
        if isinstance(exc, anthropic.APIStatusError):
            status = exc.status_code
            detail = self._redact(error_detail(exc.body))
            if events is not None or status == 200:  # an error event inside the stream
                msg = f"{who}: error in stream: {detail or exc.message}"
                if self._error_type(exc.body) in TRANSIENT_ERROR_TYPES:
                    return TransientError(self._redact(msg))
                return PermanentError(self._redact(msg))
            msg = f"{who}: HTTP {status}" + (f": {detail}" if detail else "")
            if status == 429 or status >= 500:
                return TransientError(msg, retry_after_s=retry_after_from_headers(dict(exc.response.headers)))
            return PermanentError(msg)
        if isinstance(exc, anthropic.APITimeoutError):
            if events is not None:
                return TransientError(
                    f"{who}: the stream stalled after {events} events: no data for {self.spec.timeout_s}s"
                )
            return TransientError(f"{who}: request timed out after {self.spec.timeout_s}s")
        if isinstance(exc, anthropic.APIConnectionError) and isinstance(exc.__cause__, BlockedDestination2):
            return TrustError(self._redact(f"{who}: {exc.__cause__}"))
        if isinstance(exc, anthropic.APIConnectionError):
            cause = exc.__cause__
            reason = f": {type(cause).__name__}: {cause}" if cause is not None else ""
            if events is not None:
                return TransientError(
                    self._redact(f"{who}: the stream was cut off after {events} events{reason}")
                )
            where = self.spec.base_url or "the default Anthropic endpoint"
            return TransientError(self._redact(f"{who}: cannot connect to {where}{reason}"))
        if isinstance(exc, anthropic.APIResponseValidationError):
            return PermanentError(self._redact(f"{who}: invalid response: {exc.message}"))
        return PermanentError(self._redact(f"{who}: {type(exc).__name__}: {exc}"))

    async def aclose(self) -> None:
        """Close the HTTP client and its pooled connections."""
        await self._client.close()
        await self._http.aclose()
