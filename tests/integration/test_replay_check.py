"""``oao-scheduler replay --check``: runs exported from a real Redis, replayed against
the agent code installed now in a private embedded Valkey (the real binary, in-process
workers); a code change that diverges is reported with its differences, exit 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from oao_testkit import run_spec
from proc import cli, env
from test_replay import spec

from oao_common.broker import Broker
from oao_scheduler.export import dumps, export_run


@pytest.fixture(autouse=True)
def ledger_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "effects.log"
    monkeypatch.setenv("OAO_TEST_LEDGER", str(path))
    return path


async def exported(broker: Broker, tmp_path: Path, n: int) -> list[str]:
    files = []
    for i in range(n):
        rid = await run_spec(broker, spec(f"topic {i}"), concurrency=4)
        path = tmp_path / f"run-{i}.jsonl"
        path.write_text(dumps(await export_run(broker, rid)))
        files.append(str(path))
    return files


async def test_check_passes_for_unchanged_code_and_fails_for_a_divergent_change(
    broker: Broker, tmp_path: Path, ledger_file: Path
) -> None:
    files = await exported(broker, tmp_path, 2)
    effects = ledger_file.read_text()
    res = cli("replay", "--check", *files, "--json", timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(res.stdout)
    assert doc["ok"] is True and [r["ok"] for r in doc["runs"]] == [True, True]
    assert ledger_file.read_text() == effects  # nothing executed live

    res = cli("replay", "--check", *files, timeout=180, env=env(OAO_TEST_AGENT_VARIANT="edited"))
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stdout.count("DIVERGED") == 2
    assert "NonDeterminismError: step research#5 (tool words)" in res.stdout
    assert 'args.text: "Notes 0 on Research topic 0' in res.stdout and '-> "NOTES 0 ON RESEARCH' in res.stdout
    assert "0 of 2 runs replayed identically" in res.stderr


async def test_check_refuses_unreadable_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"format": "oao-run", "version": 99}\n')
    for args, want in [
        ((str(tmp_path / "missing.jsonl"),), "cannot read"),
        ((str(bad),), "version"),
    ]:
        res = cli("replay", "--check", *args, timeout=120)
        assert res.returncode == 2, res.stdout + res.stderr
        assert want in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    res = cli("replay", "a", "b", timeout=60)
    assert res.returncode == 2 and "one RUN_ID" in res.stderr
