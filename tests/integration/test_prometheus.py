"""Checks with the real tools (Debian's ``prometheus`` package): ``promtool check metrics``
on a worker's and serve's ``/metrics``; a real Prometheus scraping both on loopback
during a run answers PromQL with the run's figures; every expression of the Grafana
dashboard returns data from it and names only metrics the fleet exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from proc import ROOT, cli, start_serve, start_worker, stop
from test_metrics import free_port, scrape

DASHBOARD = ROOT / "helm" / "oao" / "dashboards" / "oao-fleet.json"

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="Debian's prometheus package is not installed "
    "(apt-get install prometheus; .ci/run does it as root)",
)

SPEC = """
name: scraped
models:
  m:
    provider: scripted
    reply_delay_s: 0.2
    replies: [{content: "some words back"}]
    pricing: {input_usd_per_mtok: 3.0, output_usd_per_mtok: 15.0}
    rate_limit: {max_concurrent: 1}
    circuit_breaker: {min_calls: 1000}
tools:
  echo: {entrypoint: "oao_test_agents:echo", idempotent: true}
  flaky: {entrypoint: "oao_test_agents:flaky"}
agents:
  stepper: {kind: python, entrypoint: "oao_test_agents:traced_steps", model: m, tools: [echo]}
  flaky: {kind: python, entrypoint: "oao_test_agents:flaky"}
defaults:
  retry: {max_retries: 2, retry_delay_s: 0.1, backoff: 1.0, jitter: false}
failure: {allow_partial_completion: true, max_failure_ratio: 0.5}
nodes:
  - {id: s1, agent: stepper, task: ""}
  - {id: s2, agent: stepper, task: ""}
  - {id: s3, agent: stepper, task: ""}
  - {id: s4, agent: stepper, task: ""}
  - {id: flaky, agent: flaky, task: "promflaky:1"}
  - {id: capped, agent: stepper, task: "", policy: {max_steps: 1}}
"""
NODES, SUCCEEDED, FAILED = 6, 5, 1


def query(port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def scalar(port: int, expr: str) -> float | None:
    res = query(port, expr)
    return float(res[0]["value"][1]) if res else None


def eventually(port: int, expr: str, want: float, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    got = None
    while time.monotonic() < deadline:
        got = scalar(port, expr)
        if got == want:
            return
        time.sleep(0.25)
    raise AssertionError(f"{expr} = {got}, want {want}")


def promtool(text: str) -> None:
    r = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr  # no lint finding either


def families(text: str) -> set[str]:
    return set(re.findall(r"^# TYPE (\S+) ", text, re.M))


def dashboard_exprs() -> list[str]:
    d = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in d["panels"] for t in p.get("targets", [])]


def substitute(expr: str) -> str:
    """Grafana's variables as an "All" selection over a short range."""
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$__range", "5m")
        .replace("$__interval", "15s")
        .replace("$queue", ".*")
        .replace("$model", ".*")
    )


def test_prometheus_scrapes_a_run(redis_url: str, prefix: str, tmp_path: Path) -> None:
    wport, sport, pport = free_port(), free_port(), free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: oao-worker\n    static_configs: [{{targets: ['127.0.0.1:{wport}']}}]\n"
        f"  - job_name: oao-serve\n    static_configs: [{{targets: ['127.0.0.1:{sport}']}}]\n"
    )
    spec = tmp_path / "scraped.yaml"
    spec.write_text(SPEC)
    w = start_worker(redis_url, prefix, "--metrics-port", str(wport), log=tmp_path / "w.log")
    s = start_serve(
        redis_url, prefix, "--metrics-port", str(sport), "--reaper-interval", "0.2", log=tmp_path / "s.log"
    )
    prom_log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115
    prom = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{pport}",
        ],
        stdout=prom_log,
        stderr=prom_log,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{pport}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert prom.poll() is None and time.monotonic() < deadline, (
                tmp_path / "prometheus.log"
            ).read_text()
            time.sleep(0.2)
        eventually(pport, 'sum(up{job=~"oao-.*"})', 2)  # both targets scraped
        r = cli("submit", str(spec), "--wait", "--redis-url", redis_url, "--prefix", prefix)
        assert r.returncode == 0, r.stdout + r.stderr  # PARTIAL is allowed by the spec

        # the run's figures, from Prometheus
        eventually(pport, 'sum(oao_executions_total{status=~"succeeded|failed"})', NODES)
        eventually(pport, 'sum(oao_executions_total{status="succeeded"})', SUCCEEDED)
        eventually(pport, 'sum(oao_executions_total{status="failed"})', FAILED)
        eventually(pport, 'sum(oao_executions_total{status="retry"})', 1)
        eventually(pport, 'sum(oao_policy_violations_total{rule="max_steps"})', 1)
        eventually(pport, 'sum(oao_tool_calls_total{tool="echo", outcome="ok"})', 4)
        eventually(pport, 'sum(oao_retries_total{layer="node"})', 1)
        eventually(pport, 'max(oao_workers{state="alive"})', 1)
        eventually(pport, "sum(oao_active_agents)", 0)
        eventually(pport, 'max(oao_queue_depth{queue="default", band="normal", state="ready"})', 0)
        steps = scalar(pport, 'sum(oao_steps_total{kind="llm", mode="executed"})')
        assert steps == scalar(pport, 'sum(oao_step_duration_seconds_count{kind="llm"})') == 9
        assert (scalar(pport, 'sum(oao_rate_limit_waits_total{key="model:m"})') or 0) > 0
        assert (scalar(pport, 'sum(oao_cost_usd_total{model="m"})') or 0) > 0

        # promtool on both endpoints, with every series the run created
        wtext, stext = scrape(wport), scrape(sport)
        promtool(wtext)
        promtool(stext)

        # the dashboard: names only exported metrics, every expression returns data
        exported = families(wtext) | families(stext)
        for expr in dashboard_exprs():
            for name in re.findall(r"\boao_[a-z0-9_]+", expr):
                base = re.sub(r"_(bucket|count|sum|created)$", "", name)
                assert name in exported or base in exported, f"{name} (in {expr}) is not exported"
        empty = [e for e in dashboard_exprs() if not query(pport, substitute(e))]
        assert not empty, f"dashboard expressions without data: {empty}"
        for label, metric, want in (
            ("queue", "oao_queue_depth", "default"),
            ("model", "oao_token_usage_total", "m"),
        ):
            url = f"http://127.0.0.1:{pport}/api/v1/label/{label}/values?" + urllib.parse.urlencode(
                {"match[]": metric}
            )
            with urllib.request.urlopen(url, timeout=5) as resp:
                assert want in json.loads(resp.read())["data"]
    finally:
        prom.terminate()
        try:
            prom.wait(15)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()
        prom_log.close()
        stop(w, s)
