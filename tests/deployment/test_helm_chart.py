"""The Helm chart (helm/oao) through Helm's own engine (helm-python-sdk: Helm's Go SDK, no
helm binary): lint, render with several value sets, validate every manifest against the
Kubernetes schemas (kubernetes-validate; custom resources against tests/deployment/
crd_schemas.py), and check the wiring: probes hit the port the worker serves its health
on, the grace periods agree, the command lines parse with the real CLIs and match the
values, selectors select what they should, the autoscaler reads the right lists and
metrics, the dashboard only queries metrics the fleet exports.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml
from crd_schemas import BY_KIND
from prometheus_client.metrics import MetricWrapperBase

import oao_common.metrics
from oao_scheduler import cli as scheduler_cli
from oao_worker import cli as worker_cli

CHART = Path(__file__).resolve().parents[2] / "helm" / "oao"
RELEASE, NAMESPACE = "fleet", "agents"
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())

EXTERNAL_TLS: dict[str, Any] = {
    "redis": {
        "internal": {"enabled": False},
        "host": "redis.data.svc",
        "port": 6380,
        "db": 2,
        "username": "oao-worker",
        "passwordSecret": {"name": "redis-pw", "key": "password"},
        "tls": {
            "enabled": True,
            "secretName": "redis-tls",
            "caKey": "ca.crt",
            "clientCertKey": "tls.crt",
            "clientKeyKey": "tls.key",
        },
    }
}
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "external-redis-tls": EXTERNAL_TLS,
    "redis-url-secret": {
        "redis": {
            "internal": {"enabled": False},
            "existingSecret": "oao-redis",
            "existingSecretKey": "redis-url",
            "tls": {"enabled": True, "secretName": "redis-ca"},
        }
    },
    "keda-prometheus": {
        "worker": {"queues": ["urgent", "default"], "concurrency": 20},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        "grafana": {"dashboard": {"enabled": True}},
        "autoscaling": {
            "minReplicas": 0,
            "maxReplicas": 50,
            "targetUtilization": 0.5,
            "keda": {"enabled": True, "prometheus": {"serverAddress": "http://prom.monitoring:9090"}},
        },
    },
    "keda-redis": {
        **EXTERNAL_TLS,
        "prefix": "prod",
        "worker": {"queues": ["urgent", "batch.nightly"], "concurrency": 8},
        "autoscaling": {
            "keda": {
                "enabled": True,
                "backlogFrom": "redis",
                "prometheus": {"serverAddress": "http://prom.monitoring:9090"},
            }
        },
    },
    "keda-redis-internal-no-prometheus": {
        "autoscaling": {"keda": {"enabled": True, "backlogFrom": "redis", "redis": {"countInflight": False}}}
    },
    "api-on": {
        "api": {
            "enabled": True,
            "tokensSecret": {"name": "api-tokens", "key": "tokens"},
            "service": {"type": "LoadBalancer"},
        },
    },
    "resources-set": {
        "worker": {
            "concurrency": 32,
            "syncThreads": 16,
            "gracePeriodSeconds": 90,
            "appDir": "/agents",
            "extraVolumes": [{"name": "agents", "configMap": {"name": "my-agents"}}],
            "extraVolumeMounts": [{"name": "agents", "mountPath": "/agents"}],
            "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
            "podDisruptionBudget": {"maxUnavailable": None, "minAvailable": "50%"},
        },
        "serve": {
            "replicas": 2,
            "resources": {"requests": {"cpu": "100m"}},
            "podDisruptionBudget": {"enabled": True},
        },
        "api": {"enabled": True, "tokensSecret": {"name": "t"}, "resources": {"limits": {"memory": "256Mi"}}},
        "trust": {
            "allowEntrypoints": "agents.*",
            "denyPrivateNetworks": True,
            "allowHosts": "api.openai.com",
        },
        "extraEnv": [{"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": "o", "key": "k"}}}],
        "autoscaling": {
            "hpa": {
                "enabled": True,
                "externalMetric": {"name": "oao_worker_load", "selector": {"matchLabels": {"a": "b"}}},
            }
        },
    },
    "metrics-off": {"metrics": {"enabled": False}, "worker": {"podDisruptionBudget": {"enabled": False}}},
    "small-fleet-example": yaml.safe_load((CHART / "examples" / "small-fleet.yaml").read_text()),
    "large-fleet-example": yaml.safe_load((CHART / "examples" / "large-fleet.yaml").read_text()),
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every manifest the chart renders with ``values`` (NOTES.txt left out)."""
    with helm_python.Chart.load(CHART) as chart:
        out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def merged(values: dict[str, Any]) -> dict[str, Any]:
    with helm_python.Chart.load(CHART) as chart:
        return chart.merge_values(values)


