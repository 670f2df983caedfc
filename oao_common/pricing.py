"""Model prices and the cost of a step, in USD.

Prices are USD per million tokens (input, output). A model's ``pricing`` in the spec
wins; then the file named by ``OAO_PRICES_FILE`` (YAML or JSON: provider model name →
``{input_usd_per_mtok, output_usd_per_mtok}``); then :data:`DEFAULT_PRICES` (list
prices of common models, November 2026; check your provider's page). Names match
exactly, then by longest prefix; unknown models and the ``scripted`` provider cost
nothing unless priced.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from .spec import AnthropicModelSpec, OpenAIModelSpec, PricingSpec, ScriptedModelSpec


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens. Prompt-cache reads and writes (Anthropic's
    ``cache_read_input_tokens`` / ``cache_creation_input_tokens``, OpenAI's
    ``cached_tokens``) have prices of their own; ``None`` prices them as input."""

    input_usd_per_mtok: float
    output_usd_per_mtok: float
    cache_read_usd_per_mtok: float | None = None
    cache_write_usd_per_mtok: float | None = None

    def cost(self, tokens_in: int, tokens_out: int, cache_read: int = 0, cache_write: int = 0) -> float:
        """USD for ``tokens_in`` input tokens (of which ``cache_read`` were read from and
        ``cache_write`` written to the prompt cache) and ``tokens_out`` output tokens."""
        read_price = (
            self.input_usd_per_mtok if self.cache_read_usd_per_mtok is None else self.cache_read_usd_per_mtok
        )
        write_price = (
            self.input_usd_per_mtok
            if self.cache_write_usd_per_mtok is None
            else self.cache_write_usd_per_mtok
        )
        plain = max(0, tokens_in - cache_read - cache_write)
        return (
            plain * self.input_usd_per_mtok
            + cache_read * read_price
            + cache_write * write_price
            + tokens_out * self.output_usd_per_mtok
        ) / 1e6


FREE = Price(0.0, 0.0)


def _claude(inp: float, out: float) -> Price:
    """Anthropic list prices: cache writes (5-minute) 1.25x input, cache reads 0.1x."""
    return Price(inp, out, round(inp * 0.1, 6), round(inp * 1.25, 6))


DEFAULT_PRICES: dict[str, Price] = {
    # OpenAI; cached input (prompt_tokens_details.cached_tokens) at its own price
    "gpt-4o": Price(2.50, 10.00, 1.25),
    "gpt-4o-mini": Price(0.15, 0.60, 0.075),
    "gpt-4.1": Price(2.00, 8.00, 0.50),
    "gpt-4.1-mini": Price(0.40, 1.60, 0.10),
    "gpt-4.1-nano": Price(0.10, 0.40, 0.025),
    "o3": Price(2.00, 8.00, 0.50),
    "o4-mini": Price(1.10, 4.40, 0.275),
    # Anthropic (model ids and their dated versions match by prefix)
    "claude-3-haiku": _claude(0.25, 1.25),
    "claude-3-5-haiku": _claude(0.80, 4.00),
    "claude-haiku-4-5": _claude(1.00, 5.00),
    "claude-3-5-sonnet": _claude(3.00, 15.00),
    "claude-3-7-sonnet": _claude(3.00, 15.00),
    "claude-sonnet-4": _claude(3.00, 15.00),
    "claude-sonnet-4-5": _claude(3.00, 15.00),
    "claude-opus-4": _claude(15.00, 75.00),
    "claude-opus-4-1": _claude(15.00, 75.00),
    "claude-opus-4-5": _claude(5.00, 25.00),
}


PRICES_FILE_ENV = "OAO_PRICES_FILE"


@cache
def file_prices(path: str) -> dict[str, Price]:
    """Prices from a YAML / JSON file; raises ``ValueError`` naming the file and entry."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{PRICES_FILE_ENV}={path}: cannot load: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{PRICES_FILE_ENV}={path}: expected a mapping of model name to prices")
    out = {}
    for name, p in data.items():
        try:
            ps = PricingSpec.model_validate(p)
        except ValueError as e:
            raise ValueError(f"{PRICES_FILE_ENV}={path}: {name}: {e}") from None
        out[str(name)] = _price(ps)
    return out


def _lookup(table: dict[str, Price], name: str) -> Price | None:
    if name in table:
        return table[name]
    best = max((k for k in table if name.startswith(k)), key=len, default=None)
    return table[best] if best else None


def _price(p: PricingSpec) -> Price:
    return Price(
        p.input_usd_per_mtok, p.output_usd_per_mtok, p.cache_read_usd_per_mtok, p.cache_write_usd_per_mtok
    )


def price_of(spec: ScriptedModelSpec | OpenAIModelSpec | AnthropicModelSpec) -> Price:
    """The price of a model of a spec (see the module docstring for the lookup order)."""
    if spec.pricing is not None:
        return _price(spec.pricing)
    if isinstance(spec, ScriptedModelSpec):
        return FREE
    path = os.environ.get(PRICES_FILE_ENV)
    found = _lookup(file_prices(path), spec.model) if path else None
    return found or _lookup(DEFAULT_PRICES, spec.model) or FREE
