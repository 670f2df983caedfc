"""The ``openai`` provider: any OpenAI-compatible chat-completions endpoint (OpenAI,
vLLM, Ollama, LM Studio, llama.cpp server) through the official ``openai`` SDK.

The SDK's own retries are off (``max_retries=0``): OAO retries a node's step itself,
driven by :class:`~oao_common.errors.TransientError` and its ``retry_after_s`` hint.

The fleet's :class:`~oao_common.trust.TrustPolicy` decides which ``api_key_env`` may be
read and where the client may connect: every connection (redirects too) goes through
:class:`~oao_common.safe_http.GuardedTransport`, which checks the resolved address.

What it does for servers that are not OpenAI (llama.cpp, vLLM, LiteLLM ...): sends
``tool_choice: "auto"`` whenever tools are offered (some default to none); sends tool
names the API grammar accepts (``^[a-zA-Z0-9_-]{1,64}$``: ``notes.search`` goes out as
``notes_search`` and comes back as ``notes.search``, :func:`~.base.api_tool_names`);
treats a stream that ends without a finish reason, or that carried nothing at all (no
content, no tool call, no usage), as an error, not as an empty reply;
reads retry hints also from proxy-prefixed headers (``llm_provider-retry-after``);
shows the error body's message (``error.message``, ``detail``).
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

from . import tokens
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
    ``x-ratelimit-reset-*``, also behind a proxy's ``llm_provider-`` prefix), via the
    rate limiter's parser, so one parser serves both."""
    return retry_after_from_headers(dict(headers)) if headers is not None else None


