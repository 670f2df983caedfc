"""MCP tool servers as OAO tools, against real MCP server processes (tests/mcp_server.py,
written with the ``mcp`` SDK's server API) over stdio and over streamable HTTP on
127.0.0.1: governed, idempotency-keyed, recorded and replayed like any tool."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from oao_testkit import make_spec, of_type, run_spec

from oao_common.broker import Broker
from oao_common.errors import SpecError, TransientError, TrustError
from oao_common.spec import ToolSpec, parse_spec
from oao_common.trust import TrustPolicy
from oao_scheduler.replay import replay
from oao_worker.context import tool_idempotency_key
from oao_worker.mcp_tools import MCPTool, connect_mcp_tools

SERVER = str(Path(__file__).resolve().parents[1] / "mcp_server.py")
COMMAND = [sys.executable, SERVER]
DEFAULTS = {"retry": {"max_retries": 0}}


def calls_of(log: Path) -> list[dict[str, Any]]:
    """The tool calls the server process really served."""
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def mcp_tools(log: Path, **mcp: Any) -> dict[str, Any]:
    return {"calc": {"mcp": {"command": COMMAND, "env": {"MCP_LOG": str(log)}, **mcp}}}


def scripted(*replies: Any) -> dict[str, Any]:
    return {"m": {"provider": "scripted", "replies": list(replies)}}


def call(name: str, **args: Any) -> dict[str, Any]:
    return {"content": "", "tool_calls": [{"name": name, "args": args}]}


async def test_stdio_server_tools_run_governed_recorded_and_replayed(broker: Broker, tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    spec = make_spec(
        [{"id": "a", "agent": "calc", "task": "add 2 and 3, then shout"}],
        agents={"calc": {"kind": "llm", "model": "m", "tools": ["calc.add", "calc.shout"]}},
        models=scripted(
            call("calc.add", a=2, b=3),
            call("calc.shout", text="sum is {{ tool_results[0] }}"),
            "done: {{ tool_results[0] }}",
        ),
        tools=mcp_tools(log),
        defaults=DEFAULTS,
    )
    rid = await run_spec(broker, spec)

    [n] = await broker.get_nodes(rid, ["a"])
    assert n["status"] == "SUCCEEDED", n.get("error")
    assert json.loads(n["output"]) == "done: SUM IS 5"
    assert n["tool_calls"] == "2"
    served = calls_of(log)
    assert [c["tool"] for c in served] == ["add", "shout"]
    steps = await broker.get_steps(rid)
    tool_steps = [
        steps[k] for k in sorted(steps) if not k.endswith(":started") and steps[k]["kind"] == "tool"
    ]
    assert [s["name"] for s in tool_steps] == ["calc.add", "calc.shout"]
    assert tool_steps[0]["result"] == {"ok": True, "value": 5}
    # each call carried its step's idempotency key (and run, node, step) in _meta
    key = tool_idempotency_key(rid, "a", "calc.add", {"a": 2, "b": 3}, 2)
    assert tool_steps[0]["idempotency_key"] == key
    assert served[0]["meta"] == {
        "oao/idempotency_key": key,
        "oao/run_id": rid,
        "oao/node_id": "a",
        "oao/step": 2,
    }
    ev = await broker.events(rid)
    assert [e.data["name"] for e in of_type(ev, "STEP_STARTED")] == ["calc.add", "calc.shout"]

    # a full replay serves the tool results from the record: the server is not called
    r = await replay(broker, rid)
    from oao_testkit import fleet, wait_until

    async with fleet(broker):
        await wait_until(lambda: broker.run_is_terminal(r.run_id), True, 30, "the replay to end")
    [n2] = await broker.get_nodes(r.run_id, ["a"])
    assert n2["status"] == "SUCCEEDED" and n2["output"] == n["output"]
    assert len(calls_of(log)) == 2


async def test_allow_and_deny_lists_apply_to_mcp_tools(broker: Broker, tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    spec = make_spec(
        [{"id": "denied", "agent": "d", "task": "x"}, {"id": "unlisted", "agent": "u", "task": "x"}],
        agents={
            "d": {"kind": "llm", "model": "m", "tools": ["calc.add"], "deny_tools": ["calc.add"]},
            "u": {"kind": "llm", "model": "m", "tools": ["calc.shout"]},
        },
        models=scripted(call("calc.add", a=1, b=1), "never"),
        tools=mcp_tools(log),
        defaults=DEFAULTS,
    )
    rid = await run_spec(broker, spec)

    for n in await broker.get_nodes(rid, ["denied", "unlisted"]):
        err = json.loads(n["error"])
        assert n["status"] == "FAILED" and err["rule"] == "tool_not_allowed", err
    assert calls_of(log) == []  # refused before anything reached the server


async def test_a_tool_error_goes_back_to_the_model(broker: Broker, tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    spec = make_spec(
        [{"id": "a", "agent": "calc", "task": "x"}],
        agents={"calc": {"kind": "llm", "model": "m", "tools": ["calc.fail"]}},
        models=scripted(call("calc.fail", reason="disk on fire"), "saw: {{ last }}"),
        tools=mcp_tools(log),
        defaults=DEFAULTS,
    )
    rid = await run_spec(broker, spec)

    [n] = await broker.get_nodes(rid, ["a"])
    assert n["status"] == "SUCCEEDED"
    out = json.loads(n["output"])
    assert out.startswith("saw: error: MCPToolError: calc.fail: ") and out.endswith("disk on fire")


async def test_the_server_gets_a_minimal_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OAO_TEST_SECRET_SETTING", "s3cret")
    tools, conns = await connect_mcp_tools(
        {
            "calc": ToolSpec.model_validate(
                mcp_tools(tmp_path / "log", env={"EXTRA": "1", "MCP_LOG": str(tmp_path / "env-log")})["calc"]
            )
        }
    )
    try:
        from oao_worker.tools import ToolCallInfo

        names = await tools["calc.env_names"].call({}, ToolCallInfo("k"))
    finally:
        for c in conns:
            await c.aclose()
    assert "EXTRA" in names and "MCP_LOG" in names and "PATH" in names
    assert "OAO_TEST_SECRET_SETTING" not in names  # the worker's own variables stay home


async def test_tools_subset_and_schema(tmp_path: Path) -> None:
    spec = ToolSpec.model_validate(mcp_tools(tmp_path / "log", tools=["add"])["calc"])
    tools, conns = await connect_mcp_tools({"calc": spec})
    try:
        assert list(tools) == ["calc.add"]
        tool = tools["calc.add"]
        assert isinstance(tool, MCPTool)
        fn = tool.schema()["function"]
        assert fn["name"] == "calc.add" and fn["description"] == "Add two integers."
        assert fn["parameters"]["required"] == ["a", "b"]
    finally:
        for c in conns:
            await c.aclose()
    bad = ToolSpec.model_validate(mcp_tools(tmp_path / "log", tools=["nope"])["calc"])
    with pytest.raises(Exception, match="lists no tool 'nope'"):
        await connect_mcp_tools({"calc": bad})


async def test_a_dead_server_is_a_transient_error_and_restarted(tmp_path: Path) -> None:
    from oao_worker.tools import ToolCallInfo

    tools, [conn] = await connect_mcp_tools(
        {"calc": ToolSpec.model_validate(mcp_tools(tmp_path / "log")["calc"])}
    )
    try:
        add = tools["calc.add"]
        assert await add.call({"a": 1, "b": 2}, ToolCallInfo("k1")) == 3
        await conn.aclose()  # the process is gone (as if it had died)
        assert await add.call({"a": 2, "b": 2}, ToolCallInfo("k2")) == 4  # started again
    finally:
        await conn.aclose()
    missing = ToolSpec.model_validate(
        {"mcp": {"command": [str(tmp_path / "no-such-server")], "timeout_s": 10}}
    )
    with pytest.raises(TransientError, match="cannot start"):
        await connect_mcp_tools({"gone": missing})


# --------------------------------------------------------------------- streamable HTTP


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """tests/mcp_server.py over streamable HTTP on a loopback port (a real process)."""
    port = free_port()
    log = tmp_path / "http-calls.jsonl"
    proc = subprocess.Popen(
        [sys.executable, SERVER, "--http", str(port)],
        env={"PATH": "/usr/bin:/bin", "MCP_LOG": str(log)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the MCP HTTP test server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/mcp", log
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def test_http_server_tools_in_a_run(broker: Broker, http_server: tuple[str, Path]) -> None:
    url, log = http_server
    spec = make_spec(
        [{"id": "a", "agent": "calc", "task": "x"}],
        agents={"calc": {"kind": "llm", "model": "m", "tools": ["web.add"]}},
        models=scripted(call("web.add", a=20, b=22), "{{ tool_results[0] }}"),
        tools={"web": {"mcp": {"url": url}, "idempotent": True}},
        defaults=DEFAULTS,
    )
    rid = await run_spec(broker, spec)

    [n] = await broker.get_nodes(rid, ["a"])
    assert n["status"] == "SUCCEEDED", n.get("error")
    assert json.loads(n["output"]) == "42"
    [served] = calls_of(log)
    assert served["tool"] == "add" and served["meta"]["oao/node_id"] == "a"


async def test_http_server_obeys_the_network_rules(http_server: tuple[str, Path]) -> None:
    url, log = http_server
    spec = ToolSpec.model_validate({"mcp": {"url": url, "timeout_s": 10}})
    with pytest.raises(TrustError, match="deny-private-networks"):
        await connect_mcp_tools({"web": spec}, TrustPolicy(deny_private_networks=True))
    with pytest.raises(TrustError, match="metadata"):
        await connect_mcp_tools(
            {"web": ToolSpec.model_validate({"mcp": {"url": "http://169.254.169.254/mcp"}})}
        )
    assert calls_of(log) == []


# --------------------------------------------------------------------- trust and validation


def test_stdio_command_is_gated_like_code() -> None:
    argv = [sys.executable, SERVER]
    TrustPolicy().check_mcp_command(argv)  # a fleet that trusts every submitter
    locked = TrustPolicy(entrypoints=("examples.*",))
    with pytest.raises(TrustError, match="--allow-mcp-commands"):
        locked.check_mcp_command(argv, "tools.calc.mcp.command")
    allowed = TrustPolicy(entrypoints=("examples.*",), mcp_commands=(f"{sys.executable} *mcp_server.py",))
    allowed.check_mcp_command(argv)
    with pytest.raises(TrustError, match="matches none"):
        allowed.check_mcp_command([sys.executable, "-c", "import os"])
    spec = make_spec(
        [{"id": "a", "agent": "x"}],
        agents={"x": {"kind": "llm", "model": "m", "tools": ["calc.add"]}},
        tools={"calc": {"mcp": {"command": argv}}},
    )
    assert [p for p in locked.spec_problems(spec) if "tools.calc.mcp.command" in p]
    assert allowed.spec_problems(spec) == []


async def test_a_refused_command_starts_nothing(tmp_path: Path) -> None:
    log = tmp_path / "log"
    spec = ToolSpec.model_validate(mcp_tools(log)["calc"])
    with pytest.raises(TrustError):
        await connect_mcp_tools({"calc": spec}, TrustPolicy(entrypoints=("examples.*",)))
    assert not log.exists()


@pytest.mark.parametrize(
    ("tools", "agent_tools", "problem"),
    [
        ({"fs": {"mcp": {"command": ["x"]}}}, ["fs"], "is an MCP server: list its tools as fs.<tool>"),
        ({"fs": {"mcp": {"command": ["x"], "url": "http://h/"}}}, [], "exactly one of command"),
        ({"fs": {"mcp": {}}}, [], "exactly one of command"),
        ({"fs": {"entrypoint": "m:f", "mcp": {"command": ["x"]}}}, [], "exactly one of entrypoint"),
        ({"fs": {"mcp": {"command": ["x"], "headers": {"a": "b"}}}}, [], "headers and api_key_env"),
        ({"fs": {"mcp": {"url": "http://h/", "env": {"A": "1"}}}}, [], "env and cwd"),
        ({"fs": {"mcp": {"url": "http://h/", "api_key_env": "OAO_REDIS_URL"}}}, [], "OAO's own settings"),
        (
            {"fs": {"mcp": {"command": ["x"]}}, "fs.read": {"entrypoint": "m:f"}},
            [],
            "taken by the tools of MCP server 'fs'",
        ),
    ],
)
def test_spec_validation(tools: dict[str, Any], agent_tools: list[str], problem: str) -> None:
    doc = {
        "name": "t",
        "models": scripted("x"),
        "agents": {"a": {"kind": "llm", "model": "m", "tools": agent_tools}},
        "tools": tools,
        "nodes": [{"id": "n", "agent": "a"}],
    }
    with pytest.raises(SpecError) as exc_info:
        parse_spec(json.dumps(doc))
    assert problem in str(exc_info.value)


def test_agent_may_list_tools_of_an_mcp_server() -> None:
    doc = {
        "name": "t",
        "models": scripted("x"),
        "agents": {"a": {"kind": "llm", "model": "m", "tools": ["fs.read_file"], "deny_tools": ["fs.write"]}},
        "tools": {"fs": {"mcp": {"command": ["npx", "server"], "tools": ["read_file"]}}},
        "nodes": [{"id": "n", "agent": "a"}],
    }
    spec = parse_spec(json.dumps(doc))
    mcp = spec.tools["fs"].mcp
    assert mcp is not None and mcp.command == ["npx", "server"] and mcp.timeout_s == 60.0
