"""JSON schemas for the custom resources the chart renders (KEDA ScaledObject and
TriggerAuthentication, Prometheus Operator ServiceMonitor), which kubernetes-validate does
not know. Written for this project from the projects' documented fields: each lists the
fields the chart may use, with their types, and rejects any other (a typo in a template
fails here instead of being silently dropped by the API server's pruning).
"""

from __future__ import annotations

from typing import Any

STR: dict[str, Any] = {"type": "string"}
INT: dict[str, Any] = {"type": "integer"}
STR_MAP: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "string"}}
NAME: dict[str, Any] = {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253}


def closed(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required or [], "additionalProperties": False}


METADATA = {
    "type": "object",
    "properties": {"name": NAME, "namespace": STR, "labels": STR_MAP, "annotations": STR_MAP},
    "required": ["name"],
}

HPA_POLICY = closed(
    {"type": {"enum": ["Pods", "Percent"]}, "value": INT, "periodSeconds": INT},
    ["type", "value", "periodSeconds"],
)
HPA_RULES = closed(
    {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {"type": "array", "items": HPA_POLICY},
    }
)

SCALED_OBJECT = closed(
    {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": METADATA,
        "spec": closed(
            {
                "scaleTargetRef": closed(
                    {"apiVersion": STR, "kind": STR, "name": NAME, "envSourceContainerName": STR}, ["name"]
                ),
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": closed(
                    {
                        "failureThreshold": {"type": "integer", "minimum": 1},
                        "replicas": {"type": "integer", "minimum": 0},
                        "behavior": {
                            "enum": [
                                "static",
                                "currentReplicas",
                                "currentReplicasIfHigher",
                                "currentReplicasIfLower",
                            ]
                        },
                    },
                    ["failureThreshold", "replicas"],
                ),
                "advanced": closed(
                    {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": closed(
                            {"name": NAME, "behavior": closed({"scaleUp": HPA_RULES, "scaleDown": HPA_RULES})}
                        ),
                        "scalingModifiers": closed(
                            {
                                "formula": STR,
                                "target": STR,
                                "activationTarget": STR,
                                "metricType": {"enum": ["AverageValue", "Value"]},
                            },
                            ["formula", "target"],
                        ),
                    }
                ),
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": closed(
                        {
                            "type": STR,
                            "name": STR,
                            "metadata": STR_MAP,
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": closed({"name": NAME, "kind": STR}, ["name"]),
                        },
                        ["type", "metadata"],
                    ),
                },
            },
            ["scaleTargetRef", "triggers"],
        ),
    },
    ["apiVersion", "kind", "metadata", "spec"],
)

TRIGGER_AUTHENTICATION = closed(
    {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "TriggerAuthentication"},
        "metadata": METADATA,
        "spec": closed(
            {
                "secretTargetRef": {
                    "type": "array",
                    "minItems": 1,
                    "items": closed(
                        {"parameter": STR, "name": NAME, "key": STR}, ["parameter", "name", "key"]
                    ),
                }
            },
            ["secretTargetRef"],
        ),
    },
    ["apiVersion", "kind", "metadata", "spec"],
)

DURATION = {"type": "string", "pattern": "^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
LABEL_SELECTOR = closed(
    {
        "matchLabels": STR_MAP,
        "matchExpressions": {
            "type": "array",
            "items": closed(
                {
                    "key": STR,
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array"},
                },
                ["key", "operator"],
            ),
        },
    }
)

SERVICE_MONITOR = closed(
    {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": METADATA,
        "spec": closed(
            {
                "selector": LABEL_SELECTOR,
                "namespaceSelector": closed({"any": {"type": "boolean"}, "matchNames": {"type": "array"}}),
                "jobLabel": STR,
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": closed(
                        {
                            "port": STR,
                            "path": STR,
                            "scheme": {"enum": ["http", "https"]},
                            "interval": DURATION,
                            "scrapeTimeout": DURATION,
                            "honorLabels": {"type": "boolean"},
                        }
                    ),
                },
            },
            ["selector", "endpoints"],
        ),
    },
    ["apiVersion", "kind", "metadata", "spec"],
)

BY_KIND = {
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): TRIGGER_AUTHENTICATION,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
}