def find(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> list[dict[str, Any]]:
    return [
        d
        for d in docs
        if d["kind"] == kind
        and (component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component)
    ]


def one(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, component)
    assert len(found) == 1, (kind, component, [d["metadata"]["name"] for d in found])
    return found[0]


def container(deploy: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def port_number(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (p,) = [p["containerPort"] for p in c["ports"] if p["name"] == port]
    return int(p)


def parse_cli(command: click.Command, args: list[str]) -> dict[str, Any]:
    """The parameters ``command`` (the real CLI) reads from ``args``."""
    ctx = command.make_context(command.name or "cli", list(args), resilient_parsing=False)
    return dict(ctx.params)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def exported_metrics() -> set[str]:
    """Names of every series the fleet can export (oao_common/metrics.py)."""
    names: set[str] = set()
    for obj in vars(oao_common.metrics).values():
        if isinstance(obj, MetricWrapperBase):
            (family,) = obj.describe()
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}.get(
                family.type, ("",)
            )
            names |= {family.name + s for s in suffixes}
    return names


def pods(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, str]]]:
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            yield d, d["spec"]["template"]["metadata"]["labels"]


# --------------------------------------------------------------------------- lint, schemas


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_lint_is_clean(name: str) -> None:
    report = helm_python.lint(CHART, VALUE_SETS[name], strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], problems or report["errors"]


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_every_manifest_validates(name: str) -> None:
    docs = render(VALUE_SETS[name])
    kinds = sorted({d["kind"] for d in docs})
    assert {"Deployment", "Service", "ServiceAccount"} <= set(kinds), kinds
    for d in docs:
        assert d["metadata"].get("labels", {}).get("app.kubernetes.io/instance") == RELEASE, d["metadata"]
        schema = BY_KIND.get((d["apiVersion"], d["kind"]))
        if schema is not None:
            jsonschema.validate(d, schema)
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(d, version, strict=True)


def test_values_schema_rejects_typos_and_bad_values() -> None:
    for bad in (
        {"worker": {"concurency": 4}},
        {"worker": {"concurrency": 0}},
        {"worker": {"queues": ["has space"]}},
        {"worker": {"shutdownMarginSeconds": 0}},
        {"autoscaling": {"keda": {"backlogFrom": "kafka"}}},
        {"redis": {"tls": {"enable": True}}},
    ):
        with pytest.raises(helm_python.HelmValuesError, match="schema"):
            render(bad)


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {
                "autoscaling": {
                    "keda": {"enabled": True, "prometheus": {"serverAddress": "http://p:9090"}},
                    "hpa": {"enabled": True},
                }
            },
            "not both",
        ),
        ({"api": {"enabled": True}}, "tokensSecret"),
        ({"redis": {"url": "redis://r:6379/0"}}, "redis.internal.enabled=false"),
        ({"redis": {"internal": {"enabled": False}}}, "set one of"),
        ({"autoscaling": {"keda": {"enabled": True}}}, "serverAddress"),
        (
            {
                "redis": {"internal": {"enabled": False}, "existingSecret": "s"},
                "autoscaling": {
                    "keda": {"enabled": True, "backlogFrom": "redis", "redis": {"countInflight": False}}
                },
            },
            "KEDA cannot read a URL",
        ),
    ],
)
def test_inconsistent_values_fail_with_a_message(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmError, match=re.escape(message)):
        render(values)


