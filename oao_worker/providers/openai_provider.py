"""The ``openai`` provider: any OpenAI-compatible chat-completions endpoint (OpenAI,
vLLM, Ollama, LM Studio, llama.cpp server) through the official ``openai`` SDK.

The SDK's own retries are off (``max_retries=0``): OAO retries a node's step itself,
driven by :class:`~oao_common.errors.TransientError` and its ``retry_after_s`` hint.

The fleet's :class:`~oao_common.trust.TrustPolicy` decides which ``api_key_env`` may be
read and where the client may connect: every connection (redirects too) goes through
:class:`~oao_common.safe_http.GuardedTransport`, which checks the resolved address.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, cast

import httpx
import openai

from oao_common.errors import OAOError, PermanentError, TransientError, TrustError
from oao_common.ratelimit import retry_after_from_headers
from oao_common.redact import register_secret
from oao_common.safe_http import BlockedDestination, guarded_client
from oao_common.spec import OpenAIModelSpec
from oao_common.trust import DEFAULT_TRUST, TrustPolicy

from .base import (
    ChunkCallback,
    ModelReply,
    ModelRequest,
    Provider,
    ToolCall,
    Usage,
    estimate_message_tokens,
    estimate_tokens,
)

NO_KEY = "not-needed"
"""The API key sent when ``spec.api_key_env`` is unset (local servers ignore it)."""


@dataclass(slots=True)
class _PartialCall:
    """A tool call being assembled from stream deltas."""

    id: str = ""
    name: str = ""
    arguments: str = ""


def _retry_after(headers: Any) -> float | None:
    """Seconds a 429 / 5xx asks us to wait (``Retry-After``, ``retry-after-ms`` or
    ``x-ratelimit-reset-*``), via the rate limiter's parser, so one parser serves both."""
    return retry_after_from_headers(dict(headers)) if headers is not None else None


