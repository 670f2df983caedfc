"""OAO under the Redis ACL users of docs/security.md, on the machine's Redis 7
(127.0.0.1:6379, database 15; skipped when it is not reachable).

Each test creates uniquely named ACL users restricted to a unique key prefix (the
docs' ``~oao:*`` / ``&oao:*`` with this test's prefix in place of ``oao``) and deletes
them, and every key under that prefix, afterwards.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from proc import ROOT, cli, start_serve, start_worker, stop

from oao_common.keys import Keys

ADMIN_URL = os.environ.get("OAO_TEST_ACL_REDIS_URL", "redis://127.0.0.1:6379/15")

# The exact rules of docs/security.md, with "oao" as {p}.
WORKER_RULES = (
    "resetkeys ~{p}:* resetchannels &{p}:* -@all +@read +@write +@scripting +@pubsub +@transaction "
    "+@connection +time -@dangerous -function -fcall -fcall_ro -script|flush -script|kill"
)
READONLY_RULES = "resetkeys %R~{p}:* resetchannels -@all +@read +@transaction +@connection -@dangerous"


def _admin() -> redis.Redis:
    r = redis.Redis.from_url(ADMIN_URL, socket_connect_timeout=2, decode_responses=True)
    try:
        r.ping()
        if not str(r.info("server").get("redis_version", "0")).startswith(("7", "8")):
            pytest.skip("needs Redis 7+ ACLs")
    except (redis.ConnectionError, redis.TimeoutError) as e:
        pytest.skip(f"no Redis at {ADMIN_URL}: {e}")
    return r


class AclSetup:
    def __init__(self, admin: redis.Redis) -> None:
        tag = uuid.uuid4().hex[:10]
        self.admin = admin
        self.prefix = f"oaoacl{tag}"
        self.users: dict[str, str] = {}
        for role, rules in (("worker", WORKER_RULES), ("readonly", READONLY_RULES)):
            name, password = f"oaotest-{role}-{tag}", uuid.uuid4().hex
            admin.execute_command("ACL", "SETUSER", name, "reset", "on", f">{password}",
                                  *rules.format(p=self.prefix).split())  # fmt: skip
            self.users[role] = f"redis://{name}:{password}@127.0.0.1:6379/15"

    def client(self, role: str) -> redis.Redis:
        return redis.Redis.from_url(self.users[role], decode_responses=True)

    def close(self) -> None:
        for url in self.users.values():
            self.admin.execute_command("ACL", "DELUSER", url.split("//")[1].split(":")[0])
        keys = list(self.admin.scan_iter(match=f"{self.prefix}:*", count=1000))
        if keys:
            self.admin.delete(*keys)
        self.admin.close()


@pytest.fixture
def acl() -> Iterator[AclSetup]:
    s = AclSetup(_admin())
    try:
        yield s
    finally:
        s.close()


def test_docs_show_the_tested_rules() -> None:
    doc = (ROOT / "docs" / "security.md").read_text()
    assert WORKER_RULES.format(p="oao") in doc
    assert READONLY_RULES.format(p="oao") in doc


def wait_until(cond: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def assert_cancel_reaches_the_worker(acl: AclSetup, tmp_path: Path) -> None:
    """``cancel`` as the worker user: the run is cancelled and the control message
    (pub/sub on ``<prefix>:control``) stops the running node on the worker."""
    spec = tmp_path / "sleepy.yaml"
    spec.write_text(
        "name: sleepy\nagents: {s: {kind: python, entrypoint: 'oao_test_agents:sleeper'}}\n"
        "nodes: [{id: s, agent: s, task: '30'}]\n"
    )
    url, keys = acl.users["worker"], Keys(acl.prefix)
    r = cli("submit", str(spec), "--redis-url", url, "--prefix", acl.prefix)
    assert r.returncode == 0, r.stderr
    rid = r.stdout.strip()
    wait_until(lambda: acl.admin.hget(keys.node(rid, "s"), "status") == "RUNNING")
    c = cli("cancel", rid, "--redis-url", url, "--prefix", acl.prefix)
    assert c.returncode == 0 and "cancelled" in c.stdout, c.stderr
    wait_until(lambda: '"node.stopped"' in (tmp_path / "worker.log").read_text())
    assert acl.admin.hget(keys.run(rid), "status") == "CANCELLED"


def test_restricted_users_run_a_workflow_end_to_end(acl: AclSetup, tmp_path: Path) -> None:
    p, worker_url, ro_url = acl.prefix, acl.users["worker"], acl.users["readonly"]
    worker = start_worker(worker_url, p, "--concurrency", "4", log=tmp_path / "worker.log")
    serve = start_serve(worker_url, p, log=tmp_path / "serve.log")
    try:
        r = cli("submit", "examples/blog_post.yaml", "--redis-url", worker_url, "--prefix", p,
                "--wait", "--timeout", "60", "--json")  # fmt: skip
        assert r.returncode == 0, (r.stderr, (tmp_path / "worker.log").read_text()[-3000:])
        report = json.loads(r.stdout)
        assert report["status"] == "SUCCEEDED"
        assert [n["status"] for n in report["nodes"]] == ["SUCCEEDED"] * 4
        again = cli("submit", "examples/blog_post.yaml", "--redis-url", worker_url, "--prefix", p,
                    "--idempotency-key", "once", "--json")  # fmt: skip
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["created"] is True
        assert_cancel_reaches_the_worker(acl, tmp_path)
    finally:
        stop(worker, serve)
    # run (in-process workers, no idempotency key) as the same user
    ran = cli("run", "examples/blog_post.yaml", "--redis-url", worker_url, "--prefix", p,
              "--timeout", "60", "--json", timeout=90)  # fmt: skip
    assert ran.returncode == 0 and "Traceback" not in ran.stderr, ran.stderr
    assert json.loads(ran.stdout)["status"] == "SUCCEEDED"

    # A dashboard user reads everything about the run...
    for cmd in ("status", "report", "events"):
        shown = cli(cmd, report["run_id"], "--redis-url", ro_url, "--prefix", p, "--json")
        assert shown.returncode == 0, (cmd, shown.stderr)
    assert json.loads(cli("status", report["run_id"], "--redis-url", ro_url, "--prefix", p, "--json")
                      .stdout)["status"] == "SUCCEEDED"  # fmt: skip
    assert cli("runs", "--redis-url", ro_url, "--prefix", p).returncode == 0
    refused = cli("submit", "examples/blog_post.yaml", "--redis-url", ro_url, "--prefix", p)
    assert refused.returncode == 3 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("error: Redis refused a command for lack of permission")

    # ...and neither user gets past its prefix or its commands.
    w, ro = acl.client("worker"), acl.client("readonly")
    try:
        for denied in (
            lambda: w.set("elsewhere:x", "1"),
            lambda: w.get("elsewhere:x"),
            lambda: w.publish("elsewhere", "x"),
            lambda: w.flushdb(),
            lambda: w.keys("*"),
            lambda: w.execute_command("CONFIG", "GET", "requirepass"),
            lambda: w.execute_command("FUNCTION", "FLUSH"),
            lambda: ro.hset(f"{p}:run:x", "status", "FAILED"),
            lambda: ro.publish(f"{p}:control", "cancel x"),
            lambda: ro.evalsha("0" * 40, 0),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                denied()
    finally:
        w.close()
        ro.close()