def _api_messages(messages: list[dict[str, Any]], names: dict[str, str]) -> list[dict[str, Any]]:
    """``messages`` with the tool names of earlier assistant tool calls mapped to their
    API names (the messages themselves are not changed)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls and any(names.get(((c.get("function") or {}).get("name")) or "") for c in calls):
            m = {
                **m,
                "tool_calls": [
                    {
                        **c,
                        "function": {
                            **c["function"],
                            "name": names.get(c["function"]["name"], c["function"]["name"]),
                        },
                    }
                    if isinstance(c.get("function"), dict)
                    else c
                    for c in calls
                ],
            }
        out.append(m)
    return out


def _called_tool_names(messages: list[dict[str, Any]]) -> list[str]:
    return [
        str(c["function"]["name"])
        for m in messages
        for c in m.get("tool_calls") or []
        if isinstance(c.get("function"), dict) and c["function"].get("name")
    ]


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
        offered = [str(t.get("function", {}).get("name", "")) for t in request.tools]
        names = api_tool_names(offered + _called_tool_names(request.messages))
        back = {api: oao for oao, api in names.items()}
        kwargs: dict[str, Any] = {
            "model": self.spec.model,
            "messages": _api_messages(request.messages, names),
        }
        if request.tools:
            kwargs["tools"] = [
                {**t, "function": {**t["function"], "name": names[t["function"]["name"]]}}
                if isinstance(t.get("function"), dict) and t["function"].get("name") in names
                else t
                for t in request.tools
            ]
            kwargs["tool_choice"] = "auto"
        if request.max_tokens is not None:
            kwargs["max_tokens"] = request.max_tokens
        temperature = request.temperature if request.temperature is not None else self.spec.temperature
        if temperature is not None:
            kwargs["temperature"] = temperature
        input_estimate = await self.count_input_tokens(request)
        if self.spec.stream:
            reply = await self._complete_stream(request, kwargs, on_chunk, input_estimate)
        else:
            reply = await self._complete_once(request, kwargs, on_chunk, input_estimate)
        for call in reply.tool_calls:
            call.name = back.get(call.name, call.name)
        return reply

    async def count_input_tokens(self, request: ModelRequest) -> int:
        """Input tokens of ``request``: exact under ``spec.model``'s tiktoken encoding when
        that encoding is available offline (:mod:`.tokens`), else the estimate."""
        enc = await tokens.encoding_for(self.spec.model)
        if enc is None:
            return estimate_message_tokens(request.messages)
        return tokens.count_chat_tokens(enc, request.messages, request.tools)

    async def _complete_stream(
        self, request: ModelRequest, kwargs: dict[str, Any], on_chunk: ChunkCallback, input_estimate: int
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
        chunks = 0
        out_tokens = 0
        try:
            async with stream:
                while True:
                    # Only the SDK's reads are mapped; on_chunk's exceptions pass unchanged
                    # (and ``async with`` closes the stream on the way out).
                    try:
                        chunk = await stream.__anext__()
                    except StopAsyncIteration:
                        break
                    except openai.OpenAIError as exc:
                        raise self._map_error(exc, chunks=chunks) from None
                    chunks += 1
                    model = chunk.model or model
                    reported: int | None = None
                    if chunk.usage is not None:
                        usage = self._usage(chunk.usage)
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
                    if reported is not None:
                        out_tokens = reported
                    if delta_text:
                        content += delta_text
                        out_tokens = reported if reported is not None else estimate_tokens(content)
                        await on_chunk(delta_text, out_tokens)
            if finish_reason is None:
                # The server gave up (an error it could not report, a proxy timeout) and
                # closed the stream cleanly: not an empty success.
                raise TransientError(
                    f"{self._who()}: the stream ended after {chunks} chunks without a finish "
                    "reason: the reply is incomplete"
                )
            if not content and not calls and usage is None:
                # Nothing at all, not even the usage we asked for: a server that failed
                # behind a proxy which closed the stream "cleanly" (LiteLLM in front of a
                # llama.cpp server that raised after its 200, docs/interop.md). A real empty
                # reply comes with its usage.
                raise TransientError(
                    f"{self._who()}: the stream ended after {chunks} chunks with no content, no "
                    f"tool call and no usage (finish reason {finish_reason!r}): the server or a "
                    "proxy in front of it failed"
                )
            tool_calls = [self._decode_call(calls[i], i) for i in sorted(calls)]
        except BaseException as exc:
            if chunks:  # the server took the prompt and produced output: that was paid for
                partial = usage or Usage(
                    input_estimate,
                    max(out_tokens, self._estimate_out(content, list(calls.values()))),
                )
                attach_usage(exc, partial)
            raise
        if usage is None:
            usage = self._estimate_usage(input_estimate, content, tool_calls)
        return ModelReply(
            content=content,
            tool_calls=tool_calls,
            usage=usage,
            model=model or self.spec.model,
            finish_reason=finish_reason or ("tool_calls" if tool_calls else "stop"),
        )

    async def _complete_once(
        self, request: ModelRequest, kwargs: dict[str, Any], on_chunk: ChunkCallback, input_estimate: int
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
        usage = (
            self._usage(resp.usage)
            if resp.usage is not None
            else self._estimate_usage(input_estimate, content, tool_calls)
        )
        try:
            await on_chunk(content, usage.output_tokens)
        except BaseException as exc:
            attach_usage(exc, usage)
            raise
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
    def _usage(u: Any) -> Usage:
        """The server's usage; ``prompt_tokens_details.cached_tokens`` (part of
        ``prompt_tokens``) are the prompt-cache reads."""
        details = getattr(u, "prompt_tokens_details", None)
        cached = getattr(details, "cached_tokens", None) or 0
        return Usage(int(u.prompt_tokens or 0), int(u.completion_tokens or 0), cache_read_tokens=int(cached))

    @staticmethod
    def _estimate_out(content: str, calls: list[_PartialCall]) -> int:
        return estimate_tokens(content) + sum(estimate_tokens(c.name + c.arguments) for c in calls)

    @staticmethod
    def _estimate_usage(input_tokens: int, content: str, tool_calls: list[ToolCall]) -> Usage:
        out = estimate_tokens(content) + sum(
            estimate_tokens(json.dumps(t.args, sort_keys=True)) for t in tool_calls
        )
        return Usage(input_tokens, out)

    @staticmethod
    def _body_text(response: Any) -> str:
        try:
            return error_detail(response.text)
        except Exception:  # a body that was never read
            return ""

    def _who(self) -> str:
        return f"model {self.spec.model!r} (models.{self.name})"

    def _redact(self, text: str) -> str:
        if self._api_key != NO_KEY and len(self._api_key) >= 4:
            text = text.replace(self._api_key, "***")
        return text

    def _map_error(self, exc: openai.OpenAIError, chunks: int | None = None) -> OAOError:
        """The OAO error for an SDK error (never containing the API key). ``chunks`` is
        set for an error while reading a stream: how many chunks had arrived."""
        who = self._who()
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            detail = self._redact(error_detail(exc.body) or self._body_text(exc.response))
            msg = f"{who}: HTTP {status}" + (f": {detail}" if detail else "")
            if isinstance(exc, openai.RateLimitError | openai.InternalServerError) or (
                status == 429 or status >= 500
            ):
                return TransientError(msg, retry_after_s=_retry_after(exc.response.headers))
            return PermanentError(msg)
        if isinstance(exc, openai.APITimeoutError):
            if chunks is not None:
                return TransientError(
                    f"{who}: the stream stalled after {chunks} chunks: no data for {self.spec.timeout_s}s"
                )
            return TransientError(f"{who}: request timed out after {self.spec.timeout_s}s")
        if isinstance(exc, openai.APIConnectionError) and isinstance(exc.__cause__, BlockedDestination):
            return TrustError(self._redact(f"{who}: {exc.__cause__}"))
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__
            reason = f": {type(cause).__name__}: {cause}" if cause is not None else ""
            if chunks is not None:
                return TransientError(
                    self._redact(f"{who}: the stream was cut off after {chunks} chunks{reason}")
                )
            where = self.spec.base_url or "the default OpenAI endpoint"
            if isinstance(cause, httpx.RemoteProtocolError | httpx.ReadError):
                # Connected and the request sent: the server died (or dropped us) while
                # working on it, which a retry may or may not meet again; not "cannot connect".
                return TransientError(
                    self._redact(f"{who}: {where} closed the connection before replying{reason}")
                )
            return TransientError(self._redact(f"{who}: cannot connect to {where}{reason}"))
        if isinstance(exc, openai.APIResponseValidationError):
            return PermanentError(self._redact(f"{who}: invalid response: {exc.message}"))
        if isinstance(exc, openai.APIError):
            # An error event inside a stream (the server gave up mid-reply).
            detail = error_detail(exc.body) or exc.message
            return TransientError(self._redact(f"{who}: error in stream: {detail}"))
        return PermanentError(self._redact(f"{who}: {type(exc).__name__}: {exc}"))

    async def aclose(self) -> None:
        """Close the HTTP client and its pooled connections."""
        await self._client.close()
        await self._http.aclose()
