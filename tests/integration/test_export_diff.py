"""Export / import of finished runs and the diff of two runs, on real servers (the
embedded Valkey, and the machine's Redis when OAO_TEST_REDIS_URL is set), through the
library and through the real ``oao-scheduler`` binary."""

from __future__ import annotations

import copy
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import delete_prefix
from oao_testkit import make_spec, run_spec
from proc import cli

from oao_common.broker import Broker
from oao_common.connection import EmbeddedServer, connect
from oao_common.hashing import canonical_json, sha256_hex
from oao_common.spec import Spec, parse_spec
from oao_common.stored_spec import join_spec
from oao_scheduler.diff import diff_runs
from oao_scheduler.export import (
    FormatError,
    RunExists,
    RunNotFound,
    RunNotTerminal,
    dumps,
    export_run,
    import_run,
)
from oao_scheduler.report import collect
from oao_scheduler.submit import submit_spec

ROOT = Path(__file__).resolve().parents[2]
BLOG = yaml.safe_load((ROOT / "examples" / "blog_post.yaml").read_text())
NEW_CRITIQUE = "Critique: too short; cite {{ tool_results[0].words }} words of evidence."


def blog_spec(critique: str | None = None) -> Spec:
    """examples/blog_post.yaml (four nodes, parallel branches, tool calls, the scripted
    model, a python invoke agent), optionally with critique's final model reply changed."""
    doc = copy.deepcopy(BLOG)
    doc["models"]["writer-model"]["stream_delay_s"] = 0
    if critique is not None:
        doc["models"]["writer-model"]["by_node"]["critique"][1]["content"] = critique
    return parse_spec(yaml.safe_dump(doc), "blog_post.yaml")


MESSAGE = {"role": "user", "content": "Research AI governance in the notes."}
MESSAGE_REF = sha256_hex(MESSAGE)[:32]


async def finished_blog_run(broker: Broker, critique: str | None = None) -> str:
    rid = await run_spec(broker, blog_spec(critique), timeout_s=60)
    assert (await broker.get_run(rid))["status"] == "SUCCEEDED"
    return rid


async def keyspace(broker: Broker) -> set[str]:
    return {k async for k in broker.redis.scan_iter(match=f"{broker.keys.prefix}:*", count=1000)}


@pytest.fixture
async def dest(redis_url: str) -> AsyncIterator[Broker]:
    """A broker on the same server under another prefix (deleted afterwards)."""
    p = f"oaotest-{uuid.uuid4().hex[:10]}"
    r = connect(redis_url)
    try:
        yield Broker(r, p)
    finally:
        await r.aclose()
        await delete_prefix(redis_url, p)


