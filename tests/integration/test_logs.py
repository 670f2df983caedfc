"""Logs of a real worker process: JSON off a terminal, the attempt's identity and trace
ids on every record of a node, secrets redacted from logs, stored errors, events and spans."""

from __future__ import annotations

import json
from pathlib import Path

from otlp_receiver import Receiver
from proc import cli, start_serve, start_worker, stop

SECRETS = ("hunter2pw", "tok_abcdefghijk", "zq-LEAKY-key-4242")

SPEC = """
name: logged
models:
  m:
    provider: scripted
    replies: [{content: "fine"}]
  remote:
    provider: openai
    model: some-model
    base_url: http://127.0.0.1:9/v1
    api_key_env: LEAK_TEST_API_KEY
tools:
  echo: {entrypoint: "oao_test_agents:echo", idempotent: true}
agents:
  stepper: {kind: python, entrypoint: "oao_test_agents:traced_steps", model: m, tools: [echo]}
  leaker: {kind: python, entrypoint: "oao_test_agents:leaky"}
defaults:
  retry: {max_retries: 0}
failure: {allow_partial_completion: true, max_failure_ratio: 0.5}
nodes:
  - {id: ok, agent: stepper, task: ""}
  - {id: leak, agent: leaker}
"""


def test_worker_logs_json_with_ids_and_no_secrets(redis_url: str, prefix: str, tmp_path: Path) -> None:
    rec = Receiver().start()
    spec = tmp_path / "logged.yaml"
    spec.write_text(SPEC)
    extra = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": rec.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "LEAK_TEST_API_KEY": SECRETS[2],
    }
    log = tmp_path / "w.log"
    # stderr is a file, not a terminal: JSON without OAO_LOG_FORMAT
    w = start_worker(redis_url, prefix, log=log, extra_env={**extra, "OAO_LOG_FORMAT": ""})
    s = start_serve(redis_url, prefix, "--reaper-interval", "0.1", log=tmp_path / "s.log", extra_env=extra)
    try:
        r = cli("submit", str(spec), "--wait", "--redis-url", redis_url, "--prefix", prefix)
        assert r.returncode == 0, r.stdout + r.stderr
        rid = r.stdout.split()[0]
        spans = rec.wait_for(lambda sp: any(x.name == "oao.run" for x in sp))
        status = cli("status", rid, "--json", "--redis-url", redis_url, "--prefix", prefix)
        events = cli("events", rid, "--json", "--redis-url", redis_url, "--prefix", prefix)
    finally:
        stop(w, s)
        rec.stop()
    text = log.read_text()
    lines = [json.loads(x) for x in text.splitlines() if x.strip()]  # every line is JSON
    node_lines = [x for x in lines if x.get("event", "").startswith("node.")]
    assert {x["event"] for x in node_lines} >= {"node.succeeded", "node.failed"}
    for x in node_lines:
        assert x["run_id"] == rid and x["node_id"] in ("ok", "leak") and x["attempt"] == 1
        assert x["worker_id"] and len(x["trace_id"]) == 32 and len(x["span_id"]) == 16
    ok_line = next(x for x in node_lines if x["event"] == "node.succeeded")
    ok_span = next(x for x in spans if x.name == "oao.node" and x.attrs["oao.node.id"] == "ok")
    assert (ok_line["trace_id"], ok_line["span_id"]) == (ok_span.trace_id, ok_span.span_id)
    leak_span = next(x for x in spans if x.name == "oao.node" and x.attrs["oao.node.id"] == "leak")
    assert leak_span.status == 2
    span_text = json.dumps([(x.attrs, x.events) for x in spans])
    for where, out in {
        "worker log": text,
        "status": status.stdout,
        "events": events.stdout,
        "spans": span_text,
        "serve log": (tmp_path / "s.log").read_text(),
    }.items():
        for secret in SECRETS:
            assert secret not in out, f"{secret} in the {where}"
    assert "redis://svc:***@db.internal" in status.stdout  # the message is kept, the secret is not
