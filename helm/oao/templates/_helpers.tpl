{{/* Names ---------------------------------------------------------------------------- */}}

{{- define "oao.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "oao.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<fullname>-<component>", e.g. oao-worker */}}
{{- define "oao.componentName" -}}
{{- printf "%s-%s" (include "oao.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "oao.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "oao.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "oao.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels: call with (dict "root" $ "component" "worker") */}}
{{- define "oao.selectorLabels" -}}
app.kubernetes.io/name: {{ include "oao.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "oao.labels" -}}
helm.sh/chart: {{ include "oao.chart" .root }}
{{ include "oao.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: oao
{{- end }}

{{- define "oao.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Redis ---------------------------------------------------------------------------- */}}

{{/* The Secret holding the whole URL, or "" when the URL is composed from parts. */}}
{{- define "oao.redisUrlSecret" -}}
{{- if .Values.redis.existingSecret }}
{{- .Values.redis.existingSecret }}
{{- else if .Values.redis.url }}
{{- printf "%s-redis-url" (include "oao.fullname" .) }}
{{- end }}
{{- end }}

{{- define "oao.redisInternalHost" -}}
{{- include "oao.componentName" (dict "root" . "component" "redis") }}
{{- end }}

{{- define "oao.redisTlsDir" -}}/etc/oao/redis-tls{{- end }}

{{/* Fails the render unless exactly one way to reach Redis is configured. */}}
{{- define "oao.checkRedis" -}}
{{- $ways := 0 }}
{{- if or .Values.redis.existingSecret .Values.redis.url }}{{ $ways = add1 $ways }}{{ end }}
{{- if .Values.redis.host }}{{ $ways = add1 $ways }}{{ end }}
{{- if .Values.redis.internal.enabled }}{{ $ways = add1 $ways }}{{ end }}
{{- if and .Values.redis.internal.enabled (gt (int $ways) 1) }}
{{- fail "redis: an external Redis is configured; set redis.internal.enabled=false" }}
{{- end }}
{{- if ne (int $ways) 1 }}
{{- fail "redis: set one of redis.existingSecret (or redis.url), redis.host, redis.internal.enabled" }}
{{- end }}
{{- if and .Values.redis.existingSecret .Values.redis.url }}
{{- fail "redis: set redis.existingSecret or redis.url, not both" }}
{{- end }}
{{- end }}

{{/* The env entries that give a container OAO_REDIS_URL. */}}
{{- define "oao.redisEnv" -}}
{{- $secret := include "oao.redisUrlSecret" . }}
{{- if $secret }}
- name: OAO_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ if .Values.redis.existingSecret }}{{ .Values.redis.existingSecretKey }}{{ else }}url{{ end }}
{{- else if .Values.redis.internal.enabled }}
- name: OAO_REDIS_URL
  value: {{ printf "redis://%s:6379/%d" (include "oao.redisInternalHost" .) (int .Values.redis.db) | quote }}
{{- else }}
{{- $r := .Values.redis }}
{{- $auth := "" }}
{{- if $r.passwordSecret.name }}
- name: OAO_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $r.passwordSecret.name }}
      key: {{ $r.passwordSecret.key }}
{{- $auth = printf "%s:$(OAO_REDIS_PASSWORD)@" $r.username }}
{{- else if $r.username }}
{{- $auth = printf "%s@" $r.username }}
{{- end }}
{{- $query := list }}
{{- if and $r.tls.enabled $r.tls.secretName }}
{{- $query = append $query "ssl_cert_reqs=required" }}
{{- $query = append $query (printf "ssl_ca_certs=%s/%s" (include "oao.redisTlsDir" .) $r.tls.caKey) }}
{{- if $r.tls.clientCertKey }}
{{- $query = append $query (printf "ssl_certfile=%s/%s" (include "oao.redisTlsDir" .) $r.tls.clientCertKey) }}
{{- $query = append $query (printf "ssl_keyfile=%s/%s" (include "oao.redisTlsDir" .) $r.tls.clientKeyKey) }}
{{- end }}
{{- else if $r.tls.enabled }}
{{- $query = append $query "ssl_cert_reqs=required" }}
{{- end }}
- name: OAO_REDIS_URL
  value: {{ printf "%s://%s%s:%d/%d%s" ($r.tls.enabled | ternary "rediss" "redis") $auth $r.host (int $r.port) (int $r.db) (empty $query | ternary "" (printf "?%s" (join "&" $query))) | quote }}
{{- end }}
{{- end }}

{{/* Environment of every OAO container: Redis, prefix, logs, trust policy, extras. */}}
{{- define "oao.env" -}}
{{ include "oao.redisEnv" . | trim }}
- name: OAO_PREFIX
  value: {{ .Values.prefix | quote }}
- name: OAO_LOG_FORMAT
  value: {{ .Values.log.format | quote }}
- name: OAO_LOG_LEVEL
  value: {{ .Values.log.level | quote }}
{{- with .Values.trust }}
{{- if .allowEntrypoints }}
- name: OAO_ALLOW_ENTRYPOINTS
  value: {{ .allowEntrypoints | quote }}
{{- end }}
{{- if .allowApiKeyEnv }}
- name: OAO_ALLOW_API_KEY_ENV
  value: {{ .allowApiKeyEnv | quote }}
{{- end }}
{{- if .denyPrivateNetworks }}
- name: OAO_DENY_PRIVATE_NETWORKS
  value: "1"
{{- end }}
{{- if .allowHosts }}
- name: OAO_ALLOW_HOSTS
  value: {{ .allowHosts | quote }}
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volumes and mounts of the Redis TLS files and of /tmp (the root file system is read-only). */}}
{{- define "oao.volumes" -}}
- name: tmp
  emptyDir: {}
{{- if and .Values.redis.tls.enabled .Values.redis.tls.secretName }}
- name: redis-tls
  secret:
    secretName: {{ .Values.redis.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "oao.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if and .Values.redis.tls.enabled .Values.redis.tls.secretName }}
- name: redis-tls
  mountPath: {{ include "oao.redisTlsDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* Autoscaling ------------------------------------------------------------------------ */}}

{{- define "oao.autoscaled" -}}
{{- if or .Values.autoscaling.keda.enabled .Values.autoscaling.hpa.enabled }}true{{ end }}
{{- end }}

{{/* Load per worker pod the autoscalers aim at: concurrency x targetUtilization, at least 1. */}}
{{- define "oao.targetLoad" -}}
{{- $t := mulf (float64 .Values.worker.concurrency) (float64 .Values.autoscaling.targetUtilization) }}
{{- if lt $t 1.0 }}{{ $t = 1.0 }}{{ end }}
{{- round $t 2 }}
{{- end }}

{{/* The ready lists of the workers' queues: "<prefix>:q:<queue>[:high|:low]". */}}
{{- define "oao.readyLists" -}}
{{- $lists := list }}
{{- range .Values.worker.queues }}
{{- $lists = append $lists (printf "%s:q:%s:high" $.Values.prefix .) }}
{{- $lists = append $lists (printf "%s:q:%s" $.Values.prefix .) }}
{{- $lists = append $lists (printf "%s:q:%s:low" $.Values.prefix .) }}
{{- end }}
{{- toJson $lists }}
{{- end }}

{{/* PromQL: ready jobs of the workers' queues, every band (oao_queue_depth{state="ready"},
     exported by serve; max over serve replicas, which all export the same figures). */}}
{{- define "oao.backlogQuery" -}}
{{- if .Values.autoscaling.keda.prometheus.backlogQuery }}
{{- .Values.autoscaling.keda.prometheus.backlogQuery }}
{{- else }}
{{- $names := list }}
{{- range .Values.worker.queues }}
{{- $q := replace "." "\\\\." . }}{{/* a literal dot in the PromQL regex */}}
{{- $names = append $names $q }}
{{- end }}
{{- printf "sum(max by (queue, band) (oao_queue_depth{namespace=\"%s\",service=\"%s\",state=\"ready\",queue=~\"%s\"})) or vector(0)" .Release.Namespace (include "oao.componentName" (dict "root" . "component" "serve")) (join "|" $names) }}
{{- end }}
{{- end }}

{{/* PromQL: nodes running in this release's worker pods (oao_active_agents). */}}
{{- define "oao.inflightQuery" -}}
{{- if .Values.autoscaling.keda.prometheus.inflightQuery }}
{{- .Values.autoscaling.keda.prometheus.inflightQuery }}
{{- else }}
{{- printf "sum(oao_active_agents{namespace=\"%s\",service=\"%s\"}) or vector(0)" .Release.Namespace (include "oao.componentName" (dict "root" . "component" "worker")) }}
{{- end }}
{{- end }}

{{/* Scale up at once; scale down slowly (workers drain on SIGTERM, up to the grace period). */}}
{{- define "oao.hpaBehavior" -}}
scaleUp:
  stabilizationWindowSeconds: 0
  policies:
    - type: Percent
      value: 100
      periodSeconds: 15
    - type: Pods
      value: 4
      periodSeconds: 15
  selectPolicy: Max
scaleDown:
  stabilizationWindowSeconds: {{ .Values.autoscaling.scaleDownStabilizationSeconds }}
  policies:
    - type: Percent
      value: 25
      periodSeconds: 60
  selectPolicy: Max
{{- end }}
