"""The fleet's trust controls (docs/security.md), each exercised for real: worker
processes that refuse entrypoints without importing them, providers that refuse API-key
variables and addresses, webhooks that are never sent to link-local addresses, and
pinned connections that still verify TLS by name."""

from __future__ import annotations

import json
import ssl
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from oao_testkit import make_spec, of_type, run_spec
from openai_server import OpenAIStubServer
from proc import cli, start_worker, stop
from tls_certs import make_certs

from oao_common.broker import Broker
from oao_common.errors import PermanentError, TransientError, TrustError
from oao_common.safe_http import BlockedDestination, GuardedTransport, guarded_client
from oao_common.spec import OpenAIModelSpec, Spec
from oao_common.trust import TrustPolicy
from oao_scheduler.escalation import Escalator
from oao_scheduler.progress import wait_for_run
from oao_scheduler.submit import submit_spec
from oao_worker.providers.base import ModelRequest
from oao_worker.providers.openai_provider import OpenAIProvider

NO_RETRY = {"retry": {"max_retries": 3, "retry_delay_s": 0.01, "jitter": False}}  # a retry would show
PROBE = "oao_trust_probe:run"


async def nothing(_text: str, _tokens: int) -> None:
    return None


def request() -> ModelRequest:
    return ModelRequest(model="m", messages=[{"role": "user", "content": "hi"}])


async def node(broker: Broker, rid: str, nid: str) -> dict[str, Any]:
    [n] = await broker.get_nodes(rid, [nid])
    out: dict[str, Any] = dict(n)
    out["error"] = json.loads(n["error"]) if n.get("error") else None
    return out


def assert_refused(n: dict[str, Any], *words: str) -> None:
    """FAILED at once with a one-line TrustError containing ``words``, never retried."""
    assert n["status"] == "FAILED", n
    assert n["error"]["type"] == "TrustError", n["error"]
    assert n["attempt"] == "1" and n["retries"] == "0"
    msg = n["error"]["message"]
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


# ------------------------------------------------------------------ entrypoints