# --------------------------------------------------------------------------- wiring


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_worker_wiring(name: str) -> None:
    values = merged(VALUE_SETS[name])
    docs = render(VALUE_SETS[name])
    deploy = one(docs, "Deployment", "worker")
    c = container(deploy, "worker")
    assert c["command"] == ["oao-worker"]
    params = parse_cli(worker_cli.main, c["args"])
    w = values["worker"]

    # the command line is what the values say
    assert params["queues"] == ",".join(w["queues"])
    assert params["concurrency"] == w["concurrency"]
    assert params["grace_period"] == w["gracePeriodSeconds"]
    assert params["heartbeat_ttl"] == values["heartbeatTTLSeconds"]
    assert params["max_requeues"] == values["maxRequeues"]
    assert params["worker_id"] == "$(POD_NAME)"
    assert params["sync_threads"] == w.get("syncThreads")  # Helm drops nulls
    assert params["app_dir"] == (w["appDir"] or None)
    assert params["metrics_port"] == (values["metrics"]["port"] if values["metrics"]["enabled"] else None)
    assert params["health_max_stall"] == w["health"]["maxStallSeconds"]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert "OAO_REDIS_URL" in env and env["OAO_PREFIX"]["value"] == values["prefix"]

    # probes hit the port the worker serves its health endpoint on
    health_port = params["health_port"]
    assert health_port == w["health"]["port"]
    for probe, path in (
        ("startupProbe", "/livez"),
        ("livenessProbe", "/livez"),
        ("readinessProbe", "/readyz"),
    ):
        get = c[probe]["httpGet"]
        assert get["path"] == path and port_number(c, get["port"]) == health_port, probe

    # Kubernetes waits longer than the worker's grace period before SIGKILL
    spec = deploy["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] > params["grace_period"]
    assert spec["terminationGracePeriodSeconds"] == w["gracePeriodSeconds"] + w["shutdownMarginSeconds"]

    # the scheduler's heartbeat TTL and requeue limit are the workers'
    s = container(one(docs, "Deployment", "serve"), "serve")
    assert s["command"] == ["oao-scheduler", "serve"]
    sparams = parse_cli(scheduler_cli.serve, s["args"])
    assert sparams["heartbeat_ttl"] == params["heartbeat_ttl"]
    assert sparams["max_requeues"] == params["max_requeues"]
    assert sparams["retention"] == str(values["serve"]["retention"])

    # non-root, read-only root file system with a writable /tmp
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == 10001
    assert c["securityContext"]["readOnlyRootFilesystem"]
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])

    # replicas belong to the autoscaler when there is one
    autoscaled = values["autoscaling"]["keda"]["enabled"] or values["autoscaling"]["hpa"]["enabled"]
    assert ("replicas" in deploy["spec"]) == (not autoscaled)


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_selectors_and_ports(name: str) -> None:
    docs = render(VALUE_SETS[name])
    workloads = list(pods(docs))
    for svc in find(docs, "Service"):
        matched = [d for d, labels in workloads if selects(svc["spec"]["selector"], labels)]
        assert len(matched) == 1, (svc["metadata"]["name"], [d["metadata"]["name"] for d in matched])
        (target,) = matched
        assert (
            target["metadata"]["labels"]["app.kubernetes.io/component"]
            == svc["metadata"]["labels"]["app.kubernetes.io/component"]
        )
        names = {
            p["name"] for c in target["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])
        }
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in names, (svc["metadata"]["name"], p)
    for pdb in find(docs, "PodDisruptionBudget"):
        matched = [d for d, labels in workloads if selects(pdb["spec"]["selector"]["matchLabels"], labels)]
        component = pdb["metadata"]["labels"]["app.kubernetes.io/component"]
        assert [d["metadata"]["labels"]["app.kubernetes.io/component"] for d in matched] == [component]
    for sm in find(docs, "ServiceMonitor"):
        sel = sm["spec"]["selector"]
        (expr,) = sel["matchExpressions"]
        scraped = [
            s["metadata"]["name"]
            for s in find(docs, "Service")
            if selects(sel["matchLabels"], s["metadata"]["labels"])
            and s["metadata"]["labels"]["app.kubernetes.io/component"] in expr["values"]
        ]
        assert sorted(scraped) == sorted(f"{RELEASE}-oao-{c}" for c in ("serve", "worker"))
        for s in find(docs, "Service"):
            if s["metadata"]["name"] in scraped:
                assert any(p["name"] == sm["spec"]["endpoints"][0]["port"] for p in s["spec"]["ports"])


def test_redis_connection_options() -> None:
    # the parts: ACL user, password from a Secret (expanded by Kubernetes), TLS with the CA
    # and client certificate mounted where the URL says
    docs = render(EXTERNAL_TLS)
    c = container(one(docs, "Deployment", "worker"), "worker")
    names = [e["name"] for e in c["env"]]
    assert names.index("OAO_REDIS_PASSWORD") < names.index("OAO_REDIS_URL")  # $(VAR) needs it first
    env = {e["name"]: e for e in c["env"]}
    assert env["OAO_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "redis-pw", "key": "password"}
    url = env["OAO_REDIS_URL"]["value"]
    assert url.startswith("rediss://oao-worker:$(OAO_REDIS_PASSWORD)@redis.data.svc:6380/2?")
    query = dict(kv.split("=", 1) for kv in url.split("?", 1)[1].split("&"))
    assert query["ssl_cert_reqs"] == "required"
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "redis-tls"]
    vol = {v["name"]: v for v in one(docs, "Deployment", "worker")["spec"]["template"]["spec"]["volumes"]}
    assert vol["redis-tls"]["secret"]["secretName"] == "redis-tls"
    for param, key in (("ssl_ca_certs", "ca.crt"), ("ssl_certfile", "tls.crt"), ("ssl_keyfile", "tls.key")):
        assert query[param] == f"{mount['mountPath']}/{key}"

    # the whole URL from an existing Secret
    docs = render(VALUE_SETS["redis-url-secret"])
    for component in ("worker", "serve"):
        deploy = one(docs, "Deployment", component)
        env = {e["name"]: e for e in container(deploy, component)["env"]}
        assert env["OAO_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "oao-redis", "key": "redis-url"}
    assert not find(docs, "StatefulSet") and not find(docs, "Secret")

    # a URL in the values goes into a Secret of the chart, not into the pod spec
    docs = render({"redis": {"internal": {"enabled": False}, "url": "redis://u:p@r:6379/0"}})
    (secret,) = find(docs, "Secret")
    assert secret["stringData"]["url"] == "redis://u:p@r:6379/0"
    env = {e["name"]: e for e in container(one(docs, "Deployment", "worker"), "worker")["env"]}
    assert env["OAO_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]

    # the internal Redis: AOF and noeviction (docs/guarantees.md), reached by its Service
    docs = render({})
    redis = one(docs, "StatefulSet", "redis")
    args = container(redis, "redis")["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--appendonly") + 1] == "yes"
    env = {e["name"]: e for e in container(one(docs, "Deployment", "worker"), "worker")["env"]}
    assert (
        env["OAO_REDIS_URL"]["value"] == f"redis://{one(docs, 'Service', 'redis')['metadata']['name']}:6379/0"
    )


def test_api_service() -> None:
    docs = render(VALUE_SETS["api-on"])
    deploy = one(docs, "Deployment", "api")
    c = container(deploy, "api")
    assert c["command"] == ["oao-scheduler", "api"]
    params = parse_cli(scheduler_cli.api, c["args"])
    assert params["host"] == "0.0.0.0" and params["port"] == 8000
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "api-tokens"]
    assert params["tokens_file"] == f"{mount['mountPath']}/tokens"
    vols = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
    assert vols["api-tokens"]["secret"]["secretName"] == "api-tokens"
    assert port_number(c, c["readinessProbe"]["httpGet"]["port"]) == params["port"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    svc = one(docs, "Service", "api")
    assert svc["spec"]["type"] == "LoadBalancer"
    assert port_number(c, svc["spec"]["ports"][0]["targetPort"]) == params["port"]


# --------------------------------------------------------------------------- autoscaling


def keda(name: str) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    values = merged(VALUE_SETS[name])
    docs = render(VALUE_SETS[name])
    return values, one(docs, "ScaledObject"), docs


def test_keda_from_prometheus_counts_backlog_of_every_band_plus_inflight() -> None:
    values, so, docs = keda("keda-prometheus")
    assert so["spec"]["scaleTargetRef"]["name"] == one(docs, "Deployment", "worker")["metadata"]["name"]
    assert so["spec"]["minReplicaCount"] == 0 and so["spec"]["maxReplicaCount"] == 50
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"]["threshold"] == "10"  # concurrency 20 x utilization 0.5
    q = trigger["metadata"]["query"]
    assert 'state="ready",queue=~"urgent|default"' in q  # every band of both queues
    serve_svc = one(docs, "Service", "serve")["metadata"]["name"]
    worker_svc = one(docs, "Service", "worker")["metadata"]["name"]
    assert f'oao_queue_depth{{namespace="{NAMESPACE}",service="{serve_svc}"' in q
    assert f'oao_active_agents{{namespace="{NAMESPACE}",service="{worker_svc}"}}' in q
    assert {"oao_queue_depth", "oao_active_agents"} <= exported_metrics()
    assert so["spec"]["fallback"] == {"failureThreshold": 3, "replicas": 2}
    down = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] == values["autoscaling"]["scaleDownStabilizationSeconds"]
    assert not find(docs, "HorizontalPodAutoscaler")


def test_keda_from_redis_sums_every_ready_list_and_inflight() -> None:
    _, so, docs = keda("keda-redis")
    triggers = {t["name"]: t for t in so["spec"]["triggers"]}
    lists = sorted(t["metadata"]["listName"] for t in triggers.values() if t["type"] == "redis")
    assert lists == sorted(
        f"prod:q:{q}{band}" for q in ("urgent", "batch.nightly") for band in ("", ":high", ":low")
    )
    mod = so["spec"]["advanced"]["scalingModifiers"]
    assert sorted(mod["formula"].split(" + ")) == sorted(triggers)  # every trigger, summed
    assert mod["target"] == "6.4" and mod["metricType"] == "AverageValue"  # 8 x 0.8
    assert triggers["inflight"]["type"] == "prometheus"
    for t in triggers.values():
        if t["type"] == "redis":
            md = t["metadata"]
            assert md["address"] == "redis.data.svc:6380" and md["databaseIndex"] == "2"
            assert t["authenticationRef"]["name"] == one(docs, "TriggerAuthentication")["metadata"]["name"]
    auth = one(docs, "TriggerAuthentication")
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert sorted(refs) == ["ca", "cert", "key", "password", "tls", "username"]
    assert refs["password"]["name"] == "redis-pw" and refs["ca"]["name"] == "redis-tls"
    (own,) = [s for s in find(docs, "Secret") if s["metadata"]["name"] == refs["tls"]["name"]]
    assert own["stringData"] == {"username": "oao-worker", "tls": "enable"}

    # the internal Redis, no Prometheus: backlog only, no credentials
    _, so, docs = keda("keda-redis-internal-no-prometheus")
    names = [t["name"] for t in so["spec"]["triggers"]]
    assert names == ["ready_0_high", "ready_0", "ready_0_low"]
    assert so["spec"]["advanced"]["scalingModifiers"]["formula"] == "ready_0_high + ready_0 + ready_0_low"
    assert all("authenticationRef" not in t for t in so["spec"]["triggers"])
    assert not find(docs, "TriggerAuthentication")


def test_hpa_fallback() -> None:
    values = merged(VALUE_SETS["resources-set"])
    docs = render(VALUE_SETS["resources-set"])
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(docs, "Deployment", "worker")["metadata"]["name"]
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["target"]["averageUtilization"] == 70
    ext = metrics["External"]["external"]
    assert ext["metric"]["name"] == "oao_worker_load"
    assert ext["target"] == {"type": "AverageValue", "averageValue": str(round(32 * 0.8, 2))}
    assert hpa["spec"]["minReplicas"] == values["autoscaling"]["minReplicas"]
    assert not find(docs, "ScaledObject")


# --------------------------------------------------------------------------- dashboard


def test_dashboard_configmap_queries_only_exported_metrics() -> None:
    docs = render(VALUE_SETS["keda-prometheus"])
    cm = one(docs, "ConfigMap", "dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["oao-fleet.json"])
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    used = {name for e in exprs for name in re.findall(r"\b(oao_[a-z_]+)", e)}
    assert used and used <= exported_metrics(), used - exported_metrics()
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "queue", "model"} <= variables
