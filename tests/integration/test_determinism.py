"""The determinism bar: replay 100 executions and get the exact same log trace.

100 runs of a non-trivial spec (parallel branches, a join, tool calls doing real work,
the scripted model with replies that vary by run and turn, agents that read the clock,
randomness and uuids through the context) are replayed in full. Every replay must
reproduce each node's status and output and the normalized event trace
(:func:`oao_scheduler.replay.normalized_trace`: ids, timestamps, workers and attempts
left out, order within a node kept), and execute nothing live.

The check has teeth: the same comparison between a run and a second execution of the
same spec (no ledger: every step live) must report differences, since the clock, the
random values and the uuids change; ``test_a_live_rerun_is_told_apart`` shows it
does. Disabling the ledger lookup in ``AgentContext._step`` (a mutation tried while
writing this test) fails the 100-run test: every replayed node stops with
``NonDeterminismError: step ... is not in the record``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from oao_testkit import fleet, make_spec, wait_until
from test_replay import AGENTS, MODELS, NODES, TOOLS

from oao_common.broker import Broker
from oao_common.connection import EmbeddedServer
from oao_scheduler.replay import replay, verify_replay
from oao_scheduler.submit import submit_spec

RUNS = 100


@pytest.fixture
def redis_url(valkey_server: EmbeddedServer) -> str:
    """One server: the 100 runs and their replays take a few seconds each way."""
    return valkey_server.url


@pytest.fixture(autouse=True)
def ledger_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "effects.log"
    monkeypatch.setenv("OAO_TEST_LEDGER", str(path))
    return path


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


async def run_all(broker: Broker, run_ids: list[str]) -> None:
    async def ended() -> int:
        return sum([await broker.run_is_terminal(r) for r in run_ids])

    await wait_until(ended, len(run_ids), 120, f"{len(run_ids)} runs to end")


async def originals(broker: Broker, n: int) -> list[str]:
    models = {
        "m": {**MODELS["m"], "replies": [*MODELS["m"]["replies"], "Run {{ inputs.topic }} turn {{ turn }}"]}
    }
    ids = []
    for i in range(n):
        spec = make_spec(
            NODES,
            name="determinism",
            models=models,
            agents=AGENTS,
            tools=TOOLS,
            inputs={"topic": f"topic {i}"},
        )
        ids.append((await submit_spec(broker, spec)).run_id)
    await run_all(broker, ids)
    for rid in ids:
        assert (await broker.get_run(rid))["status"] == "SUCCEEDED", rid
    return ids


async def test_100_replays_reproduce_outputs_and_traces(broker: Broker, ledger_file: Path) -> None:
    async with fleet(broker, workers=2, concurrency=16):
        ids = await originals(broker, RUNS)
        executed = lines(ledger_file)
        assert executed == 7 * RUNS
        replays = await asyncio.gather(*(replay(broker, rid) for rid in ids))
        await run_all(broker, [r.run_id for r in replays])
    assert lines(ledger_file) == executed, "a replay executed a tool live"
    problems = {r.replay_of: await verify_replay(broker, r.replay_of, r.run_id) for r in replays}
    assert {k: v for k, v in problems.items() if v} == {}
    served = 0
    for r in replays:
        run = await broker.get_run(r.run_id)
        assert run["status"] == "SUCCEEDED" and run["steps"] == "0"  # nothing recorded anew
        served += sum(1 for e in await broker.events(r.run_id) if e.type == "STEP_REPLAYED")
    assert served == RUNS * (9 + 9 + 3 + 1)  # every recorded step came from the ledger


async def test_a_live_rerun_is_told_apart(broker: Broker, ledger_file: Path) -> None:
    async with fleet(broker, workers=1, concurrency=16):
        ids = await originals(broker, 5)
        again = await originals(broker, 5)  # the same specs executed again: no ledger
    for first, second in zip(ids, again, strict=True):
        problems = await verify_replay(broker, first, second)
        assert any(p.startswith("node research: output") for p in problems), problems
        assert any(p.startswith("node angle: output") for p in problems), problems