async def test_worker_process_never_imports_a_refused_entrypoint(
    broker: Broker, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    marker = tmp_path / "imported"
    spec = make_spec(
        [{"id": "ok", "agent": "noop"}, {"id": "probe", "agent": "probe"}, {"id": "shell", "agent": "shell"}],
        agents={
            "noop": {"kind": "python", "entrypoint": "oao_test_agents:noop"},
            "probe": {"kind": "python", "entrypoint": PROBE},
            "shell": {"kind": "python", "entrypoint": "os:system"},
        },
        defaults=NO_RETRY,
    )
    env = {"TRUST_PROBE_MARKER": str(marker)}
    worker = start_worker(
        redis_url, prefix, "--allow-entrypoints", "oao_test_agents,examples.*", extra_env=env
    )
    try:
        rid = (await submit_spec(broker, spec)).run_id
        assert await wait_for_run(broker, rid, interval_s=0.05, timeout_s=30) == "FAILED"
    finally:
        stop(worker)
    assert (await node(broker, rid, "ok"))["status"] == "SUCCEEDED"
    probe = await node(broker, rid, "probe")
    assert_refused(probe, repr(PROBE), "--allow-entrypoints", "OAO_ALLOW_ENTRYPOINTS")
    assert_refused(await node(broker, rid, "shell"), "'os:system'", "--allow-entrypoints")
    assert not marker.exists()

    # The probe does leave its mark when a worker lets it through (the check can fail).
    open_worker = start_worker(redis_url, prefix, extra_env=env)
    try:
        probe_only = make_spec(
            [{"id": "probe", "agent": "probe"}], agents={"probe": {"kind": "python", "entrypoint": PROBE}}
        )
        rid2 = (await submit_spec(broker, probe_only)).run_id
        assert await wait_for_run(broker, rid2, interval_s=0.05, timeout_s=30) == "SUCCEEDED"
    finally:
        stop(open_worker)
    assert marker.read_text().startswith("imported")


async def test_allowed_module_does_not_open_its_imports(broker: Broker) -> None:
    agents = {
        "noop": {"kind": "python", "entrypoint": "oao_test_agents:noop"},
        "via_os": {"kind": "python", "entrypoint": "oao_test_agents:os.system"},  # os is imported there
        "via_class": {"kind": "python", "entrypoint": "oao_test_agents:Path"},
        "dunder": {"kind": "python", "entrypoint": "oao_test_agents:noop.__globals__"},
    }
    spec = make_spec([{"id": k, "agent": k} for k in agents], agents=agents, defaults=NO_RETRY)
    rid = await run_spec(broker, spec, trust=TrustPolicy(entrypoints=("oao_test_agents",)))
    assert (await node(broker, rid, "noop"))["status"] == "SUCCEEDED"
    assert_refused(await node(broker, rid, "via_os"), "oao_test_agents:os.system", "from module posix")
    assert_refused(await node(broker, rid, "via_class"), "from module pathlib")
    assert_refused(await node(broker, rid, "dunder"), "dunder")


async def test_refused_tool_fails_the_nodes_of_its_run(broker: Broker) -> None:
    spec = make_spec(
        [{"id": "a", "agent": "noop"}],
        agents={"noop": {"kind": "python", "entrypoint": "oao_test_agents:noop"}},
        tools={"rm": {"entrypoint": "shutil:rmtree"}},
        defaults=NO_RETRY,
    )
    rid = await run_spec(broker, spec, trust=TrustPolicy(entrypoints=("oao_test_agents",)))
    assert_refused(await node(broker, rid, "a"), "'shutil:rmtree'", "--allow-entrypoints")


def test_cli_refuses_entrypoints_before_running(tmp_path: Path) -> None:
    from proc import env

    marker = tmp_path / "imported"
    spec = tmp_path / "probe.yaml"
    spec.write_text(
        "name: probe\nagents: {p: {kind: python, entrypoint: 'oao_trust_probe:run'},"
        " sh: {kind: python, entrypoint: 'os:system'}}\n"
        "nodes: [{id: a, agent: p}, {id: b, agent: sh}]\n"
    )
    e = env(OAO_ALLOW_ENTRYPOINTS="oao_test_agents", TRUST_PROBE_MARKER=str(marker))
    for args in (["run", str(spec)], ["validate", str(spec)], ["submit", str(spec)]):
        r = cli(*args, env=e)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 2 and "Traceback" not in r.stderr
        assert "agents.p.entrypoint: entrypoint 'oao_trust_probe:run' is not allowed" in lines[0]
        assert "--allow-entrypoints" in lines[0] and "agents.sh.entrypoint" in lines[1]
    assert not marker.exists()
    ok = cli("validate", str(spec), "--allow-entrypoints", "oao_trust_probe,os", env=env())
    assert ok.returncode == 0, ok.stderr
    bad = cli("validate", str(spec), "--allow-hosts", "10.0.0.0/33")
    assert bad.returncode == 2 and "not an IP network" in bad.stderr


# ------------------------------------------------------------------ API keys


def openai_spec(base_url: str, **model: Any) -> Spec:
    return make_spec(
        [{"id": "ask", "agent": "chat", "task": "hi"}],
        agents={"chat": {"kind": "llm", "model": "m"}},
        models={"m": {"provider": "openai", "model": "gpt-test", "base_url": base_url, **model}},
        defaults=NO_RETRY,
    )


@pytest.mark.parametrize("var", ["REDIS_PASSWORD", "HOME", "VAULT_SECRET_API_KEY"])
async def test_worker_refuses_api_key_env(broker: Broker, var: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(var, "hunter2-secret-value")
    with OpenAIStubServer() as server:
        server.reply_text("should never be asked")
        rid = await run_spec(broker, openai_spec(server.base_url, api_key_env=var))
        assert server.requests == []  # nothing was sent anywhere
    assert_refused(await node(broker, rid, "ask"), f"models.m.api_key_env: {var!r} is refused")


async def test_oao_settings_are_never_api_keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OAO_REDIS_URL", "redis://:hunter2@10.0.0.1:6379/0")
    with OpenAIStubServer() as server:
        # Refused when the spec is read (submit, validate, and a worker reading a stored spec)...
        spec = tmp_path / "leak.yaml"
        spec.write_text(
            f"name: leak\nmodels: {{m: {{provider: openai, model: x, base_url: '{server.base_url}',"
            " api_key_env: OAO_REDIS_URL}}\nagents: {a: {kind: llm, model: m}}\nnodes: [{id: n, agent: a}]\n"
        )
        r = cli("validate", str(spec))
        assert r.returncode == 2 and "models.m.api_key_env" in r.stderr and "OAO_" in r.stderr
        # ...and by the provider itself, whatever the allow-list says.
        m = OpenAIModelSpec.model_construct(
            provider="openai", model="x", base_url=server.base_url, api_key_env="OAO_REDIS_URL"
        )
        for policy in (TrustPolicy(), TrustPolicy(api_key_envs=("*", "OAO_REDIS_URL"))):
            with pytest.raises(TrustError, match="OAO_"):
                OpenAIProvider("m", m, policy)
        assert server.requests == []


async def test_allowed_api_key_env_reaches_the_model(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_SECRET", "tok-123")
    with OpenAIStubServer() as server:
        server.reply_text("fine")
        trust = TrustPolicy(api_key_envs=("*_API_KEY", "VLLM_SECRET"))
        rid = await run_spec(broker, openai_spec(server.base_url, api_key_env="VLLM_SECRET"), trust=trust)
        assert [r.headers["authorization"] for r in server.requests] == ["Bearer tok-123"]
    n = await node(broker, rid, "ask")
    assert n["status"] == "SUCCEEDED" and json.loads(n["output"]) == "fine"


# ------------------------------------------------------------------ model addresses


@pytest.mark.parametrize(
    "url",
    ["http://169.254.169.254/v1", "http://[::ffff:169.254.169.254]/v1", "http://2852039166/v1"],
)
async def test_link_local_base_url_is_refused(broker: Broker, url: str) -> None:
    rid = await run_spec(broker, openai_spec(url))
    assert_refused(await node(broker, rid, "ask"), "models.m.base_url", "link-local / cloud-metadata")


class Redirector:
    """A real HTTP server on 127.0.0.1 answering every request with a redirect."""

    def __init__(self, status: int, location: str) -> None:
        self.hits: list[str] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                outer.hits.append(self.path)
                n = int(self.headers.get("content-length") or 0)
                self.rfile.read(n)
                self.send_response(status)
                self.send_header("location", location)
                self.send_header("content-length", "0")
                self.end_headers()

            do_GET = do_POST = _answer

            def log_message(self, *a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def to_metadata() -> Iterator[Redirector]:
    r = Redirector(307, "http://169.254.169.254/latest/meta-data/iam/")
    yield r
    r.close()


async def test_model_redirect_to_metadata_is_refused(to_metadata: Redirector) -> None:
    spec = OpenAIModelSpec(provider="openai", model="x", base_url=to_metadata.url + "/v1", timeout_s=5)
    provider = OpenAIProvider("m", spec)
    try:
        with pytest.raises(TrustError) as e:
            await provider.complete(request(), nothing)
    finally:
        await provider.aclose()
    assert isinstance(e.value, PermanentError) and not isinstance(e.value, TransientError)
    assert "169.254.169.254" in str(e.value) and "link-local" in str(e.value)
    assert to_metadata.hits == ["/v1/chat/completions"]  # one hop, then refused


async def test_deny_private_networks_checks_the_resolved_address() -> None:
    with OpenAIStubServer() as server:
        server.reply_text("pinned")
        url = f"http://localhost:{server.port}/v1"
        m = OpenAIModelSpec(provider="openai", model="x", base_url=url)
        refused = OpenAIProvider("m", m, TrustPolicy(deny_private_networks=True))
        exempt = TrustPolicy(deny_private_networks=True, allow_hosts=("localhost", "127.0.0.0/8"))
        allowed = OpenAIProvider("m", m, exempt)
        try:
            with pytest.raises(TrustError, match=r"'localhost' resolves to 127\.0\.0\.1") as e:
                await refused.complete(request(), nothing)
            assert "--deny-private-networks" in str(e.value)
            assert server.requests == []
            reply = await allowed.complete(request(), nothing)
        finally:
            await refused.aclose()
            await allowed.aclose()
        assert reply.content == "pinned"
        # Connected to the checked address, and the server still saw the name.
        assert server.requests[0].headers["host"] == f"localhost:{server.port}"


async def test_pinned_https_still_verifies_the_certificate_by_name(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)

    class H(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"tls ok"
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(certs.cert, certs.key)
    httpd.socket = server_ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    trusting = ssl.create_default_context(cafile=str(certs.ca))
    try:
        # The certificate names "localhost" only: the pinned connection to 127.0.0.1
        # verifies it against the name (SNI), not the address.
        async with guarded_client(TrustPolicy(), transport_kw={"verify": trusting}) as client:
            resp = await client.get(f"https://localhost:{port}/")
            assert resp.status_code == 200 and resp.text == "tls ok"
            with pytest.raises(httpx.ConnectError, match=r"CERTIFICATE_VERIFY_FAILED|match"):
                await client.get(f"https://127.0.0.1:{port}/")  # not the certificate's name
        async with guarded_client(TrustPolicy()) as untrusting:  # system CAs only
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await untrusting.get(f"https://localhost:{port}/")
    finally:
        httpd.shutdown()
        httpd.server_close()


# ------------------------------------------------------------------ webhooks


def failing_spec(webhook: str) -> Spec:
    return make_spec(
        [{"id": "bad", "agent": "broken"}],
        defaults={"retry": {"max_retries": 0}},
        escalation={"webhook": webhook, "max_attempts": 3},
    )


async def escalated(broker: Broker, rid: str) -> dict[str, Any]:
    [ev] = of_type(await broker.events(rid), "ESCALATED")
    return dict(ev.data)


async def test_link_local_webhook_is_never_contacted(broker: Broker) -> None:
    hook = "http://169.254.169.254/latest/meta-data/"
    rid = await run_spec(broker, failing_spec(hook))
    assert await Escalator(broker, backoff_cap_s=0.01).poll() == 1
    ev = await escalated(broker, rid)
    assert ev["ok"] is False and ev["attempts"] == 0 and ev["http_status"] is None
    assert ev["error"].startswith("escalation.webhook: ") and "link-local" in ev["error"]


async def test_webhook_redirect_is_not_followed(broker: Broker, to_metadata: Redirector) -> None:
    rid = await run_spec(broker, failing_spec(to_metadata.url + "/hook"))
    await Escalator(broker, backoff_cap_s=0.01).poll()
    ev = await escalated(broker, rid)
    assert ev == {"webhook": to_metadata.url + "/hook", "ok": False, "http_status": 307, "attempts": 1}
    assert to_metadata.hits == ["/hook"]


async def test_webhook_name_resolving_to_private_address_is_refused(broker: Broker) -> None:
    got: list[str] = []

    class H(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(self.path)
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *a: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    hook = f"http://localhost:{httpd.server_address[1]}/hook"
    try:
        rid = await run_spec(broker, failing_spec(hook))
        strict = Escalator(broker, backoff_cap_s=0.01, trust=TrustPolicy(deny_private_networks=True))
        await strict.poll()
        ev = await escalated(broker, rid)
        assert ev["ok"] is False and ev["attempts"] == 1  # refused at connect time, not retried
        assert "'localhost' resolves to 127.0.0.1" in ev["error"] and got == []
        rid2 = await run_spec(broker, failing_spec(hook))
        await Escalator(broker).poll()  # the default policy lets loopback through
        assert (await escalated(broker, rid2))["ok"] is True and got == ["/hook"]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_validate_refuses_link_local_webhook(tmp_path: Path) -> None:
    spec = tmp_path / "hook.yaml"
    spec.write_text(
        "name: hook\nagents: {a: {kind: python, entrypoint: 'oao_test_agents:noop'}}\n"
        "escalation: {webhook: 'http://169.254.169.254/hook'}\nnodes: [{id: n, agent: a}]\n"
    )
    r = cli("validate", str(spec))
    assert r.returncode == 2 and "escalation.webhook" in r.stderr and "link-local" in r.stderr
    assert "oao_trust_probe" not in sys.modules  # nothing in this process imported the probe


class FixedDNS(GuardedTransport):
    """A guarded transport whose name resolution answers from a table (the tests cannot
    run a DNS server); everything after resolution is the real code path."""

    def __init__(self, table: dict[str, list[str]], policy: TrustPolicy) -> None:
        super().__init__(policy, "models.m.base_url")
        self.table = table

    async def resolve(self, host: str, port: int) -> list[str]:
        return self.table[host]


async def test_connection_goes_to_the_checked_address() -> None:
    with OpenAIStubServer() as server:
        server.reply_text("pinned")
        # "rebind.invalid" exists only in our table: the request can only succeed if the
        # transport connects to the address it checked instead of resolving again.
        table = {"rebind.invalid": ["127.0.0.1"], "meta.invalid": ["127.0.0.1", "169.254.169.254"]}
        async with httpx.AsyncClient(transport=FixedDNS(table, TrustPolicy())) as client:
            resp = await client.post(
                f"http://rebind.invalid:{server.port}/v1/chat/completions",
                json={"model": "x", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == "pinned"
            assert server.requests[0].headers["host"] == f"rebind.invalid:{server.port}"
            # Every address of a name is checked, not only the first.
            with pytest.raises(BlockedDestination, match=r"'meta\.invalid' resolves to 169\.254\.169\.254"):
                await client.get(f"http://meta.invalid:{server.port}/")
        assert len(server.requests) == 1
