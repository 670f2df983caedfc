"""Replay and fork on real Redis: a run re-driven against its record executes nothing
live and reproduces its outputs and normalized event trace; replays from a step go
live there; forks change the spec or a recorded result; divergent code is caught with
a field-level diff; model messages are stored once per run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import replay_agents
from oao_testkit import make_spec, run_spec

from oao_common.broker import Broker
from oao_common.hashing import canonical_json, sha256_hex
from oao_common.ledger import message_refs, resolve_request
from oao_common.spec import Spec
from oao_scheduler.diff import diff_runs
from oao_scheduler.replay import ReplayError, StepRef, normalized_trace, replay, verify_replay

MODELS = {
    "m": {
        "provider": "scripted",
        "cycle": True,
        "replies": ["Notes {{ turn }} on {{ task }}", "More about: {{ last }}", "Done with {{ task }}"],
    }
}
AGENTS = {
    "researcher": {"kind": "python", "entrypoint": "replay_agents:researcher", "tools": ["words"]},
    "writer": {"kind": "python", "entrypoint": "replay_agents:writer", "tools": ["words"]},
    "summarizer": {"kind": "python", "entrypoint": "replay_agents:summarize"},
}
TOOLS = {"words": {"entrypoint": "replay_agents:words", "idempotent": True}}
NODES = [
    {"id": "research", "agent": "researcher", "task": "Research {{ inputs.topic }}"},
    {"id": "angle", "agent": "researcher", "task": "Find an angle on {{ inputs.topic }}"},
    {"id": "draft", "agent": "writer", "task": "{{ inputs.topic }}", "depends_on": ["research", "angle"]},
    {"id": "summary", "agent": "summarizer", "task": "{{ nodes.draft.output }}", "depends_on": ["draft"]},
]


def spec(topic: str = "AI governance") -> Spec:
    return make_spec(
        NODES, name="replayable", models=MODELS, agents=AGENTS, tools=TOOLS, inputs={"topic": topic}
    )


@pytest.fixture(autouse=True)
def ledger_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "effects.log"
    monkeypatch.setenv("OAO_TEST_LEDGER", str(path))
    monkeypatch.setattr(replay_agents, "VARIANT", "original")
    return path


def effects(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


async def outputs(broker: Broker, rid: str) -> dict[str, Any]:
    run = await broker.get_run(rid)
    nodes = await broker.get_nodes(rid, run["node_ids"].split(","))
    return {n["id"]: (n.get("status"), json.loads(n.get("output") or "null")) for n in nodes}


async def test_full_replay_executes_nothing_and_reproduces_outputs_and_trace(
    broker: Broker, ledger_file: Path
) -> None:
    rid = await run_spec(broker, spec(), concurrency=4)
    assert (await broker.get_run(rid))["status"] == "SUCCEEDED"
    done = effects(ledger_file)
    assert done == 7  # 3 + 3 research/angle tool calls, 1 in draft

    r = await replay(broker, rid)
    assert r.strict and r.copied == [] and r.live == []
    assert r.seeded == {"research": 9, "angle": 9, "draft": 3, "summary": 1}
    await run_spec_on(broker, r.run_id)
    assert effects(ledger_file) == done, "a full replay executed a tool live"
    assert await outputs(broker, r.run_id) == await outputs(broker, rid)
    assert normalized_trace(await broker.events(r.run_id)) == normalized_trace(await broker.events(rid))
    assert await verify_replay(broker, rid, r.run_id) == []
    run = await broker.get_run(r.run_id)
    assert run["replay_of"] == rid and run["status"] == "SUCCEEDED" and run["steps"] == "0"


async def run_spec_on(broker: Broker, rid: str, timeout_s: float = 30) -> str:
    """Run the already-submitted run ``rid`` on an in-process fleet until it ends."""
    from oao_testkit import fleet, wait_until

    async with fleet(broker, concurrency=4):
        await wait_until(lambda: broker.run_is_terminal(rid), True, timeout_s, f"run {rid} to end")
    return str((await broker.get_run(rid))["status"])


async def test_replay_from_a_step_serves_the_steps_before_it_and_goes_live_after(
    broker: Broker, ledger_file: Path
) -> None:
    rid = await run_spec(broker, spec(), concurrency=4)
    before = await outputs(broker, rid)
    done = effects(ledger_file)
    r = await replay(broker, rid, from_step=StepRef("research", 5))
    assert (r.copied, r.seeded, sorted(r.live)) == (["angle"], {"research": 4}, ["draft", "summary"])
    assert not r.strict and r.point == "research:5"
    events = await broker.events(r.run_id)
    copied = [e for e in events if e.type == "NODE_SUCCEEDED"]
    assert [(e.node, e.data) for e in copied] == [("angle", {"copied_from": rid})]
    assert await run_spec_on(broker, r.run_id) == "SUCCEEDED"
    assert effects(ledger_file) == done + 3 + 1  # research's tools 5, 7, 9 and draft's
    after = await outputs(broker, r.run_id)
    assert after["research"] == before["research"]  # same replies, same recorded random value
    assert after["angle"] == before["angle"]
    assert after["draft"][1] != before["draft"][1]  # ctx.now() ran live again
    replayed = [e for e in await broker.events(r.run_id) if e.type == "STEP_REPLAYED"]
    assert [(e.node, e.data["seq"]) for e in replayed] == [("research", s) for s in (1, 2, 3, 4)]

    r2 = await replay(broker, rid, from_step=StepRef("angle", 1))
    assert (r2.copied, r2.seeded, sorted(r2.live)) == (["research"], {}, ["angle", "draft", "summary"])
    assert await run_spec_on(broker, r2.run_id) == "SUCCEEDED"
    assert (await outputs(broker, r2.run_id))["angle"][1]["id"] != before["angle"][1]["id"]  # a new uuid


async def test_fork_changes_the_spec_or_a_recorded_result(broker: Broker) -> None:
    rid = await run_spec(broker, spec(), concurrency=4)
    orig = await broker.get_run(rid)
    f = await replay(
        broker, rid, from_step=StepRef("draft", 1), sets=["result.content=What if the model said this"]
    )
    assert f.seeded == {"draft": 1} and f.overrides == ['result.content="What if the model said this"']
    assert f.exec_hash != orig["exec_hash"]
    assert await run_spec_on(broker, f.run_id) == "SUCCEEDED"
    out = await outputs(broker, f.run_id)
    assert out["draft"][1].startswith("What if the model said this (6 words")
    assert out["summary"][1].startswith("summary of What if the model said this")
    assert out["research"] == (await outputs(broker, rid))["research"]
    run = await broker.get_run(f.run_id)
    assert json.loads(run["overrides"]) == f.overrides and run["replay_point"] == "draft:1"
    d = await diff_runs(broker, rid, f.run_id)  # copied nodes compare like their originals
    verdicts = {n["id"]: n["verdict"] for n in d["nodes"]}
    assert verdicts == {"research": "same", "angle": "same", "draft": "differs", "summary": "differs"}
    first = next(n for n in d["nodes"] if n["id"] == "draft")["first_divergent_step"]
    assert (first["key"], first["differs_in"]) == ("draft:1", ["result"])

    g = await replay(
        broker,
        rid,
        from_step=StepRef("draft", 1),
        sets=["nodes.draft.task=robots", "models.m.replies=[Short answer]"],
        inputs={"topic": "ignored by copied nodes"},
    )
    assert g.exec_hash not in (orig["exec_hash"], f.exec_hash)
    assert await run_spec_on(broker, g.run_id) == "SUCCEEDED"
    draft = (await outputs(broker, g.run_id))["draft"][1]
    assert draft.startswith("Short answer (2 words")
    node = (await broker.get_steps(g.run_id))["draft:1"]
    assert node["request"]["kind"] == "llm" and len(node["request"]["messages"]) == 1


@pytest.mark.parametrize(
    ("variant", "wanted"),
    [
        ("edited", ["research#5 (tool words)", "args.text: "]),
        ("extra", ["research#10 (clock now) is not in the record"]),
        ("fewer", ["research#8 (llm m) is in the record, but the replayed code ended without issuing it"]),
    ],
)
async def test_divergent_code_fails_the_replay_with_what_differed(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, variant: str, wanted: list[str]
) -> None:
    rid = await run_spec(broker, spec(), concurrency=4)
    monkeypatch.setattr(replay_agents, "VARIANT", variant)
    r = await replay(broker, rid)
    assert await run_spec_on(broker, r.run_id) == "FAILED"
    node = (await broker.get_nodes(r.run_id, ["research"]))[0]
    err = json.loads(node["error"])
    assert err["type"] == "NonDeterminismError", err
    for w in wanted:
        assert w in err["message"], err["message"]
    if variant == "edited":
        assert any(d.startswith("args.text: ") and "->" in d for d in err["diff"])
        assert err["diff"][0].split(" -> ")[1].upper() == err["diff"][0].split(" -> ")[1]
    problems = await verify_replay(broker, rid, r.run_id)
    assert any("NonDeterminismError" in p for p in problems), problems


async def test_model_messages_are_stored_once_per_run(broker: Broker) -> None:
    rid = await run_spec(broker, spec(), concurrency=4)
    steps = await broker.get_steps(rid)
    stored = await broker.all_messages(rid)
    full = 0
    for node in ("research", "angle", "draft"):
        records = {
            int(k.split(":")[1]): v
            for k, v in steps.items()
            if k.startswith(f"{node}:") and k.count(":") == 1
        }
        llm = {seq: rec for seq, rec in records.items() if rec["kind"] == "llm"}
        for seq, rec in llm.items():
            # the record's hash is the hash of the request it resolves to
            assert sha256_hex(resolve_request(rec["request"], stored, records)) == rec["request_hash"]
            refs = message_refs(rec["request"], records)
            assert refs is not None and set(refs) <= set(stored)
            full += len(refs)
            if seq != min(llm):  # a later call stores only what it adds to the conversation
                assert rec["request"]["messages_after"] < seq and len(rec["request"]["messages"]) == 2
    assert full == 2 + 4 + 6 + 2 + 4 + 6 + 1  # research, angle (growing), draft
    assert len(stored) <= 12 < full  # each distinct message once (the system prompt, ...)
    assert all(canonical_json(json.loads(b)) == b for b in stored.values())


async def test_impossible_replays_are_refused_with_one_line(broker: Broker) -> None:
    rid = await run_spec(broker, spec(), concurrency=4)
    cases = [
        ({"run_id": "nope"}, "no run 'nope'"),
        ({"from_step": StepRef("ghost", 1)}, "has no node 'ghost'"),
        ({"from_step": StepRef("draft", 9)}, "recorded 3 steps: --from-step can be draft:1 .. draft:4"),
        ({"sets": ["nodes.draft.task=x"]}, "a fork needs a point"),
        ({"from_step": StepRef("draft", 1), "sets": ["nodes.ghost.task=x"]}, "no item with id 'ghost'"),
        ({"from_step": StepRef("draft", 4), "sets": ["result=x"]}, "no recorded result to override"),
        (
            {"from_step": StepRef("draft", 1), "sets": ["defaults.policy.max_steps=-1"]},
            "changed spec is invalid",
        ),
    ]
    for kw, want in cases:
        with pytest.raises(ReplayError) as e:
            await replay(broker, kw.pop("run_id", rid), **kw)
        assert want in str(e.value) and "\n" not in str(e.value)
    for bad in ("draft", "draft:0", ":3", "a b:1"):
        with pytest.raises(ReplayError, match="not a step"):
            StepRef.parse(bad)