class OpenAIProvider(Provider):
    """Model ``name`` of a DAG spec, served by an OpenAI-compatible endpoint.

    ``spec.base_url`` selects the server (``None``: api.openai.com or
    ``OPENAI_BASE_URL``); the API key is read from the environment variable named by
    ``spec.api_key_env`` at construction, or ``"not-needed"`` when it is unset. Every
    HTTP call is bounded by ``spec.timeout_s`` seconds (connect, and each read).
    The key never appears in an error message raised by this class.

    ``trust`` must allow ``spec.api_key_env`` and ``spec.base_url`` (else
    :class:`~oao_common.errors.TrustError` here, before the variable is read) and
    every address the client connects to (else ``TrustError`` from ``complete``).
    """

    def __init__(self, name: str, spec: OpenAIModelSpec, trust: TrustPolicy = DEFAULT_TRUST) -> None:
        self.name = name
        self.spec = spec
        where = f"models.{name}"
        trust.check_api_key_env(spec.api_key_env, f"{where}.api_key_env")
        if spec.base_url:
            trust.check_url(spec.base_url, f"{where}.base_url")
        self._api_key = os.environ.get(spec.api_key_env) or NO_KEY
        if self._api_key != NO_KEY:
            register_secret(self._api_key)  # redacted from every log, error and span
        self._http = guarded_client(
            trust,
            f"{where}.base_url",
            transport_kw={"limits": httpx.Limits(max_connections=1000, max_keepalive_connections=100)},
            timeout=spec.timeout_s,
            follow_redirects=True,  # as the SDK's own client; every hop is checked
        )
        self._client = openai.AsyncOpenAI(
            api_key=self._api_key,
            base_url=spec.base_url,
            timeout=spec.timeout_s,
            max_retries=0,
            # openai 1.x types this as httpx.AsyncClient, 2.x+ as httpx2's; both accept httpx's.
            http_client=cast(Any, self._http),
        )

    async def complete(self, request: ModelRequest, on_chunk: ChunkCallback) -> ModelReply:
        """Run one chat completion of ``spec.model`` over ``request.messages``.

        Streams when ``spec.stream`` is true: ``on_chunk(text_delta, output_tokens)`` is
        called for every content delta, with the output tokens so far (the server's
        ``completion_tokens`` if the chunk reports usage, else ``ceil(chars / 4)`` of
        the content so far). If ``on_chunk`` raises, the HTTP stream is closed at once
        and the exception propagates unchanged. Without streaming ``on_chunk`` is
        called once with the whole content.

        Returns a :class:`ModelReply` whose ``usage`` is the server's
        ``prompt_tokens``/``completion_tokens`` when reported (else estimates), whose
        ``model`` is the model name the server returned (else ``spec.model``) and whose
        tool calls carry decoded ``args`` dicts.

        Raises :class:`TransientError` on connection failure (also mid-stream), timeout,
        HTTP 429 or 5xx, or an error event inside the stream (``retry_after_s`` from the
        ``retry-after-ms``/``Retry-After`` header, in seconds, if sent);
        :class:`PermanentError` on other HTTP 4xx errors, on tool-call arguments that
        are not a JSON object (naming the tool) and on non-function tool calls;
        :class:`~oao_common.errors.TrustError` (permanent) when the trust policy refuses
        an address the server's name resolves to (or a redirect leads to).
        Whatever ``on_chunk`` raises propagates unchanged.
        """
        kwargs: dict[str, Any] = {"model": self.spec.model, "messages": request.messages}
        if request.tools:
            kwargs["tools"] = request.tools
        if request.max_tokens is not None:
            kwargs["max_tokens"] = request.max_tokens
        temperature = request.temperature if request.temperature is not None else self.spec.temperature
        if temperature is not None:
            kwargs["temperature"] = temperature
        if self.spec.stream:
            return await self._complete_stream(request, kwargs, on_chunk)
        return await self._complete_once(request, kwargs, on_chunk)

    async def _complete_stream(
        self, request: ModelRequest, kwargs: dict[str, Any], on_chunk: ChunkCallback
    ) -> ModelReply:
        try:
            stream = await self._client.chat.completions.create(
                stream=True, stream_options={"include_usage": True}, **kwargs
            )
        except openai.OpenAIError as exc:
            raise self._map_error(exc) from None
        content = ""
        calls: dict[int, _PartialCall] = {}
        model = ""
        finish_reason: str | None = None
        usage: Usage | None = None
        async with stream:
            while True:
                # Only the SDK's reads are mapped; on_chunk's exceptions pass unchanged
                # (and ``async with`` closes the stream on the way out).
                try:
                    chunk = await stream.__anext__()
                except StopAsyncIteration:
                    break
                except openai.OpenAIError as exc:
                    raise self._map_error(exc) from None
                model = chunk.model or model
                reported: int | None = None
                if chunk.usage is not None:
                    usage = Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                    reported = chunk.usage.completion_tokens
                delta_text = ""
                for choice in chunk.choices:
                    if choice.index != 0:
                        continue
                    if choice.finish_reason:
                        finish_reason = choice.finish_reason
                    delta = choice.delta
                    if delta.content:
                        delta_text += delta.content
                    for tc in delta.tool_calls or []:
                        part = calls.setdefault(tc.index, _PartialCall())
                        if tc.id:
                            part.id = tc.id
                        if tc.function is not None:
                            if tc.function.name:
                                part.name = tc.function.name
                            if tc.function.arguments:
                                part.arguments += tc.function.arguments
                if delta_text:
                    content += delta_text
                    await on_chunk(delta_text, reported if reported is not None else estimate_tokens(content))
        tool_calls = [self._decode_call(calls[i], i) for i in sorted(calls)]
        if usage is None:
            usage = self._estimate_usage(request, content, tool_calls)
        return ModelReply(
            content=content,
            tool_calls=tool_calls,
            usage=usage,
            model=model or self.spec.model,
            finish_reason=finish_reason or ("tool_calls" if tool_calls else "stop"),
        )

    async def _complete_once(
        self, request: ModelRequest, kwargs: dict[str, Any], on_chunk: ChunkCallback
    ) -> ModelReply:
        try:
            resp = await self._client.chat.completions.create(stream=False, **kwargs)
        except openai.OpenAIError as exc:
            raise self._map_error(exc) from None
        content = ""
        tool_calls: list[ToolCall] = []
        finish_reason: str | None = None
        if resp.choices:
            choice = resp.choices[0]
            finish_reason = choice.finish_reason
            content = choice.message.content or ""
            for i, tc in enumerate(choice.message.tool_calls or []):
                fn = getattr(tc, "function", None)
                if fn is None:  # a custom (non-function) tool call: not supported by OAO
                    raise PermanentError(
                        f"model {self.spec.model!r} (models.{self.name}) returned a "
                        f"non-function tool call of type {getattr(tc, 'type', '?')!r}"
                    )
                part = _PartialCall(tc.id or "", fn.name or "", fn.arguments or "")
                tool_calls.append(self._decode_call(part, i))
        if resp.usage is not None:
            usage = Usage(resp.usage.prompt_tokens, resp.usage.completion_tokens)
        else:
            usage = self._estimate_usage(request, content, tool_calls)
        await on_chunk(content, usage.output_tokens)
        return ModelReply(
            content=content,
            tool_calls=tool_calls,
            usage=usage,
            model=resp.model or self.spec.model,
            finish_reason=finish_reason or ("tool_calls" if tool_calls else "stop"),
        )

    def _decode_call(self, part: _PartialCall, index: int) -> ToolCall:
        """A finished tool call; its arguments must be a JSON object (or empty)."""
        where = f"model {self.spec.model!r} (models.{self.name}) tool call {part.name!r}"
        try:
            args = json.loads(part.arguments) if part.arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise PermanentError(
                f"{where}: arguments are not valid JSON ({exc.msg} at char {exc.pos}): "
                f"{part.arguments[:200]!r}"
            ) from None
        if not isinstance(args, dict):
            raise PermanentError(f"{where}: arguments must be a JSON object, got {type(args).__name__}")
        if not part.name:
            raise PermanentError(f"{where}: tool call #{index} has no function name")
        return ToolCall(id=part.id or f"call_{index}", name=part.name, args=args)

    @staticmethod
    def _estimate_usage(request: ModelRequest, content: str, tool_calls: list[ToolCall]) -> Usage:
        out = estimate_tokens(content) + sum(
            estimate_tokens(json.dumps(t.args, sort_keys=True)) for t in tool_calls
        )
        return Usage(estimate_message_tokens(request.messages), out)

    def _redact(self, text: str) -> str:
        if self._api_key != NO_KEY and len(self._api_key) >= 4:
            text = text.replace(self._api_key, "***")
        return text

    def _map_error(self, exc: openai.OpenAIError) -> OAOError:
        """The OAO error for an SDK error (never containing the API key)."""
        who = f"model {self.spec.model!r} (models.{self.name})"
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            body = exc.body
            detail = ""
            if isinstance(body, dict):
                detail = str(body.get("message") or body.get("code") or "")
            elif isinstance(body, str):
                detail = body
            detail = self._redact(detail.strip()[:300])
            msg = f"{who}: HTTP {status}" + (f": {detail}" if detail else "")
            if isinstance(exc, openai.RateLimitError | openai.InternalServerError) or (
                status == 429 or status >= 500
            ):
                return TransientError(msg, retry_after_s=_retry_after(exc.response.headers))
            return PermanentError(msg)
        if isinstance(exc, openai.APITimeoutError):
            return TransientError(f"{who}: request timed out after {self.spec.timeout_s}s")
        if isinstance(exc, openai.APIConnectionError) and isinstance(exc.__cause__, BlockedDestination):
            return TrustError(self._redact(f"{who}: {exc.__cause__}"))
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__
            reason = f": {type(cause).__name__}: {cause}" if cause is not None else ""
            where = self.spec.base_url or "the default OpenAI endpoint"
            return TransientError(self._redact(f"{who}: cannot connect to {where}{reason}"))
        if isinstance(exc, openai.APIResponseValidationError):
            return PermanentError(self._redact(f"{who}: invalid response: {exc.message}"))
        if isinstance(exc, openai.APIError):
            # An error event inside a stream (the server gave up mid-reply).
            return TransientError(self._redact(f"{who}: error in stream: {exc.message}"))
        return PermanentError(self._redact(f"{who}: {type(exc).__name__}: {exc}"))

    async def aclose(self) -> None:
        """Close the HTTP client and its pooled connections."""
        await self._client.close()
        await self._http.aclose()
