"""End to end through the real command-line programs, as a user runs them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from proc import cli, start_serve, start_worker, stop

from oao_common.connection import connect

BAD_SPECS = {
    "yaml": ("name: x\nnodes: [\n", "YAML syntax error at line"),
    "duplicate": (
        "name: x\nagents: {p: {kind: python, entrypoint: 'm:f'}}\n"
        "nodes: [{id: a, agent: p}, {id: a, agent: p}]\n",
        "nodes[1] (a).id: duplicate node id 'a'",
    ),
    "unknown-agent": (
        "name: x\nagents: {p: {kind: python, entrypoint: 'm:f'}}\nnodes: [{id: a, agent: q}]\n",
        "nodes[0] (a).agent: unknown agent 'q'",
    ),
    "unknown-tool": (
        "name: x\nagents: {p: {kind: python, entrypoint: 'm:f', tools: [nope]}}\n"
        "nodes: [{id: a, agent: p}]\n",
        "agents.p.tools: unknown tool 'nope'",
    ),
    "missing-dep": (
        "name: x\nagents: {p: {kind: python, entrypoint: 'm:f'}}\n"
        "nodes: [{id: a, agent: p, depends_on: [b]}]\n",
        "nodes[0] (a).depends_on: unknown node 'b'",
    ),
    "cycle": (
        "name: x\nagents: {p: {kind: python, entrypoint: 'm:f'}}\n"
        "nodes: [{id: a, agent: p, depends_on: [b]}, {id: b, agent: p, depends_on: [a]}]\n",
        "dependency cycle a -> b -> a",
    ),
    "bad-type": (
        "name: x\nagents: {p: {kind: python, entrypoint: 'm:f'}}\n"
        "nodes: [{id: a, agent: p, priority: high}]\n",
        "nodes[0] (a).priority (line 3)",
    ),
}


def test_run_blog_example_embedded() -> None:
    r = cli("run", "examples/blog_post.yaml", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["status"] == "SUCCEEDED"
    nodes = {n["id"]: n for n in report["nodes"]}
    assert [n["status"] for n in report["nodes"]] == ["SUCCEEDED"] * 4
    assert nodes["polish"]["output"].startswith("# Why AI governance needs guardrails")
    assert nodes["research"]["tool_calls"] == 1 and nodes["research"]["tokens_in"] > 0
    assert [h["state"] for h in nodes["draft"]["state_history"]] == ["READY", "RUNNING", "SUCCEEDED"]
    assert report["totals"]["tool_calls"] == 3


def test_run_prints_report_and_progress() -> None:
    r = cli("run", "examples/blog_post.yaml")
    assert r.returncode == 0, r.stderr
    assert "Execution report" in r.stdout and "SUCCEEDED" in r.stdout
    assert "research: RUNNING" in r.stderr  # progress lines when not on a terminal


def test_runaway_fails_by_policy_without_retry() -> None:
    r = cli("run", "examples/runaway_agent.yaml", "--json")
    assert r.returncode == 1
    report = json.loads(r.stdout)
    [node] = report["nodes"]
    assert report["status"] == "FAILED" and node["status"] == "FAILED"
    assert node["error"]["rule"] == "max_tokens" and node["retries"] == 0 and node["attempt"] == 1
    assert node["error"]["reason"].startswith("PolicyViolation: Max Token Limit Exceeded")


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
async def test_bad_spec_exits_2_and_writes_nothing(
    case: str, tmp_path: Path, redis_url: str, prefix: str
) -> None:
    text, expected = BAD_SPECS[case]
    f = tmp_path / "dag.yaml"
    f.write_text(text)
    r = cli("submit", str(f), "--redis-url", redis_url, "--prefix", prefix)
    assert r.returncode == 2
    assert expected in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    conn = connect(redis_url)
    assert [k async for k in conn.scan_iter(match=f"{prefix}:*")] == []
    await conn.aclose()


def test_unreachable_redis_is_one_clear_line(tmp_path: Path) -> None:
    r = cli("status", "nope", "--redis-url", "redis://127.0.0.1:1/0")
    assert r.returncode == 3
    assert r.stderr.startswith("error: cannot reach Redis at redis://127.0.0.1:1/0")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_validate_and_help() -> None:
    r = cli("validate", "examples/blog_post.yaml")
    assert r.returncode == 0 and "valid (4 nodes" in r.stdout
    for cmd in ("run", "submit", "status", "events", "cancel", "runs", "serve", "workers", "report"):
        h = cli(cmd, "--help")
        assert h.returncode == 0 and "Usage:" in h.stdout, cmd


def test_distributed_serve_workers_submit_wait(redis_url: str, prefix: str, tmp_path: Path) -> None:
    """serve + two oao-worker processes + submit --wait, then status / events / runs."""
    procs = [
        start_serve(redis_url, prefix, "--heartbeat-ttl", "3", log=tmp_path / "serve.log"),
        start_worker(redis_url, prefix, "--concurrency", "4", log=tmp_path / "w1.log"),
        start_worker(redis_url, prefix, "--concurrency", "4", log=tmp_path / "w2.log"),
    ]
    try:
        base = ["--redis-url", redis_url, "--prefix", prefix]
        r = cli("submit", "examples/blog_post.yaml", "--wait", "--timeout", "60", *base)
        assert r.returncode == 0, r.stderr + (tmp_path / "w1.log").read_text()
        rid = r.stdout.splitlines()[0].strip()
        st = json.loads(cli("status", rid, "--json", *base).stdout)
        assert st["status"] == "SUCCEEDED"
        assert {n["id"]: n["status"] for n in st["nodes"]} == dict.fromkeys(
            ["research", "draft", "critique", "polish"], "SUCCEEDED"
        )
        ev = [json.loads(line) for line in cli("events", rid, "--json", *base).stdout.splitlines()]
        types = [e["type"] for e in ev]
        assert types[0] == "RUN_SUBMITTED" and types[-1] == "RUN_SUCCEEDED"
        assert types.count("STEP_COMPLETED") == 10 and types.count("NODE_SUCCEEDED") == 4
        human = cli("events", rid, *base).stdout
        assert "STEP_COMPLETED" in human and "research#1" in human
        runs = json.loads(cli("runs", "--json", *base).stdout)
        assert runs[0]["id"] == rid and runs[0]["status"] == "SUCCEEDED"
        ws = json.loads(cli("workers", "--json", *base).stdout)
        assert len([w for w in ws if w["alive"]]) == 2
        # the same key twice: one run
        k = ["--idempotency-key", f"k-{time.time()}"]
        a = cli("submit", "examples/blog_post.yaml", "--json", *k, *base)
        b = cli("submit", "examples/blog_post.yaml", "--json", *k, *base)
        assert json.loads(a.stdout)["run_id"] == json.loads(b.stdout)["run_id"]
        assert json.loads(b.stdout)["created"] is False
    finally:
        stop(*procs)
    w1 = (tmp_path / "w1.log").read_text()
    assert '"event": "worker.stopped"' in w1  # SIGTERM -> graceful stop


def test_sigterm_hands_back_in_flight_node(redis_url: str, prefix: str, tmp_path: Path) -> None:
    import asyncio

    spec = tmp_path / "slow.yaml"
    spec.write_text(
        "name: slow\nagents: {s: {kind: python, entrypoint: 'oao_test_agents:sleeper'}}\n"
        "nodes: [{id: slow, agent: s, task: '60'}]\n"
    )
    base = ["--redis-url", redis_url, "--prefix", prefix]
    w = start_worker(redis_url, prefix, "--grace-period", "0.5", log=tmp_path / "w.log")
    try:
        rid = cli("submit", str(spec), *base).stdout.strip()

        async def node_status() -> dict[str, str]:
            c = connect(redis_url)
            h = await c.hgetall(f"{prefix}:run:{{{rid}}}:node:slow")
            q = await c.lrange(f"{prefix}:q:default", 0, -1)
            await c.aclose()
            return {**h, "queue": ",".join(q)}

        deadline = time.monotonic() + 30
        while asyncio.run(node_status()).get("status") != "RUNNING":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        w.terminate()  # SIGTERM
        assert w.wait(30) == 0
        n = asyncio.run(node_status())
        assert n["status"] == "READY" and "lease" not in n
        assert n["queue"] == f"{rid}/slow"
        ev = cli("events", rid, *base).stdout
        assert "NODE_HANDED_BACK" in ev
    finally:
        stop(w)


def test_check_imports_rejects_entrypoints_that_fail_to_import(tmp_path: Path) -> None:
    spec = tmp_path / "imports.yaml"
    spec.write_text(
        "name: x\n"
        "agents: {a: {kind: python, entrypoint: 'nosuchmod_xyz:f'}}\n"
        "tools: {t: {entrypoint: 'os:nope_attr'}}\n"
        "nodes: [{id: n, agent: a}]\n"
    )
    plain = cli("validate", str(spec))
    assert plain.returncode == 0, plain.stderr  # without the check, the spec is valid
    no_redis = ["--redis-url", "redis://127.0.0.1:1/0"]  # refused before any connection
    for args in (
        ["validate", "--check-imports", str(spec)],
        ["submit", "--check-imports", str(spec), *no_redis],
        ["run", str(spec)],
    ):
        r = cli(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr
        assert any("agents.a.entrypoint: cannot import 'nosuchmod_xyz:f'" in line for line in lines), lines
        assert any("tools.t.entrypoint: 'os:nope_attr'" in line for line in lines), lines