def without(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def normalized(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Export lines minus what an import changes: the run id, the export time, and
    ``imported_from``."""
    head, run, *rest = lines
    return [
        without(head, "run_id", "exported_at_ms"),
        {**run, "fields": without(run["fields"], "imported_from")},
        *rest,
    ]


async def assert_same_run(a: Broker, rid_a: str, b: Broker, rid_b: str) -> None:
    """Status, report, events (ids included), ledger, messages and spec are equal."""
    ra, rb = await collect(a, rid_a), await collect(b, rid_b)
    assert ra is not None and rb is not None
    assert without(ra, "run_id") == without(rb, "run_id")
    assert [e.to_dict() for e in await a.events(rid_a)] == [e.to_dict() for e in await b.events(rid_b)]
    assert await a.get_steps(rid_a) == await b.get_steps(rid_b)
    assert await a.redis.hgetall(a.keys.messages(rid_a)) == await b.redis.hgetall(b.keys.messages(rid_b))
    assert (await a.get_spec_json(rid_a))[:2] == (await b.get_spec_json(rid_b))[:2]
    run_a, run_b = await a.get_run(rid_a), await b.get_run(rid_b)
    assert without(run_a, "imported_from") == without(run_b, "imported_from")


# ---------------------------------------------------------------- export / import


async def test_export_import_round_trip(broker: Broker, dest: Broker) -> None:
    rid = await finished_blog_run(broker)
    # a message in the run's content-addressed store (written by model steps on the
    # replay branch; set here so that the store's export is covered either way)
    await broker.redis.hset(broker.keys.messages(rid), MESSAGE_REF, canonical_json(MESSAGE))
    lines = await export_run(broker, rid)

    head, run, spec = lines[:3]
    assert head["format"] == "oao-run" and head["version"] == 1 and head["run_id"] == rid
    assert run["type"] == "run" and run["fields"]["status"] == "SUCCEEDED"
    assert spec["type"] == "spec" and spec["spec_hash"] == run["fields"]["spec_hash"]
    assert spec["spec"]["name"] == "blog-post" and "inputs" not in spec["spec"]
    kinds = [x["type"] for x in lines[1:]]
    assert kinds == sorted(kinds, key=["run", "spec", "node", "step", "message", "event", "end"].index)
    assert [x["id"] for x in lines if x.get("type") == "node"] == ["research", "draft", "critique", "polish"]
    steps = {x["key"]: x["record"] for x in lines if x.get("type") == "step"}
    assert steps["research:2"]["kind"] == "tool" and steps["research:2"]["name"] == "notes.search"
    assert steps["polish:1"]["kind"] == "invoke"
    messages = [x for x in lines if x.get("type") == "message"]
    assert {"type": "message", "ref": MESSAGE_REF, "message": MESSAGE} in messages
    assert len(messages) == await broker.redis.hlen(broker.keys.messages(rid))
    events = [x for x in lines if x.get("type") == "event"]
    assert [e["id"] for e in events] == [e.id for e in await broker.events(rid)]
    assert lines[-1] == {
        "type": "end",
        "nodes": 4,
        "steps": len(await broker.redis.hgetall(broker.keys.steps(rid))),
        "messages": len(messages),
        "events": len(events),
    }

    # import the file's text into another prefix: a new id, the same run
    new = await import_run(dest, dumps(lines).splitlines())
    assert new != rid
    await assert_same_run(broker, rid, dest, new)
    assert (await dest.get_run(new))["imported_from"] == rid
    assert await dest.redis.zscore(dest.keys.runs, new) == int(run["fields"]["created_at"])
    assert await dest.redis.zscore(dest.keys.done, new) == int(run["fields"]["finished_at"])
    assert await dest.redis.hget(dest.keys.spec(spec["spec_hash"]), "refs") == "1"

    # round trip: export again, same lines but for the id, the time and imported_from
    again = await export_run(dest, new)
    assert again[0]["run_id"] == new and again[1]["fields"]["imported_from"] == rid
    assert normalized(again) == normalized(lines)

    # a second import (the dicts themselves) shares the stored spec; retention applies
    second = await import_run(dest, again)
    assert await dest.redis.hget(dest.keys.spec(spec["spec_hash"]), "refs") == "2"
    assert (await dest.get_run(second))["imported_from"] == new
    pruned = await dest.prune_runs(await dest.server_time_ms(), run_ids=[new, second])
    assert sorted(pruned.run_ids) == sorted([new, second])
    assert await keyspace(dest) == set()  # run keys, indexes and the spec: all gone


async def test_keep_id_never_overwrites(broker: Broker, dest: Broker) -> None:
    rid = await finished_blog_run(broker)
    lines = await export_run(broker, rid)
    assert await import_run(dest, lines, keep_id=True) == rid
    before = await keyspace(dest)
    with pytest.raises(RunExists, match=f"run {rid} already exists"):
        await import_run(dest, lines, keep_id=True)
    with pytest.raises(RunExists):
        await import_run(broker, lines, keep_id=True)  # onto the original itself
    assert await keyspace(dest) == before
    assert await import_run(dest, lines, run_id="chosen-id") == "chosen-id"
    with pytest.raises(ValueError, match="bad run id"):
        await import_run(dest, lines, run_id="x}{y")


async def test_export_refuses_unknown_and_unfinished_runs(broker: Broker) -> None:
    with pytest.raises(RunNotFound, match="no run 'nope'"):
        await export_run(broker, "nope")
    s = await submit_spec(broker, make_spec([{"id": "a", "agent": "noop"}]))  # no workers: PENDING
    with pytest.raises(RunNotTerminal, match=f"run {s.run_id} is PENDING, not finished"):
        await export_run(broker, s.run_id)


async def test_old_run_with_inline_spec_exports_in_shared_form(broker: Broker) -> None:
    """A run from before shared specs holds its whole spec in the run hash: the export is
    the same as the shared form's."""
    rid = await finished_blog_run(broker)
    shared = await export_run(broker, rid)
    run = await broker.get_run(rid)
    body = await broker.redis.hget(broker.keys.spec(run["spec_hash"]), "json")
    await broker.redis.hset(broker.keys.run(rid), "spec", join_spec(body, run["inputs"]))
    await broker.redis.hdel(broker.keys.run(rid), "spec_hash", "inputs")
    inline = await export_run(broker, rid)
    assert inline[1:] == shared[1:]


def _bad_files(lines: list[str]) -> dict[str, tuple[list[str], str]]:
    """Broken variants of an export's lines: case -> (lines, expected error)."""
    n = len(lines)
    head = json.loads(lines[0])
    spec = json.loads(lines[2])
    spec["spec"]["name"] = "edited"
    events = [i for i, x in enumerate(lines) if json.loads(x).get("type") == "event"]
    swapped = list(lines)
    swapped[events[0]], swapped[events[1]] = swapped[events[1]], swapped[events[0]]
    end = json.loads(lines[-1])
    return {
        "version": (
            [json.dumps({**head, "version": 2}), *lines[1:]],
            "line 1: unsupported export version 2 (this OAO reads version 1)",
        ),
        "format": (
            [json.dumps({**head, "format": "other"}), *lines[1:]],
            "line 1: not an OAO run export",
        ),
        "truncated": (lines[:-3], f"line {n - 3}: the file ends without its end line: it is truncated"),
        "cut-mid-line": ([*lines[:-3], lines[-3][:25]], f"line {n - 2}: not JSON"),
        "not-json": ([*lines[:5], "garbage", *lines[5:]], "line 6: not JSON"),
        "not-object": ([*lines[:5], "[1, 2]", *lines[5:]], "line 6: not a JSON object"),
        "empty": ([], "empty file: no header line"),
        "edited-spec": (
            [*lines[:2], json.dumps(spec), *lines[3:]],
            "line 3: the spec does not match its spec_hash",
        ),
        "event-order": (swapped, f"line {events[1] + 1}: event id"),
        "counts": (
            [*lines[:-1], json.dumps({**end, "events": end["events"] + 1})],
            f"line {n}: the end line counts",
        ),
        "after-end": ([*lines, lines[-1]], f"line {n + 1}: a line after the end line"),
        "order": ([lines[0], lines[2], lines[1], *lines[3:]], "line 2: the run line must come"),
        "unknown-type": (
            [*lines[:3], json.dumps({"type": "bogus"}), *lines[3:]],
            "line 4: unknown line type 'bogus'",
        ),
    }


async def test_bad_files_are_refused_with_the_line_and_write_nothing(broker: Broker, dest: Broker) -> None:
    rid = await finished_blog_run(broker)
    lines = dumps(await export_run(broker, rid)).splitlines()
    for case, (bad, expected) in _bad_files(lines).items():
        with pytest.raises(FormatError) as info:
            await import_run(dest, bad)
        assert str(info.value).startswith(expected), (case, str(info.value))
        assert len(str(info.value).splitlines()) == 1
    assert await keyspace(dest) == set()


async def test_import_across_servers(redis_url: str, broker: Broker, valkey_server: EmbeddedServer) -> None:
    """A run exported from one server (the machine's Redis when configured) and imported
    into the other (the embedded Valkey), and back."""
    other_url = os.environ.get("OAO_TEST_REDIS_URL")
    if not other_url:
        pytest.skip("OAO_TEST_REDIS_URL is not set: one server only")
    if redis_url == other_url:
        other_url = valkey_server.url
    rid = await finished_blog_run(broker)
    p = f"oaotest-{uuid.uuid4().hex[:10]}"
    r = connect(other_url)
    try:
        other = Broker(r, p)
        new = await import_run(other, dumps(await export_run(broker, rid)).splitlines(), keep_id=True)
        assert new == rid
        await assert_same_run(broker, rid, other, new)
        d = await diff_runs(broker, rid, new, broker_b=other)
        assert d["identical"]
    finally:
        await r.aclose()
        await delete_prefix(other_url, p)


# ---------------------------------------------------------------- diff


async def test_diff_of_a_run_with_itself_and_its_import(broker: Broker, dest: Broker) -> None:
    rid = await finished_blog_run(broker)
    d = await diff_runs(broker, rid, rid)
    assert d["identical"] and d["counts"] == {"same": 4, "differs": 0, "only_in_a": 0, "only_in_b": 0}
    assert all(n["verdict"] == "same" and n["first_divergent_step"] is None for n in d["nodes"])
    assert d["totals"]["a"] == d["totals"]["b"]
    assert set(d["totals"]["delta"].values()) == {0}
    json.dumps(d)  # JSON-able
    new = await import_run(dest, await export_run(broker, rid))
    d2 = await diff_runs(broker, rid, new, broker_b=dest)
    assert d2["identical"] and d2["b"]["run_id"] == new


async def test_diff_of_runs_whose_model_replied_differently(broker: Broker) -> None:
    """critique's final model reply differs: critique and its dependent polish differ,
    research and draft are the same; the first divergent step shows both sides."""
    a = await finished_blog_run(broker)
    b = await finished_blog_run(broker, critique=NEW_CRITIQUE)
    d = await diff_runs(broker, a, b)
    verdicts = {n["id"]: n["verdict"] for n in d["nodes"]}
    assert verdicts == {"research": "same", "draft": "same", "critique": "differs", "polish": "differs"}
    assert not d["identical"] and d["counts"]["differs"] == 2
    nodes = {n["id"]: n for n in d["nodes"]}

    critique = nodes["critique"]
    assert critique["differences"] == ["output", "steps"]
    first = critique["first_divergent_step"]
    # seq 1: the model asks for word_count; 2: the tool; 3: the final reply, which differs
    assert first["seq"] == 3 and first["key"] == "critique:3" and first["differs_in"] == ["result"]
    assert first["a"]["kind"] == first["b"]["kind"] == "llm"
    assert first["a"]["request_hash"] == first["b"]["request_hash"]
    assert first["a"]["result"]["content"].startswith("Critique: the research notes run to")
    assert first["b"]["result"]["content"].startswith("Critique: too short; cite")
    assert first["a"]["usage"]["out"] > 0 and "in" in first["b"]["usage"]
    assert critique["a"]["output"] != critique["b"]["output"]

    polish = nodes["polish"]  # its task holds critique's output: the invoke's request differs
    assert polish["first_divergent_step"]["seq"] == 1
    assert polish["first_divergent_step"]["differs_in"] == ["request", "result"]

    ta, tb, delta = d["totals"]["a"], d["totals"]["b"], d["totals"]["delta"]
    assert delta["tokens_out"] == tb["tokens_out"] - ta["tokens_out"] != 0
    assert delta["steps"] == 0 and ta["steps"] == tb["steps"] > 0
    assert isinstance(delta["cost_usd"], float)


async def test_diff_nodes_only_in_one_run(broker: Broker) -> None:
    no_retry = {"retry": {"max_retries": 0}}
    a = await run_spec(
        broker,
        make_spec([{"id": "x", "agent": "noop"}, {"id": "y", "agent": "noop", "depends_on": ["x"]}]),
    )
    b = await run_spec(
        broker,
        make_spec([{"id": "x", "agent": "noop"}, {"id": "z", "agent": "broken"}], defaults=no_retry),
    )
    assert (await broker.get_run(b))["status"] == "FAILED"
    d = await diff_runs(broker, a, b)
    assert [(n["id"], n["verdict"]) for n in d["nodes"]] == [
        ("x", "same"),
        ("y", "only_in_a"),
        ("z", "only_in_b"),
    ]
    nodes = {n["id"]: n for n in d["nodes"]}
    assert nodes["y"]["b"] is None and nodes["y"]["a"]["status"] == "SUCCEEDED"
    assert nodes["z"]["a"] is None and nodes["z"]["b"]["status"] == "FAILED"
    assert nodes["z"]["b"]["error"]["type"] == "ValueError"
    assert d["totals"]["delta"]["nodes_failed"] == 1
    with pytest.raises(RunNotFound):
        await diff_runs(broker, a, "nope")


# ---------------------------------------------------------------- CLI


async def test_cli_export_import_diff(broker: Broker, dest: Broker, redis_url: str, tmp_path: Path) -> None:
    a = await finished_blog_run(broker)
    b = await finished_blog_run(broker, critique=NEW_CRITIQUE)
    src = ["--redis-url", redis_url, "--prefix", broker.keys.prefix]
    to = ["--redis-url", redis_url, "--prefix", dest.keys.prefix]
    f = tmp_path / "run.jsonl"

    r = cli("export", a, "-o", str(f), *src)
    assert r.returncode == 0 and r.stdout == "", r.stderr
    text = f.read_text(encoding="utf-8")
    lines = [json.loads(x) for x in text.splitlines()]
    assert lines[0]["run_id"] == a and lines[-1]["type"] == "end"
    r = cli("export", a, *src)  # stdout
    assert r.returncode == 0
    assert [json.loads(x) for x in r.stdout.splitlines()][1:] == lines[1:]

    r = cli("import", str(f), *to)
    assert r.returncode == 0, r.stderr
    new = r.stdout.strip()
    assert new and new != a
    await assert_same_run(broker, a, dest, new)
    r = cli("import", str(f), "--keep-id", "--json", *to)
    assert r.returncode == 0 and json.loads(r.stdout) == {"run_id": a}
    r = cli("import", str(f), "--keep-id", *to)
    assert r.returncode == 2 and r.stderr.startswith(f"error: {f}: run {a} already exists"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    # the same run across prefixes: identical
    r = cli("diff", a, new, *src, "--prefix-b", dest.keys.prefix, "--json", "--exit-code")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["identical"] is True

    # a changed model reply: a table, the first divergent step, the totals
    r = cli("diff", a, b, *src)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "different: 2 same, 2 differ, 0 only in A, 0 only in B" in out
    assert "critique:3 differs in result" in out and "#3 llm writer-model: result" in out
    assert "A result:" in out and "Critique: too short" in out and "tokens_out" in out
    r = cli("diff", a, b, "--exit-code", *src)
    assert r.returncode == 1

    # errors: one line on stderr, exit 2, no traceback
    t = tmp_path / "truncated.jsonl"
    t.write_text("".join(x + "\n" for x in text.splitlines()[:-2]), encoding="utf-8")
    n = len(text.splitlines()) - 2
    bad = {
        ("export", "nope", *src): "error: no run 'nope'",
        ("import", str(t), *to): f"error: {t}: line {n}: the file ends without its end line",
        ("import", str(tmp_path / "missing.jsonl"), *to): "error: cannot read",
        ("diff", a, "nope", *src): "error: no run 'nope'",
    }
    for args, expected in bad.items():
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith(expected) and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr
    s = await submit_spec(broker, make_spec([{"id": "a", "agent": "noop"}]))
    r = cli("export", s.run_id, "-o", str(tmp_path / "pending.jsonl"), *src)
    assert r.returncode == 2 and "is PENDING, not finished" in r.stderr
    assert not (tmp_path / "pending.jsonl").exists()
    for cmd in ("export", "import", "diff"):
        h = cli(cmd, "--help")
        assert h.returncode == 0 and "Usage:" in h.stdout, cmd
