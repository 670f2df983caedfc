"""OAO's example plugin (plugin API 1.0, docs/plugins.md).

* ``example.forbid_tool_args`` (:class:`ForbidToolArgs`): refuses a tool call whose
  arguments contain a string matching a forbidden pattern, before the tool runs
  (``PolicyViolation`` rule ``forbidden_tool_argument``). A spec asks for it
  (``middleware: [{use: example.forbid_tool_args, config: {patterns: [...]}}]``);
  ``OAO_EXAMPLE_FORBID`` (patterns, one per line) applies it to every node the worker runs.
* :class:`WebhookListener`: posts events as JSON to ``OAO_EXAMPLE_WEBHOOK_URL`` through
  OAO's guarded HTTP client, under the worker's trust policy.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from oao.plugins import (
    EXECUTION_COMPLETE,
    ListenerEvent,
    Plugin,
    PluginAPI,
    PolicyViolation,
    StepInfo,
    StepMiddleware,
    TrustPolicy,
    Usage,
    guarded_client,
)

ENV_FORBID = "OAO_EXAMPLE_FORBID"
ENV_WEBHOOK_URL = "OAO_EXAMPLE_WEBHOOK_URL"
ENV_WEBHOOK_EVENTS = "OAO_EXAMPLE_WEBHOOK_EVENTS"
DEFAULT_EVENTS = ("POLICY_VIOLATION", EXECUTION_COMPLETE)


class ForbidToolArgs(StepMiddleware):
    """Refuse tool calls whose string arguments match one of ``patterns`` (regular
    expressions, ``re.search``); ``tools``: the tools it applies to (default: all).
    Raises ``ValueError`` for an invalid pattern (the node fails, naming it)."""

    def __init__(self, patterns: list[str], tools: list[str] | None = None) -> None:
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise ValueError("patterns must be a non-empty list of strings")
        try:
            self.patterns = [re.compile(p) for p in patterns]
        except re.error as e:
            raise ValueError(f"bad pattern: {e}") from None
        self.tools = None if tools is None else frozenset(tools)

    def before_step(self, step: StepInfo, usage: Usage) -> None:
        if step.kind != "tool" or (self.tools is not None and step.name not in self.tools):
            return
        for path, text in _strings(step.args, "args"):
            for p in self.patterns:
                if p.search(text):
                    raise PolicyViolation(
                        "forbidden_tool_argument",
                        detail=f"tool {step.name!r}: {path} matches the forbidden pattern {p.pattern!r}",
                    )


def _strings(value: Any, path: str) -> list[tuple[str, str]]:
    """Every string inside ``value`` (JSON-like), with its path (``args.cmd[0]``)."""
    if isinstance(value, str):
        return [(path, value)]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [s for i, v in enumerate(value) for s in _strings(v, f"{path}[{i}]")]
    return []


class WebhookListener:
    """POSTs each event (``ListenerEvent.to_dict()``, JSON) to ``url`` with OAO's guarded
    client: every connection's address is checked against ``trust`` (redirects are not
    followed). A response other than 2xx raises, and the worker logs it; the event is
    not retried (delivery is at most once)."""

    def __init__(self, url: str, trust: TrustPolicy, timeout_s: float = 5.0) -> None:
        trust.check_url(url, ENV_WEBHOOK_URL)  # at load: a refused URL refuses the plugin
        self.url = url
        self.trust = trust
        self.timeout_s = timeout_s
        self._client: Any = None

    async def on_event(self, event: ListenerEvent) -> None:
        if self._client is None:
            self._client = guarded_client(self.trust, ENV_WEBHOOK_URL, timeout=self.timeout_s)
        body = json.dumps({"source": "oao", **event.to_dict()}, default=str)
        resp = await self._client.post(self.url, content=body, headers={"content-type": "application/json"})
        resp.raise_for_status()

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


def register(api: PluginAPI) -> None:
    """Called once by each worker that loads the plugin."""
    api.add_named_middleware("forbid_tool_args", ForbidToolArgs)
    patterns = [p for p in os.environ.get(ENV_FORBID, "").splitlines() if p.strip()]
    if patterns:
        api.add_middleware(ForbidToolArgs(patterns))
    url = os.environ.get(ENV_WEBHOOK_URL)
    if url:
        events = [e.strip() for e in os.environ.get(ENV_WEBHOOK_EVENTS, "").split(",") if e.strip()]
        api.add_listener(WebhookListener(url, api.trust), events=events or DEFAULT_EVENTS)


plugin = Plugin(
    api_version="1.0",
    register=register,
    description="forbid tool-argument patterns (example.forbid_tool_args); post events to a webhook",
)
