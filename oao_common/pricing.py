"""Model prices and the cost of a step, in USD.

Prices are USD per million tokens (input, output). A model's ``pricing`` in the spec
wins; otherwise the provider-side model name is looked up in :data:`DEFAULT_PRICES`
(list prices of common models, November 2026; check your provider's page), by exact
name and then by longest matching prefix; unknown models and the ``scripted`` provider
cost nothing unless priced in the spec.
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import OpenAIModelSpec, ScriptedModelSpec


@dataclass(frozen=True, slots=True)
class Price:
    input_usd_per_mtok: float
    output_usd_per_mtok: float

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        """USD for ``tokens_in`` input and ``tokens_out`` output tokens."""
        return (tokens_in * self.input_usd_per_mtok + tokens_out * self.output_usd_per_mtok) / 1e6


FREE = Price(0.0, 0.0)

DEFAULT_PRICES: dict[str, Price] = {
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "o3": Price(2.00, 8.00),
    "o4-mini": Price(1.10, 4.40),
    "claude-3-5-haiku": Price(0.80, 4.00),
    "claude-sonnet-4": Price(3.00, 15.00),
    "claude-opus-4": Price(15.00, 75.00),
}


def price_of(spec: ScriptedModelSpec | OpenAIModelSpec) -> Price:
    """The price of a model of a spec (see the module docstring for the lookup order)."""
    if spec.pricing is not None:
        return Price(spec.pricing.input_usd_per_mtok, spec.pricing.output_usd_per_mtok)
    if isinstance(spec, ScriptedModelSpec):
        return FREE
    name = spec.model
    if name in DEFAULT_PRICES:
        return DEFAULT_PRICES[name]
    best = max((k for k in DEFAULT_PRICES if name.startswith(k)), key=len, default=None)
    return DEFAULT_PRICES[best] if best else FREE
