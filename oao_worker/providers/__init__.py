"""Model providers: ``scripted`` (deterministic, offline), ``openai`` (any
OpenAI-compatible endpoint) and ``anthropic`` (Anthropic's Messages API)."""

from __future__ import annotations

from oao_common.spec import AnthropicModelSpec, OpenAIModelSpec, ScriptedModelSpec
from oao_common.trust import DEFAULT_TRUST, TrustPolicy

from .base import ModelReply, ModelRequest, Provider, ToolCall, Usage


def make_provider(
    name: str,
    spec: ScriptedModelSpec | OpenAIModelSpec | AnthropicModelSpec,
    trust: TrustPolicy = DEFAULT_TRUST,
) -> Provider:
    """The provider for model ``name`` of a spec; raises ``TrustError`` for an
    ``api_key_env`` or ``base_url`` that ``trust`` refuses."""
    if isinstance(spec, ScriptedModelSpec):
        from .scripted import ScriptedProvider

        return ScriptedProvider(name, spec)
    if isinstance(spec, AnthropicModelSpec):
        from .anthropic_provider import AnthropicProvider

        return AnthropicProvider(name, spec, trust)
    from .openai_provider import OpenAIProvider

    return OpenAIProvider(name, spec, trust)


__all__ = ["ModelReply", "ModelRequest", "Provider", "ToolCall", "Usage", "make_provider"]
