"""AnthropicProvider against a real (stub) server speaking Anthropic's Messages API on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from anthropic_server import DEFAULT_MODEL, AnthropicStubServer

from oao_common.errors import PermanentError, PolicyViolation, TransientError, TrustError
from oao_common.pricing import DEFAULT_PRICES, price_of
from oao_common.spec import AnthropicModelSpec, parse_spec
from oao_common.trust import TrustPolicy
from oao_worker.providers import make_provider
from oao_worker.providers.anthropic_provider import AnthropicProvider, to_anthropic
from oao_worker.providers.base import (
    API_TOOL_NAME,
    ModelRequest,
    ToolCall,
    Usage,
    consumed_usage,
    estimate_tokens,
)

KEY_ENV = "OAOTEST_ANTHROPIC_API_KEY"
SECRET = "sk-ant-test-Qw7ErT9yUi3oP5aS"
MODEL = "claude-sonnet-4-5-20250929"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say something."},
]
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "notes.search",
        "description": "Search the notes.",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
    },
}

MakeProvider = Callable[..., AnthropicProvider]


@pytest.fixture
def server() -> Iterator[AnthropicStubServer]:
    with AnthropicStubServer() as s:
        yield s


@pytest.fixture
async def provider_of(
    server: AnthropicStubServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[MakeProvider]:
    monkeypatch.setenv(KEY_ENV, SECRET)
    made: list[AnthropicProvider] = []

    def make(base_url: str | None = None, trust: TrustPolicy | None = None, **spec: Any) -> AnthropicProvider:
        fields: dict[str, Any] = {
            "provider": "anthropic",
            "model": MODEL,
            "base_url": base_url or server.base_url,
            "api_key_env": KEY_ENV,
            "timeout_s": 5.0,
        }
        fields.update(spec)
        p = AnthropicProvider("claude", AnthropicModelSpec(**fields), *([trust] if trust else []))
        made.append(p)
        return p

    yield make
    for p in made:
        await p.aclose()


class Chunks:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, text: str, tokens: int) -> None:
        self.calls.append((text, tokens))

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.calls)


def request(**kw: Any) -> ModelRequest:
    return ModelRequest(model="claude", messages=kw.pop("messages", MESSAGES), **kw)


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------- messages and streaming


async def test_stream_text_usage_with_cache_tokens(
    server: AnthropicStubServer, provider_of: MakeProvider
) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    server.reply_text(text, usage=(21, 11), cache=(100, 400))
    chunks = Chunks()

    reply = await provider_of().complete(request(), chunks)

    assert reply.content == text == chunks.text
    assert len(chunks.calls) == len(text.split())
    prefix = ""
    for delta, n in chunks.calls:
        prefix += delta
        assert n == estimate_tokens(prefix)
    # every input token counts (plain + cache writes + cache reads), the cache ones apart
    assert reply.usage == Usage(21 + 100 + 400, 11, cache_read_tokens=400, cache_write_tokens=100)
    assert reply.model == DEFAULT_MODEL and reply.finish_reason == "stop" and reply.tool_calls == []

    [req] = server.requests
    assert req.path == "/v1/messages"
    # the SDK sends the key as x-api-key or, in recent versions, as a bearer token
    assert SECRET in (
        req.headers.get("x-api-key"),
        req.headers.get("authorization", "").removeprefix("Bearer "),
    )
    assert "anthropic-version" in req.headers
    assert req.body["model"] == MODEL and req.body["stream"] is True
    assert req.body["system"] == [{"type": "text", "text": "You are terse."}]
    assert req.body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Say something."}]}]
    assert req.body["max_tokens"] == 4096  # the spec's default: the API requires one
    assert "tools" not in req.body and "tool_choice" not in req.body and "temperature" not in req.body


async def test_tools_names_choice_and_cache_control_sent(
    server: AnthropicStubServer, provider_of: MakeProvider
) -> None:
    server.reply_tool_use(
        [("toolu_1", "notes_search", {"q": "redis", "k": 3})], text="Looking.", usage=(50, 20)
    )
    provider = provider_of(cache_prompt=True, temperature=0.3)

    reply = await provider.complete(request(tools=[SEARCH_TOOL], max_tokens=300), Chunks())

    body = server.requests[0].body
    [tool] = body["tools"]
    assert API_TOOL_NAME.match(tool["name"]) and tool["name"] == "notes_search"
    assert tool["input_schema"] == SEARCH_TOOL["function"]["parameters"]
    assert tool["description"] == "Search the notes." and tool["cache_control"] == {"type": "ephemeral"}
    assert body["tool_choice"] == {"type": "auto"}
    assert body["system"][-1]["cache_control"] == {"type": "ephemeral"}
    assert body["max_tokens"] == 300 and body["temperature"] == 0.3
    assert reply.tool_calls == [ToolCall(id="toolu_1", name="notes.search", args={"q": "redis", "k": 3})]
    assert reply.content == "Looking." and reply.finish_reason == "tool_calls"


def test_history_translated_to_anthropic_messages() -> None:
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Find x."},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "t1",
                    "type": "function",
                    "function": {"name": "notes.search", "arguments": '{"q": "x"}'},
                },
                {
                    "id": "t2",
                    "type": "function",
                    "function": {"name": "notes.search", "arguments": '{"q": "y"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "t1", "content": "x is 1"},
        {"role": "tool", "tool_call_id": "t2", "content": "y is 2"},
        {"role": "user", "content": "And?"},
    ]
    system, msgs = to_anthropic(history, {"notes.search": "notes_search"})
    assert system == [{"type": "text", "text": "Be brief."}]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]  # alternating
    assert msgs[1]["content"] == [
        {"type": "tool_use", "id": "t1", "name": "notes_search", "input": {"q": "x"}},
        {"type": "tool_use", "id": "t2", "name": "notes_search", "input": {"q": "y"}},
    ]
    assert msgs[2]["content"] == [
        {"type": "tool_result", "tool_use_id": "t1", "content": "x is 1"},
        {"type": "tool_result", "tool_use_id": "t2", "content": "y is 2"},
        {"type": "text", "text": "And?"},
    ]


async def test_tool_loop_round_trip(server: AnthropicStubServer, provider_of: MakeProvider) -> None:
    provider = provider_of()
    server.reply_tool_use([("toolu_9", "notes_search", {"q": "a"})])
    server.reply_text("Done.", usage=(80, 2))

    first = await provider.complete(request(tools=[SEARCH_TOOL]), Chunks())
    history = [
        *MESSAGES,
        first.assistant_message(),
        {"role": "tool", "tool_call_id": "toolu_9", "content": '["a note"]'},
    ]
    second = await provider.complete(request(messages=history, tools=[SEARCH_TOOL]), Chunks())

    assert second.content == "Done." and second.usage == Usage(80, 2)
    sent = server.requests[1].body["messages"]
    assert sent[1]["content"][0]["name"] == "notes_search"  # mapped inside the history too
    assert sent[2]["content"][0] == {"type": "tool_result", "tool_use_id": "toolu_9", "content": '["a note"]'}


async def test_non_stream_mode(server: AnthropicStubServer, provider_of: MakeProvider) -> None:
    provider = provider_of(stream=False)
    server.reply_text("All done.", usage=(19, 4), cache=(0, 7))
    server.reply_tool_use([("toolu_2", "notes_search", {"q": "z"})], usage=(25, 7), stop_reason="tool_use")
    chunks = Chunks()

    reply = await provider.complete(request(), chunks)
    tools = await provider.complete(request(tools=[SEARCH_TOOL]), Chunks())

    assert reply.content == "All done." and chunks.calls == [("All done.", 4)]
    assert reply.usage == Usage(26, 4, cache_read_tokens=7)
    assert tools.tool_calls == [ToolCall(id="toolu_2", name="notes.search", args={"q": "z"})]
    assert tools.finish_reason == "tool_calls"
    assert all(r.body.get("stream") in (False, None) for r in server.requests)


async def test_invalid_tool_input_is_permanent(
    server: AnthropicStubServer, provider_of: MakeProvider
) -> None:
    server.reply_tool_use([("toolu_1", "write", '{"path": ')])

    with pytest.raises(PermanentError, match="write") as exc_info:
        await provider_of().complete(request(), Chunks())
    assert not isinstance(exc_info.value, TransientError)


# --------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("status", "kind"), [(429, "rate_limit_error"), (500, "api_error"), (529, "overloaded_error")]
)
async def test_429_and_5xx_are_transient_with_retry_after(
    server: AnthropicStubServer, provider_of: MakeProvider, status: int, kind: str
) -> None:
    server.reply_error(status, "Overloaded, slow down", error_type=kind, retry_after="3")

    with pytest.raises(TransientError) as exc_info:
        await provider_of().complete(request(), Chunks())

    assert exc_info.value.retry_after_s == 3
    assert str(status) in str(exc_info.value) and "Overloaded, slow down" in str(exc_info.value)
    assert len(server.requests) == 1  # the SDK did not retry on its own


@pytest.mark.parametrize("status", [400, 401, 404, 413])
async def test_other_4xx_are_permanent(
    server: AnthropicStubServer, provider_of: MakeProvider, status: int
) -> None:
    server.reply_error(status, "messages: at least one message is required")

    with pytest.raises(PermanentError) as exc_info:
        await provider_of().complete(request(), Chunks())

    assert not isinstance(exc_info.value, TransientError)
    assert str(status) in str(exc_info.value) and "at least one message" in str(exc_info.value)


async def test_connection_refused_and_timeout_are_transient(
    server: AnthropicStubServer, provider_of: MakeProvider
) -> None:
    with pytest.raises(TransientError, match="cannot connect"):
        await provider_of(base_url=f"http://127.0.0.1:{closed_port()}").complete(request(), Chunks())
    server.reply_text("late", chunk_delay_s=1.0)
    with pytest.raises(TransientError, match=r"stalled|timed out"):
        await provider_of(timeout_s=0.3).complete(request(), Chunks())


async def test_cut_stream_is_transient_and_reports_usage(
    server: AnthropicStubServer, provider_of: MakeProvider
) -> None:
    server.reply_text("one two three four five six", drop_after=2, usage=(33, 9), cache=(0, 10))

    with pytest.raises(TransientError) as exc_info:
        await provider_of().complete(request(), Chunks())

    assert "cannot connect" not in str(exc_info.value) and "cut off" in str(exc_info.value)
    used = consumed_usage(exc_info.value)
    assert used is not None
    assert used.input_tokens == 43 and used.cache_read_tokens == 10  # from message_start
    assert used.output_tokens == estimate_tokens("one two ")


async def test_stream_without_message_stop_is_an_error(
    server: AnthropicStubServer, provider_of: MakeProvider
) -> None:
    server.reply_text("one two three", end_after=1)

    with pytest.raises(TransientError, match="without message_stop") as exc_info:
        await provider_of().complete(request(), Chunks())
    assert consumed_usage(exc_info.value) is not None


@pytest.mark.parametrize(
    ("kind", "transient"), [("overloaded_error", True), ("invalid_request_error", False)]
)
async def test_error_event_in_stream_classified_by_type(
    server: AnthropicStubServer, provider_of: MakeProvider, kind: str, transient: bool
) -> None:
    server.reply_text("one two three", error_after=1, error_type=kind, error_message="Overloaded mid-way")

    with pytest.raises((TransientError, PermanentError)) as exc_info:
        await provider_of().complete(request(), Chunks())

    assert isinstance(exc_info.value, TransientError) is transient
    assert "Overloaded mid-way" in str(exc_info.value)


async def test_on_chunk_raising_closes_the_stream(
    server: AnthropicStubServer, provider_of: MakeProvider
) -> None:
    server.reply_text("word " * 100, chunk_delay_s=0.02)
    server.reply_text("still usable")
    provider = provider_of()
    violation = PolicyViolation("max_tokens", 3, 4)
    seen: list[int] = []

    async def on_chunk(_text: str, tokens: int) -> None:
        seen.append(tokens)
        if len(seen) == 3:
            raise violation

    with pytest.raises(PolicyViolation) as exc_info:
        await provider.complete(request(), on_chunk)

    assert exc_info.value is violation
    assert consumed_usage(violation) is not None
    assert await asyncio.to_thread(server.wait_for_disconnect, 5.0)
    assert server.chunks_sent < 100
    assert (await provider.complete(request(), Chunks())).content == "still usable"


# --------------------------------------------------------------------- key and trust


async def test_api_key_never_in_errors(server: AnthropicStubServer, provider_of: MakeProvider) -> None:
    provider = provider_of()
    server.reply_error(401, "bad key", error_type="authentication_error", echo_key=True)
    server.reply_error(529, "busy", error_type="overloaded_error", echo_key=True)
    errors = []
    for _ in range(2):
        with pytest.raises((PermanentError, TransientError)) as exc_info:
            await provider.complete(request(), Chunks())
        errors.append(exc_info.value)
    assert "invalid x-api-key" in str(errors[0])
    for err in errors:
        assert SECRET not in str(err) and SECRET not in repr(err)


async def test_trust_rules_apply(server: AnthropicStubServer, provider_of: MakeProvider) -> None:
    with pytest.raises(TrustError, match="api_key_env"):
        provider_of(api_key_env="MY_DB_PASSWORD")
    with pytest.raises(TrustError, match="metadata"):
        provider_of(base_url="http://169.254.169.254/")
    locked = TrustPolicy(deny_private_networks=True)
    with pytest.raises(TrustError, match="deny-private-networks"):
        await provider_of(trust=locked).complete(request(), Chunks())  # 127.0.0.1: refused at connect
    assert server.requests == []


def test_spec_pricing_and_factory() -> None:
    spec = parse_spec(
        json.dumps(
            {
                "name": "t",
                "models": {"c": {"provider": "anthropic", "model": MODEL}},
                "agents": {"a": {"kind": "llm", "model": "c"}},
                "nodes": [{"id": "n", "agent": "a"}],
            }
        )
    )
    m = spec.models["c"]
    assert isinstance(m, AnthropicModelSpec) and m.api_key_env == "ANTHROPIC_API_KEY"
    price = price_of(m)
    assert price == DEFAULT_PRICES["claude-sonnet-4-5"]
    # 1M plain input $3, 1M cache reads $0.30, 1M cache writes $3.75, 1M output $15
    assert price.cost(3_000_000, 1_000_000, cache_read=1_000_000, cache_write=1_000_000) == pytest.approx(
        3 + 0.30 + 3.75 + 15
    )
    assert DEFAULT_PRICES["claude-opus-4-5"].input_usd_per_mtok == 5.0  # not claude-opus-4's 15
    assert isinstance(make_provider("c", m), AnthropicProvider)


# --------------------------------------------------------------------- in a run


async def test_llm_agent_on_anthropic_in_a_run(
    server: AnthropicStubServer, broker: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from oao_testkit import make_spec, of_type, run_spec

    monkeypatch.setenv("OAO_TEST_LEDGER", str(tmp_path / "effects"))
    server.reply_tool_use([("toolu_1", "side_effect", {"label": "hello"})], usage=(40, 10))
    server.reply_text("All done.", usage=(60, 3), cache=(0, 1000))
    spec = make_spec(
        [{"id": "a", "agent": "writer", "task": "Say hello through the tool."}],
        agents={"writer": {"kind": "llm", "model": "c", "system": "Be brief.", "tools": ["side_effect"]}},
        models={"c": {"provider": "anthropic", "model": MODEL, "base_url": server.base_url}},
        defaults={"retry": {"max_retries": 0}},
    )
    rid = await run_spec(broker, spec)

    [n] = await broker.get_nodes(rid, ["a"])
    assert n["status"] == "SUCCEEDED" and json.loads(n["output"]) == "All done."
    assert (tmp_path / "effects").read_text() == "hello\n"
    assert int(n["tokens_in"]) == 40 + 60 + 1000 and int(n["tokens_out"]) == 13
    price = DEFAULT_PRICES["claude-sonnet-4-5"]
    expected = price.cost(40, 10) + price.cost(1060, 3, cache_read=1000)
    assert float(n["cost_usd"]) == pytest.approx(expected)
    kinds = [e.data["kind"] for e in of_type(await broker.events(rid), "STEP_COMPLETED")]
    assert kinds == ["llm", "tool", "llm"]
    second = server.requests[1].body
    assert second["messages"][-1]["content"][0]["type"] == "tool_result"
    assert second["system"] == [{"type": "text", "text": "Be brief."}]
