"""Misbehaving agent code against real worker processes: a blocked event loop, a
template that would render for hours, slow and broken imports, sync calls that hang,
and the smaller defects of the command-line programs (signals, timeouts, credentials,
prefixes, partial completion, lost runs).

Worker and ``serve`` processes are real (tests/proc.py); nodes run on the embedded
Valkey of tests/conftest.py. Every wait has a deadline in seconds.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from oao_testkit import fleet, of_type, wait_until
from proc import BIN, ROOT, cli, env, start_serve, start_worker, stop

from oao_common.broker import Broker
from oao_common.connection import EmbeddedServer, connect
from oao_common.events import Event
from oao_common.spec import parse_spec
from oao_scheduler.progress import wait_for_run
from oao_scheduler.submit import submit_spec

pytestmark = pytest.mark.chaos  # worker processes are signalled and killed

AGENTS = "faults.fault_agents"
TERMINAL = ("SUCCEEDED", "FAILED", "SKIPPED", "CANCELLED")


# ---------------------------------------------------------------------- helpers


def spec_doc(nodes: list[dict[str, Any]], agents: dict[str, str], **extra: Any) -> dict[str, Any]:
    """A spec document: ``agents`` maps agent names to python entrypoints."""
    doc: dict[str, Any] = {
        "name": extra.pop("name", "faults"),
        "agents": {a: {"kind": "python", "entrypoint": ep} for a, ep in agents.items()},
        "nodes": nodes,
    }
    doc.update(extra)
    return doc


async def submit(broker: Broker, doc: dict[str, Any]) -> str:
    s = await submit_spec(broker, parse_spec(yaml.safe_dump(doc), "test"))
    return s.run_id


def write_spec(tmp_path: Path, doc: dict[str, Any], name: str = "spec.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc))
    return str(p)


async def node(broker: Broker, rid: str, nid: str) -> dict[str, str]:
    [n] = await broker.get_nodes(rid, [nid])
    return n


async def wait_node(
    broker: Broker,
    rid: str,
    nid: str,
    timeout_s: float,
    states: tuple[str, ...] = TERMINAL,
    logs: tuple[Path, ...] = (),
) -> dict[str, str]:
    """Wait until node ``nid`` is in one of ``states``; returns its hash. A timeout
    fails the test with the ends of ``logs``."""

    async def probe() -> dict[str, str]:
        return await node(broker, rid, nid)

    try:
        n = await wait_until(probe, lambda n: n.get("status") in states, timeout_s, f"node {nid} in {states}")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{tail(*logs)}") from None
    return n


async def wait_event(
    broker: Broker, rid: str, etype: str, nid: str, timeout_s: float, logs: tuple[Path, ...] = ()
) -> Event:
    """Wait for the first ``etype`` event of node ``nid``; as :func:`wait_node`."""

    async def probe() -> list[Event]:
        return of_type(await broker.events(rid), etype, node=nid)

    try:
        found = await wait_until(probe, bool, timeout_s, f"a {etype} event of node {nid}")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{tail(*logs)}") from None
    return found[0]


def wait_exit(p: subprocess.Popen[bytes], timeout_s: float, what: str, logs: tuple[Path, ...] = ()) -> int:
    """The exit status of ``p``, which must exit within ``timeout_s`` seconds."""
    try:
        return p.wait(timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{what} still running after {timeout_s}s\n{tail(*logs)}") from None


def error_of(n: dict[str, str]) -> dict[str, Any]:
    return json.loads(n.get("error") or "{}")


def one_line(stderr: str, header: str | None = None) -> str:
    """The single error line of ``stderr`` (``header``: a line the command always prints
    first, e.g. ``run``'s "run <id> (...) on <server>", that may come before it)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if header is not None and lines and lines[0].startswith(header):
        lines = lines[1:]
    assert len(lines) == 1 and "Traceback" not in stderr, f"want one stderr line, got:\n{stderr}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def tail(*logs: Path, n: int = 3000) -> str:
    """The ends of process logs, for failure messages."""
    return "\n".join(f"--- {p.name}:\n{p.read_text()[-n:] if p.exists() else '(none)'}" for p in logs)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes to stop (SIGTERM, SIGKILL 3 s later) when the test ends."""
    ps: list[subprocess.Popen[bytes]] = []
    yield ps
    stop(*ps, timeout=3)


def worker_id_of(log: Path) -> str:
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "worker.started":
            return str(rec["worker_id"])
    raise AssertionError(f"no worker.started in {log}")


# ---------------------------------------------------------------------- 1. blocked loop


async def test_loop_blocking_agent_fails_on_its_limit_and_worker_lives(
    broker: Broker, redis_url: str, prefix: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    # time.sleep(4.5) inside async def, timeout_s 1.5, heartbeat TTL 2 s: the watchdog
    # fails the node at limit + TTL (3.5 s), the loop comes back at 4.5 s, before the
    # "wedged" exit at limit + 2 TTL (5.5 s).
    sleep_s, ttl = 4.5, "2"
    log, slog = tmp_path / "worker.log", tmp_path / "serve.log"
    logs = (log, slog)
    procs.append(start_serve(redis_url, prefix, "--reaper-interval", "0.2", "--heartbeat-ttl", ttl, log=slog))
    w = start_worker(redis_url, prefix, "--heartbeat-ttl", ttl, "--grace-period", "2", log=log)
    procs.append(w)
    rid = await submit(
        broker,
        spec_doc(
            [
                {
                    "id": "block",
                    "agent": "block",
                    "task": str(sleep_s),
                    "policy": {"timeout_s": 1.5},
                    "retry": {"max_retries": 2, "retry_delay_s": 0.1},
                },
                {"id": "other", "agent": "quick"},
            ],
            {"block": f"{AGENTS}:block_loop", "quick": f"{AGENTS}:quick"},
        ),
    )
    blocked = await wait_node(broker, rid, "block", 20, logs=logs)
    assert blocked["status"] == "FAILED", blocked
    err = error_of(blocked)
    assert err["rule"] == "timeout_s" and err["type"] == "PolicyViolation", err
    assert "blocked the worker's event loop" in err["message"], err
    assert blocked["attempt"] == "1" and blocked.get("retries", "0") == "0", blocked
    other = await wait_node(broker, rid, "other", 15, logs=logs)
    assert other["status"] == "SUCCEEDED", other

    ev = await wait_event(broker, rid, "LOOP_BLOCKED", "block", 10, logs=logs)
    assert sleep_s * 0.8 <= ev.data["blocked_s"] <= sleep_s + 1.5, ev.data
    events = await broker.events(rid)
    assert not of_type(events, "NODE_REQUEUED", "NODE_RETRY_SCHEDULED"), [e.type for e in events]
    assert len(of_type(events, "NODE_STARTED", node="block")) == 1
    assert of_type(events, "POLICY_VIOLATION", node="block")

    # The same worker process lives on and runs the next run.
    assert w.poll() is None, tail(log)
    rid2 = await submit(broker, spec_doc([{"id": "next", "agent": "quick"}], {"quick": f"{AGENTS}:quick"}))
    assert (await wait_node(broker, rid2, "next", 15, logs=logs))["status"] == "SUCCEEDED"
    [started] = of_type(await broker.events(rid2), "NODE_STARTED")
    assert started.data["worker"] == worker_id_of(log)
    assert w.poll() is None
    assert not of_type(await broker.events(rid), "NODE_REQUEUED")


async def test_loop_blocked_past_limit_and_two_ttls_exits_5(
    broker: Broker, redis_url: str, prefix: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    # time.sleep(30), timeout_s 1, TTL 1: the node is failed at ~2 s and the wedged
    # worker exits 5 at ~3 s; its other jobs go to a replacement, the failed node stays.
    log, log2, slog = tmp_path / "w1.log", tmp_path / "w2.log", tmp_path / "serve.log"
    procs.append(start_serve(redis_url, prefix, "--reaper-interval", "0.2", "--heartbeat-ttl", "1", log=slog))
    w = start_worker(redis_url, prefix, "--heartbeat-ttl", "1", log=log)
    procs.append(w)
    rid = await submit(
        broker,
        spec_doc(
            [
                {
                    "id": "block",
                    "agent": "block",
                    "task": "30",
                    "policy": {"timeout_s": 1},
                    "retry": {"max_retries": 2, "retry_delay_s": 0.1},
                },
                {"id": "other", "agent": "quick"},
            ],
            {"block": f"{AGENTS}:block_loop", "quick": f"{AGENTS}:quick"},
        ),
    )
    code = wait_exit(w, 15, "worker whose loop is wedged", logs=(log,))
    assert code == 5 and "worker.loop_wedged" in log.read_text(), tail(log)
    blocked = await node(broker, rid, "block")
    assert blocked["status"] == "FAILED" and blocked["attempt"] == "1", blocked
    assert "blocked the worker's event loop" in error_of(blocked)["message"], blocked
    procs.append(start_worker(redis_url, prefix, "--heartbeat-ttl", "1", log=log2))
    assert (await wait_node(broker, rid, "other", 15, logs=(log2, slog)))["status"] == "SUCCEEDED"
    assert await wait_for_run(broker, rid, interval_s=0.05, timeout_s=10) == "FAILED"
    assert len(of_type(await broker.events(rid), "NODE_STARTED", node="block")) == 1


# ---------------------------------------------------------------------- 2. huge template

HUGE_TEMPLATE = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
#: One C operation that holds the GIL for ~13 s: no clock check or heartbeat thread runs
#: meanwhile, and a plain ``{{ }}`` template renders on the event loop.
BIGNUM_TEMPLATE = "{{ ((10**4096)**4096) > 1 }}"


@pytest.mark.parametrize(
    ("template", "bound"),
    [(HUGE_TEMPLATE, "rendering took longer than"), (BIGNUM_TEMPLATE, "an integer would exceed")],
    ids=["loop", "bignum"],
)
async def test_huge_template_fails_permanently_within_its_bound(
    broker: Broker,
    redis_url: str,
    prefix: str,
    tmp_path: Path,
    procs: list[subprocess.Popen[bytes]],
    template: str,
    bound: str,
) -> None:
    log = tmp_path / "w.log"
    procs.append(start_serve(redis_url, prefix, "--reaper-interval", "0.2", "--heartbeat-ttl", "1"))
    w = start_worker(redis_url, prefix, "--heartbeat-ttl", "1", "--grace-period", "1", log=log)
    procs.append(w)
    rid = await submit(
        broker,
        spec_doc(
            [
                {
                    "id": "huge",
                    "agent": "quick",
                    "task": template,
                    "retry": {"max_retries": 2, "retry_delay_s": 0.1},
                },
                {"id": "other", "agent": "quick"},
            ],
            {"quick": f"{AGENTS}:quick"},
        ),
    )
    huge = await wait_node(broker, rid, "huge", 15, logs=(log,))
    assert huge["status"] == "FAILED", huge
    err = error_of(huge)
    assert bound in err["message"] and "nodes.huge.task" in err["message"], err
    assert huge["attempt"] == "1" and huge.get("retries", "0") == "0", huge
    assert (await wait_node(broker, rid, "other", 10, logs=(log,)))["status"] == "SUCCEEDED"
    events = await broker.events(rid)
    assert not of_type(events, "NODE_REQUEUED", "NODE_RETRY_SCHEDULED"), [e.type for e in events]
    assert w.poll() is None, tail(log)
    # Heartbeats went on all along: the worker is alive in the registry.
    [me] = [x for x in await broker.workers() if x["id"] == worker_id_of(log)]
    assert me["alive"], me


# ---------------------------------------------------------------------- 3. imports


async def test_slow_import_runs_off_the_loop(
    broker: Broker, redis_url: str, prefix: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    # The import sleeps 4 s, four heartbeat TTLs; a fresh process imports it once.
    procs.append(start_serve(redis_url, prefix, "--reaper-interval", "0.2", "--heartbeat-ttl", "1"))
    log = tmp_path / "w.log"
    w = start_worker(
        redis_url,
        prefix,
        "--heartbeat-ttl",
        "1",
        "--grace-period",
        "1",
        log=log,
        extra_env={"OAO_TEST_SLOW_IMPORT_S": "4"},
    )
    procs.append(w)
    rid = await submit(
        broker,
        spec_doc([{"id": "slow", "agent": "slow", "task": "t"}], {"slow": "faults.slow_import_mod:agent"}),
    )
    n = await wait_node(broker, rid, "slow", 25, logs=(log,))
    assert n["status"] == "SUCCEEDED", n
    assert json.loads(n["output"]) == "imported slowly: t"
    assert n["attempt"] == "1", n
    events = await broker.events(rid)
    assert not of_type(events, "NODE_REQUEUED"), [e.type for e in events]
    [me] = [x for x in await broker.workers() if x["id"] == worker_id_of(log)]
    assert me["alive"], me
    assert w.poll() is None, tail(log)


async def test_import_raising_valueerror_fails_permanently(broker: Broker) -> None:
    rid = await submit(
        broker,
        spec_doc(
            [{"id": "bad", "agent": "bad", "retry": {"max_retries": 2, "retry_delay_s": 0.05}}],
            {"bad": "faults.bad_import_mod:agent"},
        ),
    )
    async with fleet(broker):
        await wait_for_run(broker, rid, interval_s=0.02, timeout_s=15)
    n = await node(broker, rid, "bad")
    assert n["status"] == "FAILED", n
    assert "cannot import" in error_of(n)["message"], n
    assert n["attempt"] == "1" and n.get("retries", "0") == "0", n
    assert not of_type(await broker.events(rid), "NODE_RETRY_SCHEDULED")


# ---------------------------------------------------------------------- 4. hanging sync code


async def test_hung_sync_threads_make_the_worker_exit_and_hand_back(
    broker: Broker, redis_url: str, prefix: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    menv = {"OAO_TEST_MARKER_DIR": str(markers)}
    log1 = tmp_path / "w1.log"
    w1 = start_worker(
        redis_url,
        prefix,
        "--sync-threads",
        "2",
        "--heartbeat-ttl",
        "2",
        "--grace-period",
        "1",
        log=log1,
        extra_env=menv,
    )
    procs.append(w1)
    hang_nodes = [
        {"id": f"hang{i}", "agent": "hang", "task": "30", "policy": {"timeout_s": 1}, "critical": False}
        for i in range(2)
    ]
    # The quick nodes wait (on the loop) until both hang calls hold the two threads.
    quick_nodes = [{"id": f"quick{i}", "agent": "quick", "task": "2", "critical": False} for i in range(3)]
    rid = await submit(
        broker,
        spec_doc(
            hang_nodes + quick_nodes,
            {"hang": f"{AGENTS}:hang", "quick": f"{AGENTS}:quick_sync_after_hangs"},
        ),
    )
    for i in range(2):
        n = await wait_node(broker, rid, f"hang{i}", 15, logs=(log1,))
        assert n["status"] == "FAILED" and error_of(n)["rule"] == "timeout_s", n
    code = wait_exit(w1, 15, "worker with 2 of 2 sync threads hung", logs=(log1,))
    text = log1.read_text()
    assert code == 5, text[-2000:]
    assert "sync threads are hung" in text, text[-2000:]
    w1_id = worker_id_of(log1)
    events = await broker.events(rid)
    for i in range(3):
        assert of_type(events, "NODE_HANDED_BACK", node=f"quick{i}"), f"quick{i} not handed back"
        assert (await node(broker, rid, f"quick{i}"))["status"] != "SUCCEEDED"

    log2 = tmp_path / "w2.log"
    procs.append(start_worker(redis_url, prefix, "--heartbeat-ttl", "2", log=log2, extra_env=menv))
    for i in range(3):
        n = await wait_node(broker, rid, f"quick{i}", 20, logs=(log1, log2))
        assert n["status"] == "SUCCEEDED", n
    w2_id = worker_id_of(log2)
    for i in range(3):
        starts = of_type(await broker.events(rid), "NODE_STARTED", node=f"quick{i}")
        assert [e.data["worker"] for e in starts] == [w1_id, w2_id], starts


async def test_sync_clock_starts_with_its_thread(
    broker: Broker, redis_url: str, prefix: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    # One sync thread, two 1 s sync calls claimed together, limit 1.6 s each: the second
    # waits ~1 s for the thread, and that wait must not count against its limit.
    # (The old default executor ran both at once, so this passes there too.)
    log = tmp_path / "w.log"
    procs.append(start_worker(redis_url, prefix, "--sync-threads", "1", "--heartbeat-ttl", "2", log=log))
    rid = await submit(
        broker,
        spec_doc(
            [{"id": f"s{i}", "agent": "s", "task": "1", "policy": {"timeout_s": 1.6}} for i in range(2)],
            {"s": f"{AGENTS}:sync_sleep"},
        ),
    )
    for i in range(2):
        n = await wait_node(broker, rid, f"s{i}", 20, logs=(log,))
        assert n["status"] == "SUCCEEDED", n
    starts = of_type(await broker.events(rid), "NODE_STARTED")
    assert len({e.data["worker"] for e in starts}) == 1 and len(starts) == 2, starts
    assert abs(starts[0].ts_ms - starts[1].ts_ms) < 1000, "both nodes were claimed together"


# ---------------------------------------------------------------------- 5. smaller defects


async def test_second_sigterm_ends_the_grace_period(
    broker: Broker, redis_url: str, prefix: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    log, markers = tmp_path / "w.log", tmp_path / "markers"
    w = start_worker(
        redis_url,
        prefix,
        "--grace-period",
        "30",
        "--heartbeat-ttl",
        "2",
        log=log,
        extra_env={"OAO_TEST_MARKER_DIR": str(markers)},
    )
    procs.append(w)
    rid = await submit(
        broker,
        spec_doc([{"id": "long", "agent": "sleeper", "task": "20"}], {"sleeper": f"{AGENTS}:marked_sleep"}),
    )
    # The agent runs (its task is in flight): SIGTERM starts a 30 s grace period.
    await wait_until(lambda: (markers / "long").exists(), True, 15, "the node to run in the worker")
    w.send_signal(signal.SIGTERM)
    await wait_until(lambda: "worker.draining" in log.read_text(), True, 10, "the worker to start draining")
    w.send_signal(signal.SIGTERM)
    code = wait_exit(w, 6, "worker after a second SIGTERM", logs=(log,))
    assert code == 0, tail(log)
    assert of_type(await broker.events(rid), "NODE_HANDED_BACK", node="long")
    n = await node(broker, rid, "long")
    assert n["status"] == "READY", n


async def test_submit_wait_timeout_exits_4_with_one_line(
    broker: Broker, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    spec = write_spec(tmp_path, spec_doc([{"id": "a", "agent": "q"}], {"q": f"{AGENTS}:quick"}))
    r = await asyncio.to_thread(
        cli,
        "submit",
        spec,
        "--wait",
        "--timeout",
        "1",
        "--json",
        "--redis-url",
        redis_url,
        "--prefix",
        prefix,
        timeout=30,
    )
    assert r.returncode == 4, (r.returncode, r.stderr)
    assert "had not ended after 1 s" in one_line(r.stderr)


async def test_run_timeout_exits_4_with_one_line(
    broker: Broker, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    spec = write_spec(
        tmp_path,
        spec_doc([{"id": "a", "agent": "sleeper", "task": "10"}], {"sleeper": "oao_test_agents:sleeper"}),
    )
    r = await asyncio.to_thread(
        cli, "run", spec, "--timeout", "1", "--json", "--redis-url", redis_url, "--prefix", prefix, timeout=40
    )
    assert r.returncode == 4, (r.returncode, r.stderr)
    assert "had not ended after 1 s" in one_line(r.stderr, header="run ")


def test_wrong_password_says_credentials_refused() -> None:
    with EmbeddedServer() as s:
        port = s.url.rsplit(":", 1)[1].split("/")[0]

        async def lock() -> None:
            r = connect(s.url)
            try:
                await r.config_set("requirepass", "x")
            finally:
                await r.aclose()

        asyncio.run(lock())
        r = cli("runs", "--redis-url", f"redis://:wrong-pw-4711@127.0.0.1:{port}/0", timeout=30)
        try:
            assert r.returncode == 3, (r.returncode, r.stderr)
            assert "refused the credentials" in one_line(r.stderr)
            assert "wrong-pw-4711" not in r.stderr + r.stdout
        finally:
            asyncio.run(_unlock(s.url.replace("redis://", "redis://:x@")))


async def _unlock(url: str) -> None:
    r = connect(url)
    try:
        await r.config_set("requirepass", "")
    finally:
        await r.aclose()


def test_password_in_url_query_is_never_printed() -> None:
    url = "redis://127.0.0.1:1/0?password=secret"
    r = cli("runs", "--redis-url", url, timeout=60)
    assert r.returncode == 3, (r.returncode, r.stderr)
    one_line(r.stderr)
    assert "secret" not in r.stderr + r.stdout, r.stderr
    w = subprocess.run(
        [str(BIN / "oao-worker"), "--redis-url", url],
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert w.returncode == 3, (w.returncode, w.stderr)
    assert "secret" not in w.stderr + w.stdout, w.stderr


async def test_tool_with_a_parameter_called_name(broker: Broker) -> None:
    doc = spec_doc([{"id": "t", "agent": "t", "retry": {"max_retries": 0}}], {})
    doc["agents"] = {"t": {"kind": "python", "entrypoint": f"{AGENTS}:tool_with_name_arg", "tools": ["echo"]}}
    doc["tools"] = {"echo": {"entrypoint": f"{AGENTS}:echo"}}
    rid = await submit(broker, doc)
    async with fleet(broker):
        await wait_for_run(broker, rid, interval_s=0.02, timeout_s=15)
    n = await node(broker, rid, "t")
    assert n["status"] == "SUCCEEDED", n
    assert json.loads(n["output"]) == "x"


async def test_all_nodes_failed_with_partial_allowed_is_failed(
    broker: Broker, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    doc = spec_doc(
        [{"id": f"b{i}", "agent": "broken", "retry": {"max_retries": 0}} for i in range(2)],
        {"broken": "oao_test_agents:broken"},
        failure={"allow_partial_completion": True, "max_failure_ratio": 1.0},
    )
    r = await asyncio.to_thread(
        cli,
        "run",
        write_spec(tmp_path, doc),
        "--json",
        "--redis-url",
        redis_url,
        "--prefix",
        prefix,
        timeout=60,
    )
    assert r.returncode == 1, (r.returncode, r.stderr)
    rep = json.loads(r.stdout)
    assert rep["status"] == "FAILED" and [n["status"] for n in rep["nodes"]] == ["FAILED", "FAILED"], rep


async def test_prefix_with_percent_runs_end_to_end(redis_url: str, prefix: str, tmp_path: Path) -> None:
    pct = f"{prefix}%test"
    spec = write_spec(
        tmp_path,
        spec_doc(
            [{"id": "a", "agent": "q"}, {"id": "b", "agent": "q", "depends_on": ["a"]}],
            {"q": f"{AGENTS}:quick"},
        ),
    )
    try:
        r = await asyncio.to_thread(
            cli, "run", spec, "--json", "--redis-url", redis_url, env=env(OAO_PREFIX=pct), timeout=30
        )
        assert r.returncode == 0, (r.returncode, r.stderr)
        rep = json.loads(r.stdout)
        assert rep["status"] == "SUCCEEDED", rep
        s = await asyncio.to_thread(
            cli, "status", rep["run_id"], "--json", "--redis-url", redis_url, "--prefix", pct
        )
        assert s.returncode == 0 and json.loads(s.stdout)["status"] == "SUCCEEDED", s.stderr
    finally:
        await _delete(redis_url, pct)


async def test_submit_wait_for_a_run_that_disappears_exits_3(
    broker: Broker, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    spec = write_spec(tmp_path, spec_doc([{"id": "a", "agent": "q"}], {"q": f"{AGENTS}:quick"}))
    p = subprocess.Popen(
        [
            str(BIN / "oao-scheduler"),
            "submit",
            spec,
            "--wait",
            "--json",
            "--redis-url",
            redis_url,
            "--prefix",
            prefix,
        ],
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        [run] = await wait_until(lambda: broker.recent_runs(1), bool, 15, "the run to be submitted")
        await _delete(redis_url, prefix)
        try:
            _out, err = await asyncio.to_thread(p.communicate, timeout=10)
        except subprocess.TimeoutExpired:
            raise AssertionError("submit --wait still waiting 10 s after its run was deleted") from None
        assert p.returncode == 3, (p.returncode, err)
        # "no longer in Redis" (or "does not exist in Redis" if it had not read the run yet)
        line = one_line(err)
        assert run["id"] in line and "in Redis" in line, line
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()


async def test_template_exception_fails_permanently(broker: Broker) -> None:
    rid = await submit(
        broker,
        spec_doc(
            [
                {
                    "id": "div",
                    "agent": "q",
                    "task": "{{ 1/0 }}",
                    "retry": {"max_retries": 2, "retry_delay_s": 0.05},
                }
            ],
            {"q": f"{AGENTS}:quick"},
        ),
    )
    async with fleet(broker):
        await wait_for_run(broker, rid, interval_s=0.02, timeout_s=15)
    n = await node(broker, rid, "div")
    assert n["status"] == "FAILED", n
    assert "ZeroDivisionError" in error_of(n)["message"], n
    assert n["attempt"] == "1" and n.get("retries", "0") == "0", n
    assert not of_type(await broker.events(rid), "NODE_RETRY_SCHEDULED")


async def _delete(url: str, prefix: str) -> None:
    r = connect(url)
    try:
        keys = [k async for k in r.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await r.delete(*keys)
    finally:
        await r.aclose()
