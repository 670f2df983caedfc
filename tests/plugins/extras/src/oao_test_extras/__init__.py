"""Test plugin ``extras``: a model provider (``extras.echo``), an agent kind
(``extras.greeter``), a worker-wide middleware factory and an event listener. What the
middleware and the listener see is kept in module lists for the in-process test."""

from __future__ import annotations

from typing import Any

from oao.plugins import (
    ListenerEvent,
    ModelReply,
    ModelRequest,
    ModelUsage,
    NodeAttempt,
    Plugin,
    PluginAgentSpec,
    PluginAPI,
    PluginModelSpec,
    Provider,
    StepInfo,
    StepMiddleware,
    TrustPolicy,
    Usage,
)

EVENTS: list[ListenerEvent] = []
STEPS: list[tuple[str, str, str, bool]] = []


class EchoProvider(Provider):
    """Echoes the last message with ``config.prefix``, streaming one word per chunk."""

    def __init__(self, name: str, spec: PluginModelSpec, trust: TrustPolicy) -> None:
        self.prefix = str(spec.config.get("prefix", "echo"))

    async def complete(self, request: ModelRequest, on_chunk: Any) -> ModelReply:
        last = str(request.messages[-1].get("content") or "") if request.messages else ""
        words = f"{self.prefix}: {last}".split(" ")
        for i, w in enumerate(words):
            await on_chunk(w if i == 0 else " " + w, i + 1)
        return ModelReply(" ".join(words), usage=ModelUsage(len(last.split()), len(words)), model="echo")


class Greeter:
    """Agent kind ``extras.greeter``: one model call with the task, then the output."""

    def __init__(self, name: str, spec: PluginAgentSpec, trust: TrustPolicy, tools: dict[str, Any]) -> None:
        self.greeting = str(spec.config.get("greeting", "hello"))

    async def run(self, ctx: Any) -> dict[str, Any]:
        reply = await ctx.llm(f"{self.greeting} {ctx.task}")
        return {"said": reply.content}


class RecordSteps(StepMiddleware):
    def after_step(self, step: StepInfo, usage: Usage) -> None:
        node = step.node
        STEPS.append((node.node_id if node else "?", step.kind, step.name, step.replayed))


def for_extras_runs(node: NodeAttempt) -> StepMiddleware | None:
    """A worker-wide middleware factory: only runs of specs named ``extras``."""
    return RecordSteps() if node.spec is not None and node.spec.name == "extras" else None


def register(api: PluginAPI) -> None:
    api.add_provider("echo", EchoProvider)
    api.add_agent_kind("greeter", Greeter)
    api.add_middleware(for_extras_runs)
    wanted = ["STATE_ENTER", "STEP_COMPLETED", "TOOL_CALL", "EXECUTION_COMPLETE"]
    api.add_listener(EVENTS.append, events=wanted)


plugin = Plugin(api_version="1.0", register=register, description="test provider, agent kind, listener")
