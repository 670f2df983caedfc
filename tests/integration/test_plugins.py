"""Worker plugins through their entry points (docs/plugins.md).

The example plugin (``examples/plugin``) and two test plugins (``tests/plugins``) are
installed with pip into a temporary target directory, never imported from this checkout:
a process finds them only through their ``oao.plugins`` entry points, with that
directory on its path. A real ``oao-worker`` process runs the example's policy and
webhook listener; the test plugin's provider, agent kind, middleware and listener run
in-process; a plugin needing plugin API 2.0 is refused with one line.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from oao_testkit import make_spec, of_type, run_spec, wait_until
from proc import ROOT, cli, env, start_worker, stop

from oao_common.broker import Broker
from oao_scheduler.progress import wait_for_run
from oao_scheduler.submit import submit_spec
from oao_worker.plugins import PLUGIN_API_VERSION, PluginError, load_plugins

PACKAGES = {
    "oao_example_plugin": ROOT / "examples" / "plugin",
    "oao_test_extras": ROOT / "tests" / "plugins" / "extras",
    "oao_test_future": ROOT / "tests" / "plugins" / "future",
}
PIP_INSTALL = [
    sys.executable,
    "-m",
    "pip",
    "install",
    "-q",
    "--no-deps",
    "--no-index",
    "--no-build-isolation",
]
"""Offline: no index, no build isolation (the venv's own setuptools and wheel build them)."""


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the three plugins as pip installs them (code and
    ``*.dist-info`` with ``entry_points.txt``), built offline from copies of their
    sources (pip would write build files into the checkout)."""
    base = tmp_path_factory.mktemp("plugins")
    sources = []
    for module, src in PACKAGES.items():
        assert importlib.util.find_spec(module) is None, f"{module} must not be importable before the install"
        dst = base / "src" / src.name
        shutil.copytree(src, dst)
        sources.append(str(dst))
    site = base / "site"
    r = subprocess.run(
        [*PIP_INSTALL, "--target", str(site), *sources],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, f"pip install failed (needs setuptools and wheel, the test extras): {r.stderr}"
    assert sorted(p.name for p in site.glob("*.dist-info")) == [
        "oao_example_plugin-0.1.0.dist-info",
        "oao_test_extras-0.2.0.dist-info",
        "oao_test_future-3.0.0.dist-info",
    ]
    return site


def site_env(site: Path, **extra: str) -> dict[str, str]:
    """A subprocess environment with the plugins' directory on its path."""
    return env(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(site)]), **extra)


@pytest.fixture
def in_process(plugin_site: Path) -> Iterator[Path]:
    """The plugins' directory on this process' path, for the length of one test."""
    sys.path.insert(0, str(plugin_site))
    importlib.invalidate_caches()
    try:
        yield plugin_site
    finally:
        sys.path.remove(str(plugin_site))
        for m in [m for m in sys.modules if m.split(".")[0] in PACKAGES]:
            del sys.modules[m]
        importlib.invalidate_caches()


