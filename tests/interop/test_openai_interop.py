"""The OpenAI provider against real OpenAI-compatible servers (opt-in, not CI).

The checks of ``bench/interop_openai.py``, each a test, against the servers named by
``OAO_TEST_LLAMACPP_URL`` (llama-cpp-python's server, ``.../v1``) and
``OAO_TEST_LITELLM_URL`` (a LiteLLM proxy, ``.../v1``); skipped when unset.
``OAO_TEST_LLAMACPP_MODEL`` / ``OAO_TEST_LITELLM_MODEL`` name the model (``smollm2``),
``OAO_TEST_LITELLM_RPM_MODEL`` a LiteLLM model limited to ``rpm: 1`` (the 429 check),
``OAO_TEST_LITELLM_429_MODEL`` one whose upstream answers 429 with ``Retry-After: 3``,
``OAO_TEST_LITELLM_KEY_ENV`` the variable holding the proxy's key (a ``*_API_KEY`` name),
``OAO_TEST_EXPECT_TOOL_CALLS=1`` makes a model that calls no tool a failure,
``OAO_TEST_TOOLS_NO_STREAM=1`` runs the tools test with stream off (llama.cpp's
``chatml-function-calling`` handler refuses automatic tool choice in a stream).
docs/interop.md says how to start the servers.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from bench.interop_openai import (
    Ctx,
    Result,
    Target,
    check_budget_stop,
    check_cut_off,
    check_error_body,
    check_plain,
    check_provider_retry_after,
    check_rate_limit,
    check_replay,
    check_tools,
    checking,
)
from oao_common.broker import Broker
from oao_scheduler.fleet import LocalFleet

pytestmark = pytest.mark.timeout(900)


def _targets() -> list[object]:
    expect_tools = os.environ.get("OAO_TEST_EXPECT_TOOL_CALLS") == "1"
    out: list[object] = []
    llama = os.environ.get("OAO_TEST_LLAMACPP_URL")
    out.append(
        pytest.param(
            Target(
                "llama.cpp", llama, os.environ.get("OAO_TEST_LLAMACPP_MODEL", "smollm2"), tools=expect_tools
            )
            if llama
            else None,
            id="llamacpp",
            marks=pytest.mark.skipif(
                not llama, reason="OAO_TEST_LLAMACPP_URL is not set (a llama.cpp server: docs/interop.md)"
            ),
        )
    )
    lite = os.environ.get("OAO_TEST_LITELLM_URL")
    out.append(
        pytest.param(
            Target(
                "litellm",
                lite,
                os.environ.get("OAO_TEST_LITELLM_MODEL", "smollm2"),
                litellm=True,
                rpm_model=os.environ.get("OAO_TEST_LITELLM_RPM_MODEL"),
                upstream429_model=os.environ.get("OAO_TEST_LITELLM_429_MODEL"),
                api_key_env=os.environ.get("OAO_TEST_LITELLM_KEY_ENV"),
                tools=expect_tools,
            )
            if lite
            else None,
            id="litellm",
            marks=pytest.mark.skipif(
                not lite, reason="OAO_TEST_LITELLM_URL is not set (a LiteLLM proxy: docs/interop.md)"
            ),
        )
    )
    return out


@pytest.fixture(params=_targets())
async def ctx(request: pytest.FixtureRequest, broker: Broker) -> AsyncIterator[Ctx]:
    target: Target = request.param
    target.tools_stream = os.environ.get("OAO_TEST_TOOLS_NO_STREAM") != "1"
    async with LocalFleet(broker=broker, workers=1, concurrency=4), checking(target, broker) as c:
        yield c


async def _passes(check: Callable[[Ctx], Awaitable[Result]], ctx: Ctx) -> None:
    result = await check(ctx)
    if result.status == "SKIP":
        pytest.skip(result.detail)
    assert result.status == "PASS", result.detail


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "nostream"])
@pytest.mark.parametrize("kind", ["llm", "python"])
async def test_one_model_call(ctx: Ctx, kind: str, stream: bool) -> None:
    await _passes(lambda c: check_plain(c, kind, stream), ctx)


async def test_budget_stops_the_stream(ctx: Ctx) -> None:
    await _passes(check_budget_stop, ctx)


async def test_tools_auto_and_dotted_names(ctx: Ctx) -> None:
    await _passes(check_tools, ctx)


async def test_cut_off_stream_fails_transient_with_its_usage(ctx: Ctx) -> None:
    await _passes(check_cut_off, ctx)


async def test_replay_makes_no_request(ctx: Ctx) -> None:
    await _passes(lambda c: check_plain(c, "llm", True), ctx)
    await _passes(check_replay, ctx)


async def test_error_body_message_shown(ctx: Ctx) -> None:
    await _passes(check_error_body, ctx)


async def test_rate_limit_429_is_retried_with_the_hint(ctx: Ctx) -> None:
    await _passes(check_rate_limit, ctx)


async def test_provider_prefixed_retry_after_is_honoured(ctx: Ctx) -> None:
    await _passes(check_provider_retry_after, ctx)
