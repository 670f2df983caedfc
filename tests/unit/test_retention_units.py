"""Pure parts of retention: durations, the stored-spec split, stream ids, status lists."""

from __future__ import annotations

import json

import pytest
from oao_testkit import make_spec

from oao_common.hashing import canonical_json
from oao_common.spec import Spec
from oao_common.stored_spec import SpecTextCache, join_spec, split_spec
from oao_scheduler.durations import format_duration, parse_duration
from oao_scheduler.prune import parse_statuses
from oao_scheduler.retention import ESCALATION_MARGIN_MS, StreamId, prune_cutoff


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("12h", 43200), ("3d", 259200), ("45", 45), ("0", 0), ("1.5h", 5400)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "-5m", "3w", "d", "1 day", "1e3"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (259200, 43200, 1800, 90, 1.5)] == ["3d", "12h", "30m", "90s", "1.5s"]


def test_split_and_join_spec_round_trip() -> None:
    spec = make_spec([{"id": "a", "agent": "noop", "task": "{{ inputs.x }}"}], inputs={"x": 1, "y": "two"})
    spec_hash, body, inputs_json = split_spec(spec)
    assert '"inputs"' not in body[:12] and "inputs" not in json.loads(body)
    assert json.loads(inputs_json) == {"x": 1, "y": "two"}
    joined = join_spec(body, inputs_json)
    assert json.loads(joined) == spec.model_dump(mode="json")
    assert Spec.from_stored_json(joined) == spec
    other = spec.model_copy(update={"inputs": {"x": 2}})
    assert split_spec(other)[0] == spec_hash and split_spec(other)[1] == body
    renamed = spec.model_copy(update={"name": "other"})
    assert split_spec(renamed)[0] != spec_hash
    assert json.loads(join_spec(body, None))["inputs"] == {}
    assert join_spec("{}", '{"a":1}') == '{"inputs":{"a":1}}'
    with pytest.raises(ValueError):
        join_spec("[1]", "{}")
    assert canonical_json(json.loads(joined)) == canonical_json(spec.model_dump(mode="json"))


def test_spec_text_cache_is_bounded() -> None:
    c = SpecTextCache(size=2)
    c.put("a", "A")
    c.put("b", "B")
    assert c.get("a") == "A"  # a is now the most recent
    c.put("c", "C")
    assert (c.get("a"), c.get("b"), c.get("c")) == ("A", None, "C")


def test_stream_ids_order_and_cutoff() -> None:
    assert StreamId.parse("5-1") < StreamId.parse("5-2") < StreamId.parse("10-0")
    assert str(StreamId.parse("1700000000000-3")) == "1700000000000-3"
    assert prune_cutoff(10_000, None) == 10_000
    assert prune_cutoff(10_000, StreamId(5_000, 0)) == 5_000 - ESCALATION_MARGIN_MS
    assert prune_cutoff(10_000, StreamId(50_000, 0)) == 10_000


def test_parse_statuses() -> None:
    assert parse_statuses(None) == [] and parse_statuses("") == []
    assert parse_statuses("succeeded, FAILED,failed") == ["SUCCEEDED", "FAILED"]
    with pytest.raises(ValueError, match="'RUNNING': not a finished run state"):
        parse_statuses("RUNNING")