class Webhook:
    """A loopback HTTP server that keeps the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                bodies.append(json.loads(self.rfile.read(n)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def shell_spec(**extra: Any) -> Any:
    """Two nodes calling the ``shell`` tool: ``bad`` with a forbidden command."""
    return make_spec(
        [
            {"id": "bad", "agent": "sh", "task": "rm -rf /srv/data"},
            {"id": "good", "agent": "sh", "task": "ls"},
        ],
        agents={"sh": {"kind": "python", "entrypoint": "plugin_agents:shell_once", "tools": ["shell"]}},
        tools={"shell": {"entrypoint": "plugin_agents:shell"}},
        failure={"allow_partial_completion": True, "max_failure_ratio": 1.0},
        **extra,
    )


FORBID = [{"use": "example.forbid_tool_args", "config": {"patterns": [r"rm\s+-rf"]}}]


def test_installed_plugins_are_listed_and_only_allowed_ones_load(plugin_site: Path) -> None:
    r = cli("plugins", "--json", env=site_env(plugin_site))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["api_version"] == PLUGIN_API_VERSION and doc["allowed"] == []
    rows = {p["name"]: p for p in doc["plugins"]}
    assert {n: p["status"] for n, p in rows.items()} == {
        "example": "not allowed",
        "extras": "not allowed",
        "future": "not allowed",
    }
    assert rows["example"]["dist"] == "oao-example-plugin" and rows["example"]["version"] == "0.1.0"
    assert rows["example"]["target"] == "oao_example_plugin:plugin"

    r = cli("plugins", "--json", "--plugins", "example,extras", env=site_env(plugin_site))
    assert r.returncode == 0, r.stderr
    rows = {p["name"]: p for p in json.loads(r.stdout)["plugins"]}
    assert rows["example"]["status"] == "loads" and rows["example"]["api_version"] == "1.0"
    assert rows["example"]["registered"] == {"named_middleware": ["example.forbid_tool_args"]}
    assert rows["extras"]["registered"]["providers"] == ["extras.echo"]
    assert rows["extras"]["registered"]["agent_kinds"] == ["extras.greeter"]
    assert rows["future"]["status"] == "not allowed"

    # without the plugins' directory on the path there is nothing to find
    r = cli("plugins", "--json", "--plugins", "example")
    assert r.returncode == 2
    [row] = json.loads(r.stdout)["plugins"]
    assert row["status"] == "not installed"
    assert r.stderr.strip().splitlines() == [
        "error: plugin 'example' is allowed (--plugins / OAO_PLUGINS) but not installed (installed: none)"
    ]


def test_a_plugin_needing_another_api_version_is_refused_with_one_line(
    plugin_site: Path, redis_url: str, prefix: str
) -> None:
    want = (
        "error: plugin 'future' (oao-test-future 3.0.0) needs OAO plugin API 2.0; this OAO provides 1.0 "
        "(it loads plugins needing 1.0 to 1.0): refused"
    )
    r = cli("plugins", "--plugins", "future,example", "--json", env=site_env(plugin_site))
    assert r.returncode == 2
    rows = {p["name"]: p for p in json.loads(r.stdout)["plugins"]}
    assert rows["future"]["status"] == "refused" and rows["example"]["status"] == "loads"
    assert r.stderr.strip().splitlines() == [want]

    w = subprocess.run(
        [
            str(Path(sys.executable).parent / "oao-worker"),
            "--redis-url",
            redis_url,
            "--prefix",
            prefix,
            "--plugins",
            "future",
        ],
        env=site_env(plugin_site),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert w.returncode == 2
    assert [line for line in w.stderr.splitlines() if line.startswith("error:")] == [want]


async def test_example_plugin_in_a_real_worker(
    plugin_site: Path, broker: Broker, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    hook = Webhook()
    log = tmp_path / "worker.log"
    w = start_worker(
        redis_url,
        prefix,
        "--plugins",
        "example",
        "--heartbeat-ttl",
        "2",
        log=log,
        extra_env=site_env(plugin_site, OAO_EXAMPLE_WEBHOOK_URL=hook.url),
    )
    try:
        s = await submit_spec(broker, shell_spec(middleware=FORBID, defaults={"retry": {"max_retries": 2}}))
        await wait_for_run(broker, s.run_id, interval_s=0.2, timeout_s=60)
        bad, good = await broker.get_nodes(s.run_id, ["bad", "good"])
        assert good["status"] == "SUCCEEDED" and json.loads(good["output"]) == "ran ls"
        assert bad["status"] == "FAILED" and bad["attempt"] == "1"  # a policy violation: never retried
        err = json.loads(bad["error"])
        assert err["type"] == "PolicyViolation" and err["rule"] == "forbidden_tool_argument"
        assert "args.cmd matches the forbidden pattern 'rm\\\\s+-rf'" in err["message"]
        ev = await broker.events(s.run_id)
        assert of_type(ev, "POLICY_VIOLATION", node="bad")
        assert not of_type(ev, "STEP_STARTED", node="bad")  # refused before the tool ran
        assert len(of_type(ev, "STEP_COMPLETED", node="good")) == 1

        # the listener posted the violation and both attempts' ends, through the guarded client
        def posted() -> list[tuple[str, str, Any]]:
            return sorted(
                (b["type"], b["node_id"], b["data"].get("outcome") or b["data"].get("rule"))
                for b in hook.bodies
            )

        await wait_until(
            posted,
            [
                ("EXECUTION_COMPLETE", "bad", "failed"),
                ("EXECUTION_COMPLETE", "good", "succeeded"),
                ("POLICY_VIOLATION", "bad", "forbidden_tool_argument"),
            ],
            timeout_s=30,
            what="the webhook posts",
        )
        assert all(b["source"] == "oao" and b["run_id"] == s.run_id for b in hook.bodies)
    finally:
        stop(w)
        hook.close()
    # it came through the entry point of the installed distribution
    loaded = [json.loads(line) for line in log.read_text().splitlines() if '"plugin.loaded"' in line]
    assert [(x["name"], x["dist"], x["version"], x["target"]) for x in loaded] == [
        ("example", "oao-example-plugin", "0.1.0", "oao_example_plugin:plugin")
    ]


async def test_a_worker_without_the_plugin_fails_the_node_instead_of_running_it_ungoverned(
    plugin_site: Path, broker: Broker, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    # installed and on the path, but not allowed: a worker loads no plugin by default
    w = start_worker(redis_url, prefix, log=tmp_path / "w.log", extra_env=site_env(plugin_site))
    try:
        s = await submit_spec(broker, shell_spec(middleware=FORBID))
        await wait_for_run(broker, s.run_id, interval_s=0.2, timeout_s=60)
    finally:
        stop(w)
    nodes = await broker.get_nodes(s.run_id, ["bad", "good"])
    assert [n["status"] for n in nodes] == ["FAILED", "FAILED"]
    for n in nodes:
        err = json.loads(n["error"])
        assert err["type"] == "PermanentError" and n["attempt"] == "1"
        assert err["message"] == (
            "middleware[0]: middleware 'example.forbid_tool_args' is not provided by a plugin loaded on "
            "this worker (loaded: none); start workers with --plugins example (OAO_PLUGINS)"
        )
    assert not of_type(await broker.events(s.run_id), "STEP_STARTED")


async def test_a_plugins_provider_agent_kind_middleware_and_listener(
    in_process: Path, broker: Broker
) -> None:
    plugins = load_plugins(["extras"])
    import oao_test_extras as extras  # type: ignore[import-not-found]

    assert extras.__file__ is not None and extras.__file__.startswith(str(in_process))
    [p] = plugins.plugins
    assert (p.name, p.dist, p.version) == ("extras", "oao-test-extras", "0.2.0")
    spec = make_spec(
        [{"id": "g", "agent": "greeter", "task": "world"}, {"id": "t", "agent": "asker"}],
        name="extras",
        models={"echo": {"provider": "plugin", "use": "extras.echo", "config": {"prefix": "ECHO"}}},
        agents={
            "greeter": {
                "kind": "plugin",
                "use": "extras.greeter",
                "model": "echo",
                "config": {"greeting": "hi"},
            },
            "asker": {
                "kind": "python",
                "entrypoint": "plugin_agents:ask_then_tool",
                "model": "echo",
                "tools": ["shell"],
            },
        },
        tools={"shell": {"entrypoint": "plugin_agents:shell"}},
    )
    rid = await run_spec(broker, spec, plugins=plugins)
    g, t = await broker.get_nodes(rid, ["g", "t"])
    assert g["status"] == "SUCCEEDED" and json.loads(g["output"]) == {"said": "ECHO: hi world"}
    assert t["status"] == "SUCCEEDED" and json.loads(t["output"]) == "ran ECHO: hello"
    # the worker-wide middleware factory saw every executed step of this spec's nodes
    assert sorted(extras.STEPS) == [
        ("g", "llm", "echo", False),
        ("t", "llm", "echo", False),
        ("t", "tool", "shell", False),
    ]
    # the listener got its events, per node in order, delivered before the worker stopped
    seen = [(e.node_id, e.type) for e in extras.EVENTS if e.run_id == rid]
    of_t = [typ for node, typ in seen if node == "t"]
    assert [typ for typ in of_t if typ != "STATE_ENTER"] == [
        "STEP_COMPLETED",
        "STEP_COMPLETED",
        "TOOL_CALL",
        "EXECUTION_COMPLETE",
    ]
    assert of_t[0] == "STATE_ENTER" and of_t[-1] == "EXECUTION_COMPLETE"  # the agent's lifecycle too
    [call] = [e for e in extras.EVENTS if e.type == "TOOL_CALL" and e.run_id == rid]
    assert call.data["name"] == "shell" and call.data["args"] == {"cmd": "ECHO: hello"} and call.data["ok"]
    [done] = [e for e in extras.EVENTS if e.type == "EXECUTION_COMPLETE" and e.node_id == "g"]
    assert done.data["outcome"] == "succeeded" and done.data["agent_type"] == "plugin"
    assert done.data["steps"] == 1 and done.data["tokens_out"] == 3

    # a spec asking for a provider no loaded plugin offers fails its node permanently
    spec2 = make_spec(
        [{"id": "x", "agent": "greeter"}],
        models={"echo": {"provider": "plugin", "use": "nope.echo"}},
        agents={"greeter": {"kind": "plugin", "use": "extras.greeter", "model": "echo"}},
    )
    rid2 = await run_spec(broker, spec2, plugins=plugins)
    [x] = await broker.get_nodes(rid2, ["x"])
    assert x["status"] == "FAILED" and "models.echo: provider 'nope.echo' is not provided" in x["error"]


def test_load_plugins_refuses_what_is_not_installed() -> None:
    with pytest.raises(PluginError, match=r"^plugin 'nope' is allowed .* but not installed"):
        load_plugins(["nope"])
    assert load_plugins([]).plugins == []  # none by default
