"""Prices: spec override, then OAO_PRICES_FILE, then the default table (longest prefix)."""

from __future__ import annotations

from pathlib import Path

import pytest

from oao_common.pricing import DEFAULT_PRICES, FREE, Price, file_prices, price_of
from oao_common.spec import OpenAIModelSpec, ScriptedModelSpec


def test_cost_arithmetic() -> None:
    assert Price(2.5, 10.0).cost(1_000_000, 500_000) == pytest.approx(7.5)


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = OpenAIModelSpec(provider="openai", model="gpt-4o-mini-2024-07-18")
    assert price_of(m) == DEFAULT_PRICES["gpt-4o-mini"]  # longest prefix, not "gpt-4o"
    f = tmp_path / "prices.yaml"
    f.write_text("gpt-4o-mini: {input_usd_per_mtok: 1, output_usd_per_mtok: 2}\n")
    monkeypatch.setenv("OAO_PRICES_FILE", str(f))
    assert price_of(m) == Price(1, 2)
    spec_priced = OpenAIModelSpec(
        provider="openai",
        model="gpt-4o-mini",
        pricing={"input_usd_per_mtok": 3, "output_usd_per_mtok": 4},  # type: ignore[arg-type]
    )
    assert price_of(spec_priced) == Price(3, 4)
    assert price_of(ScriptedModelSpec(provider="scripted")) == FREE
    assert price_of(OpenAIModelSpec(provider="openai", model="my-local-llama")) == FREE


def test_bad_prices_file_names_the_entry(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("gpt-x: {input_usd_per_mtok: -1, output_usd_per_mtok: 2}\n")
    with pytest.raises(ValueError, match="gpt-x"):
        file_prices(str(f))
