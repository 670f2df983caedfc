"""Writes the Grafana dashboard of the fleet:

    python deploy/grafana/build_dashboard.py > helm/oao/dashboards/oao-fleet.json

(the one dashboard: the Helm chart ships it as a ConfigMap; import it into any Grafana)

Every expression uses only metrics of oao_common/metrics.py; tests/integration/test_prometheus.py
runs each against a real Prometheus during a run."""

import json

RI = "$__rate_interval"
panels = []
pid = 0
y = 0


def row(title):
    global pid, y
    pid += 1
    panels.append(
        {
            "type": "row",
            "title": title,
            "id": pid,
            "collapsed": False,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
        }
    )
    y += 1


def panel(title, targets, unit="short", w=12, h=8, x=0, kind="timeseries", desc="", stack=False):
    global pid
    pid += 1
    p = {
        "type": kind,
        "title": title,
        "id": pid,
        "description": desc,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": h, "w": w, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]}
        }
        if kind == "timeseries"
        else {"reduceOptions": {"calcs": ["lastNotNull"]}},
        "targets": [
            {
                "refId": chr(65 + i),
                "expr": e,
                "legendFormat": lf,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
            }
            for i, (e, lf) in enumerate(targets)
        ],
    }
    if stack:
        p["fieldConfig"]["defaults"]["custom"] = {"stacking": {"mode": "normal"}, "fillOpacity": 30}
    panels.append(p)
    return p


def line(*ps):
    global y
    w = 24 // len(ps)
    for i, p in enumerate(ps):
        p["gridPos"].update({"x": i * w, "w": w, "y": y})
    y += max(p["gridPos"]["h"] for p in ps)


row("Fleet")
line(
    panel(
        "Node attempts finished / s",
        [(f"sum by (status) (rate(oao_executions_total[{RI}]))", "{{status}}")],
        "ops",
        kind="timeseries",
        stack=True,
    ),
    panel("Steps / s", [(f"sum by (kind, mode) (rate(oao_steps_total[{RI}]))", "{{kind}} {{mode}}")], "ops"),
)
line(
    panel("Runs in flight", [("max(oao_runs_in_flight)", "runs")], kind="stat", h=5),
    panel(
        "Active agents",
        [("sum(oao_active_agents)", "running"), ('max(oao_fleet_slots{state="total"})', "slots")],
        kind="stat",
        h=5,
    ),
    panel("Workers", [("max by (state) (oao_workers)", "{{state}}")], kind="stat", h=5),
    panel(
        "Dead letters (range)",
        [("sum(increase(oao_jobs_dead_lettered_total[$__range]))", "dead-lettered")],
        kind="stat",
        h=5,
    ),
)
row("Latency")
line(
    panel(
        "Node attempt duration",
        [
            (
                f"histogram_quantile({q}, sum by (le) (rate(oao_execution_duration_seconds_bucket[{RI}])))",
                f"p{int(q * 100)}",
            )
            for q in (0.5, 0.95, 0.99)
        ],
        "s",
    ),
    panel(
        "Step duration by kind",
        [
            (
                f"histogram_quantile({q}, sum by (le, kind) (rate(oao_step_duration_seconds_bucket[{RI}])))",
                f"{{{{kind}}}} p{int(q * 100)}",
            )
            for q in (0.5, 0.95, 0.99)
        ],
        "s",
    ),
)
row("Queues")
line(
    panel(
        "Queue depth ($queue)",
        [('sum by (queue, band, state) (oao_queue_depth{queue=~"$queue"})', "{{queue}} {{band}} {{state}}")],
        stack=True,
    ),
    panel(
        "Ready jobs by band ($queue)",
        [('sum by (band) (oao_queue_depth{queue=~"$queue", state="ready"})', "{{band}}")],
    ),
)
row("Tokens and cost")
line(
    panel(
        "Tokens / min by model ($model)",
        [
            (
                f'sum by (model, kind) (rate(oao_token_usage_total{{model=~"$model"}}[{RI}])) * 60',
                "{{model}} {{kind}}",
            )
        ],
    ),
    panel(
        "USD / hour by model ($model)",
        [(f'sum by (model) (rate(oao_cost_usd_total{{model=~"$model"}}[{RI}])) * 3600', "{{model}}")],
        "currencyUSD",
    ),
)
row("Governance and recovery")
line(
    panel(
        "Policy violations by rule",
        [(f"sum by (rule) (increase(oao_policy_violations_total[{RI}]))", "{{rule}}")],
    ),
    panel(
        "Retries and requeues",
        [
            (f"sum by (layer) (rate(oao_retries_total[{RI}]))", "retry {{layer}}"),
            (f"sum by (reason) (rate(oao_jobs_requeued_total[{RI}]))", "requeue {{reason}}"),
            (f"sum(rate(oao_jobs_dead_lettered_total[{RI}]))", "dead-lettered"),
            (f"sum(rate(oao_stale_writes_total[{RI}]))", "stale writes"),
        ],
        "ops",
    ),
)
line(
    panel(
        "Rate-limit waits (s waited / s)",
        [(f"sum by (key) (rate(oao_rate_limit_wait_seconds_total[{RI}]))", "{{key}}")],
    ),
    panel("Circuit state (0 closed, 1 half-open, 2 open)", [("max by (key) (oao_circuit_state)", "{{key}}")]),
    panel(
        "Tool calls / s",
        [(f"sum by (tool, outcome) (rate(oao_tool_calls_total[{RI}]))", "{{tool}} {{outcome}}")],
        "ops",
    ),
)
row("Worker health")
line(
    panel(
        "Heartbeat age",
        [
            ("max(oao_fleet_heartbeat_age_max_seconds)", "oldest live (serve)"),
            ("max by (instance) (oao_worker_heartbeat_age_seconds)", "{{instance}}"),
        ],
        "s",
    ),
    panel("Event-loop lag", [("max by (instance) (oao_event_loop_lag_seconds)", "{{instance}}")], "s"),
    panel(
        "Blocked loops and Redis errors",
        [
            (f"sum(rate(oao_event_loop_blocked_seconds_count[{RI}]))", "blocked episodes"),
            (
                f"sum by (loop) (rate(oao_redis_errors_total[{RI}])) or on() vector(0)",
                "redis errors {{loop}}",
            ),
        ],
        "ops",
    ),
)


def var(name, query, label):
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": f"var-{name}"},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "sort": 1,
    }


dash = {
    "title": "OAO fleet",
    "uid": "oao-fleet",
    "description": (
        "Open Agent Orchestrator: throughput, latency, queues, tokens and cost, governance, "
        "worker health (docs/observability.md)"
    ),
    "tags": ["oao"],
    "timezone": "utc",
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "refresh": "10s",
    "time": {"from": "now-1h", "to": "now"},
    "templating": {
        "list": [
            {
                "name": "datasource",
                "label": "Prometheus",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
            },
            var("queue", "label_values(oao_queue_depth, queue)", "queue"),
            var("model", "label_values(oao_token_usage_total, model)", "model"),
        ]
    },
    "panels": panels,
    "annotations": {"list": []},
}
print(json.dumps(dash, indent=2))
