{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "rmserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, plus the chart name unless it already holds it. */}}
{{- define "rmserve.fullname" -}}
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

{{- define "rmserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rmserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rmserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "rmserve.labels" -}}
helm.sh/chart: {{ include "rmserve.chart" . }}
{{ include "rmserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: (list $ "gateway"). */}}
{{- define "rmserve.componentSelector" -}}
{{ include "rmserve.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* All labels of one component: (list $ "gateway"). */}}
{{- define "rmserve.componentLabels" -}}
{{ include "rmserve.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "rmserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "rmserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- .Values.serviceAccount.name | default (include "rmserve.fullname" .) }}
{{- else }}
{{- .Values.serviceAccount.name | default "default" }}
{{- end }}
{{- end }}

{{- define "rmserve.redisName" -}}
{{- printf "%s-redis" (include "rmserve.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The registry file: the `models` map under a `models:` key, as models/spec.py reads it, without
each entry's `deploy:` (Kubernetes settings, which the registry loader would reject).
*/}}
{{- define "rmserve.registry" -}}
{{- $models := dict }}
{{- range $name, $spec := .Values.models }}
{{- if $spec }}
{{- $_ := set $models $name (omit $spec "deploy") }}
{{- end }}
{{- end }}
{{- if not $models }}
{{- fail "models: the registry needs at least one model" }}
{{- end }}
{{- dict "models" $models | toYaml }}
{{- end }}

{{/*
Deep merge of two maps, the second one winning: (list $defaults $overrides) -> YAML. Unlike
sprig's mergeOverwrite, a false, 0 or "" in the overrides does win (replicas: 0,
sandbox.enabled: false, gpu.count: 0). Lists are replaced, not concatenated.
*/}}
{{- define "rmserve.merge" -}}
{{- $merged := deepCopy (index . 0 | default dict) }}
{{- range $key, $value := (index . 1 | default dict) }}
{{- $current := get $merged $key }}
{{- if and (kindIs "map" $value) (kindIs "map" $current) }}
{{- $_ := set $merged $key (include "rmserve.merge" (list $current $value) | fromYaml) }}
{{- else }}
{{- $_ := set $merged $key $value }}
{{- end }}
{{- end }}
{{- toYaml $merged }}
{{- end }}

{{/*
One entry per model of the registry, keyed by model name (YAML; read it with fromYaml):
  name, slug (the model label), workerName (Deployment, ScaledObject), stream, weights (bool),
  deploy (workerDefaults merged with the model's `deploy:`), gpuCount, resources, nodeSelector,
  tolerations, keda (bool: KEDA scales this model).
Fails when two model names map to the same Kubernetes name.
*/}}
{{- define "rmserve.workers" -}}
{{- $root := . }}
{{- $fullname := include "rmserve.fullname" . }}
{{- $workers := dict }}
{{- $taken := dict }}
{{- range $name, $spec := .Values.models }}
{{- if $spec }}
{{- $own := $spec.deploy | default dict }}
{{- $deploy := include "rmserve.merge" (list $root.Values.workerDefaults $own) | fromYaml }}
{{- /* Weights run on an engine here (a GPU by default); verifiers and remote judges do not. */}}
{{- $weights := not (not (and $spec.weights (not $spec.remote))) }}
{{- $gpuCount := int $deploy.gpu.count }}
{{- if and (not $weights) (not (hasKey ($own.gpu | default dict) "count")) }}
{{- $gpuCount = 0 }}
{{- end }}
{{- $resources := deepCopy ($deploy.resources | default dict) }}
{{- if and (not $weights) (not (hasKey $own "resources")) }}
{{- $resources = deepCopy ($root.Values.workerDefaults.resourcesWithoutWeights | default dict) }}
{{- end }}
{{- $nodeSelector := deepCopy ($deploy.nodeSelector | default dict) }}
{{- $tolerations := $deploy.tolerations | default list }}
{{- if gt $gpuCount 0 }}
{{- $limits := deepCopy ($resources.limits | default dict) }}
{{- $_ := set $limits $deploy.gpu.resource $gpuCount }}
{{- $_ := set $resources "limits" $limits }}
{{- $nodeSelector = merge $nodeSelector ($deploy.gpu.nodeSelector | default dict) }}
{{- $tolerations = concat ($deploy.gpu.tolerations | default list) $tolerations }}
{{- end }}
{{- $slug := $name | lower | replace "_" "-" | replace "." "-" | trunc 63 | trimSuffix "-" }}
{{- $workerName := printf "%s-%s" $fullname $slug | trunc 63 | trimSuffix "-" }}
{{- if hasKey $taken $workerName }}
{{- fail (printf "models: %q and %q both become the Kubernetes name %q; rename one of them" (get $taken $workerName) $name $workerName) }}
{{- end }}
{{- $_ := set $taken $workerName $name }}
{{- $keda := and $root.Values.keda.enabled (dig "enabled" true ($deploy.keda | default dict)) }}
{{- $_ := set $workers $name (dict
      "name" $name "slug" $slug "workerName" $workerName "stream" (printf "rmserve:{%s}:jobs" $name)
      "weights" $weights "deploy" $deploy "gpuCount" $gpuCount "resources" $resources
      "nodeSelector" $nodeSelector "tolerations" $tolerations "keda" $keda) }}
{{- end }}
{{- end }}
{{- toYaml $workers }}
{{- end }}

{{/*
The Redis variables that come from Secrets. RMSERVE_REDIS_URL: the in-chart Redis, or a key of an
existing Secret; with redis.sentinel.hosts the URL gives only password, database and TLS, and may
be left out. RMSERVE_REDIS_SENTINEL_PASSWORD: a key of redis.sentinel.passwordSecret. Fails
without any Redis, for the in-chart Redis together with sentinels, and for redis.cluster with
sentinels, the in-chart Redis, waitReplicas or without existingSecret.
*/}}
{{- define "rmserve.redisUrlEnv" -}}
{{- $redis := .Values.redis }}
{{- $sentinel := $redis.sentinel | default dict }}
{{- $sentinels := $sentinel.hosts | default list }}
{{- if and $redis.internal.enabled $sentinels }}
{{- fail "redis: redis.internal.enabled and redis.sentinel.hosts exclude each other (the in-chart Redis is one pod, without replicas or sentinels). Set redis.sentinel.hosts=[] for the development Redis, or redis.internal.enabled=false for a Redis behind Sentinel" }}
{{- end }}
{{- if $redis.cluster }}
{{- if $sentinels }}
{{- fail "redis: redis.cluster and redis.sentinel.hosts exclude each other (a Redis Cluster fails over by itself; the URL of redis.existingSecret names any of its nodes)" }}
{{- end }}
{{- if $redis.internal.enabled }}
{{- fail "redis: redis.cluster and redis.internal.enabled exclude each other (the in-chart Redis is one pod, not a cluster)" }}
{{- end }}
{{- if $redis.waitReplicas }}
{{- fail "redis: redis.waitReplicas is not supported with redis.cluster (the cluster client cannot send WAIT on the connection that wrote the jobs); set it to 0" }}
{{- end }}
{{- if not $redis.existingSecret }}
{{- fail "redis: redis.cluster needs redis.existingSecret, a Secret whose key redis.key holds the URL of any node of the cluster" }}
{{- end }}
{{- end }}
{{- if $redis.internal.enabled }}
- name: RMSERVE_REDIS_URL
  value: {{ printf "redis://%s:%d/0" (include "rmserve.redisName" .) (int $redis.internal.port) | quote }}
{{- else if $redis.existingSecret }}
- name: RMSERVE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $redis.existingSecret }}
      key: {{ $redis.key }}
{{- else if not $sentinels }}
{{- fail "redis: no Redis configured. Set redis.existingSecret to a Secret whose key redis.key holds the URL (e.g. redis://:PASSWORD@redis.example:6379/0), redis.sentinel.hosts to the sentinels of a Redis primary with replicas (e.g. [redis-node-0.redis-headless:26379]), or redis.internal.enabled=true for a single development Redis in the chart" }}
{{- end }}
{{- $password := $sentinel.passwordSecret | default dict }}
{{- if and $sentinels $password.name }}
{{- if not $password.key }}
{{- fail (printf "redis.sentinel.passwordSecret: name %q needs a key (the key of that Secret holding the sentinels' password)" $password.name) }}
{{- end }}
- name: RMSERVE_REDIS_SENTINEL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $password.name }}
      key: {{ $password.key }}
{{- end }}
{{- end }}

{{/*
The plain Redis settings of gateway and workers, a map (YAML) of variable name to string:
RMSERVE_REDIS_SENTINELS and RMSERVE_REDIS_SENTINEL_SERVICE (with redis.sentinel.hosts),
RMSERVE_REDIS_CLUSTER (with redis.cluster), and the
WAIT and timeout settings. rmserve.commonEnv merges them under env, so that `env` can still set
any of them without a duplicate variable.
*/}}
{{- define "rmserve.redisSettings" -}}
{{- $redis := .Values.redis }}
{{- $sentinel := $redis.sentinel | default dict }}
{{- $settings := dict }}
{{- with $sentinel.hosts }}
{{- $_ := include "rmserve.sentinelPorts" $ }}
{{- $_ := set $settings "RMSERVE_REDIS_SENTINELS" (join "," .) }}
{{- $_ := set $settings "RMSERVE_REDIS_SENTINEL_SERVICE" ($sentinel.service | default "mymaster" | toString) }}
{{- end }}
{{- if $redis.cluster }}
{{- $_ := set $settings "RMSERVE_REDIS_CLUSTER" "true" }}
{{- end }}
{{- $names := dict "waitReplicas" "RMSERVE_REDIS_WAIT_REPLICAS" "waitTimeoutS" "RMSERVE_REDIS_WAIT_TIMEOUT_S" "timeoutS" "RMSERVE_REDIS_TIMEOUT_S" }}
{{- range $key, $name := $names }}
{{- if and (hasKey $redis $key) (not (kindIs "invalid" (index $redis $key))) }}
{{- $_ := set $settings $name (index $redis $key | toString) }}
{{- end }}
{{- end }}
{{- toYaml $settings }}
{{- end }}

{{/*
The ports of redis.sentinel.hosts, a YAML list: the part after each entry's last ':', 26379 when
there is none. Fails on an entry that is not host:port.
*/}}
{{- define "rmserve.sentinelPorts" -}}
{{- $ports := list }}
{{- range $host := (.Values.redis.sentinel | default dict).hosts | default list }}
{{- $port := 26379 }}
{{- if contains ":" $host }}
{{- $text := regexReplaceAll "^.*:" $host "" }}
{{- if not (regexMatch "^[0-9]{1,5}$" $text) }}
{{- fail (printf "redis.sentinel.hosts: %q is not host:port (e.g. redis-node-0.redis-headless:26379)" $host) }}
{{- end }}
{{- $port = atoi $text }}
{{- end }}
{{- if or (lt $port 1) (gt $port 65535) }}
{{- fail (printf "redis.sentinel.hosts: %q: port %d is out of range" $host $port) }}
{{- end }}
{{- $ports = append $ports $port }}
{{- end }}
{{- toYaml $ports }}
{{- end }}

{{/*
The TCP ports of the external Redis for NetworkPolicy egress, a YAML list: networkPolicy.redisPorts
and the sentinels' ports, each once.
*/}}
{{- define "rmserve.redisEgressPorts" -}}
{{- $ports := list }}
{{- range .Values.networkPolicy.redisPorts }}
{{- $ports = append $ports (int .) }}
{{- end }}
{{- range include "rmserve.sentinelPorts" . | fromYamlArray }}
{{- $ports = append $ports (int .) }}
{{- end }}
{{- toYaml (uniq $ports) }}
{{- end }}

{{/* Environment shared by the gateway and the workers: (list $ $extraEnvMap). */}}
{{- define "rmserve.commonEnv" -}}
{{- $root := index . 0 -}}
- name: HOME
  value: /home/rmserve
{{- include "rmserve.redisUrlEnv" $root }}
{{- with $root.Values.hfToken.existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $root.Values.hfToken.key }}
{{- end }}
{{- $env := dict "RMSERVE_LOG_LEVEL" $root.Values.logLevel "RMSERVE_LOG_JSON" $root.Values.logJson "RMSERVE_SCHEDULING" $root.Values.scheduling "RMSERVE_USAGE_RETENTION_DAYS" $root.Values.usageRetentionDays }}
{{- $env = merge $env (include "rmserve.redisSettings" $root | fromYaml) }}
{{- $env = merge (deepCopy (index . 1 | default dict)) (deepCopy ($root.Values.env | default dict)) $env }}
{{- range $name := keys $env | sortAlpha }}
- name: {{ $name }}
  value: {{ get $env $name | toString | quote }}
{{- end }}
{{- end }}

{{/*
startupProbe, livenessProbe and readinessProbe on /startupz, /healthz and /readyz:
(dict "root" $ "port" "http" "startupFailureThreshold" 30).
*/}}
{{- define "rmserve.httpProbes" -}}
{{- $probes := .root.Values.probes -}}
startupProbe:
  httpGet:
    path: /startupz
    port: {{ .port }}
  {{- toYaml (merge (dict "failureThreshold" (int .startupFailureThreshold)) $probes.startup) | nindent 2 }}
livenessProbe:
  httpGet:
    path: /healthz
    port: {{ .port }}
  {{- toYaml $probes.liveness | nindent 2 }}
readinessProbe:
  httpGet:
    path: /readyz
    port: {{ .port }}
  {{- toYaml $probes.readiness | nindent 2 }}
{{- end }}

{{/*
The tool sandbox sidecar (`rmserve sandbox`). It listens on every address of the pod, on the named
port `sandbox`, so that the kubelet can probe it and Prometheus scrape its /metrics; its own
pod's containers still reach it at http://127.0.0.1:PORT. The NetworkPolicy admits that port only
from networkPolicy.sandboxMetricsFrom (workers) or not at all (gateway).
*/}}
{{- define "rmserve.sandboxContainer" -}}
{{- $sandbox := .Values.sandbox }}
{{- if has (int $sandbox.port) (list 8000 8001) }}
{{- fail (printf "sandbox.port: %d is the gateway's (8000) or a worker's (8001) port in the same pod; pick another" (int $sandbox.port)) }}
{{- end }}
{{- $security := deepCopy .Values.securityContext }}
{{- with $sandbox.seccompProfile }}
{{- $_ := set $security "seccompProfile" . }}
{{- end }}
{{- with $sandbox.appArmorProfile }}
{{- $_ := set $security "appArmorProfile" . }}
{{- end -}}
- name: sandbox
  image: {{ include "rmserve.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["rmserve"]
  args: ["sandbox", "--host", "0.0.0.0", "--port", {{ $sandbox.port | quote }}]
  env:
    - name: HOME
      value: /tmp
    - name: RMSERVE_SANDBOX_LOG_LEVEL
      value: {{ .Values.logLevel | quote }}
    - name: RMSERVE_SANDBOX_LOG_JSON
      value: {{ .Values.logJson | toString | quote }}
    - name: RMSERVE_SANDBOX_CODE_CONCURRENCY
      value: {{ $sandbox.codeConcurrency | toString | quote }}
    # Container runtimes mask parts of /proc, so the kernel refuses bubblewrap a fresh procfs.
    - name: RMSERVE_SANDBOX_MOUNT_PROC
      value: "false"
    {{- range $name, $value := $sandbox.env }}
    - name: {{ $name }}
      value: {{ $value | toString | quote }}
    {{- end }}
  ports:
    - name: sandbox
      containerPort: {{ $sandbox.port }}
      protocol: TCP
  {{- include "rmserve.httpProbes" (dict "root" . "port" "sandbox" "startupFailureThreshold" .Values.probes.startup.failureThreshold) | nindent 2 }}
  resources:
    {{- toYaml $sandbox.resources | nindent 4 }}
  securityContext:
    {{- toYaml $security | nindent 4 }}
  volumeMounts:
    - name: sandbox-tmp
      mountPath: /tmp
{{- end }}

{{/* Pod-level settings shared by every rmserve pod. */}}
{{- define "rmserve.podCommon" -}}
serviceAccountName: {{ include "rmserve.serviceAccountName" . }}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/*
NetworkPolicy egress rules of gateway and workers: DNS, and Redis (the in-chart pod, or the
external Redis's and its sentinels' ports).
*/}}
{{- define "rmserve.egressDnsAndRedis" -}}
{{- $np := .Values.networkPolicy -}}
# DNS
- ports:
    - {protocol: UDP, port: 53}
    - {protocol: TCP, port: 53}
  {{- with $np.dnsTo }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
# Redis
{{- if .Values.redis.internal.enabled }}
- to:
    - podSelector:
        matchLabels:
          {{- include "rmserve.componentSelector" (list . "redis") | nindent 10 }}
  ports:
    - {protocol: TCP, port: {{ .Values.redis.internal.port }}}
{{- else }}
- ports:
    {{- range include "rmserve.redisEgressPorts" . | fromYamlArray }}
    - {protocol: TCP, port: {{ . }}}
    {{- end }}
  {{- with $np.redisCidrs }}
  to:
    {{- range . }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
  {{- end }}
{{- end }}
{{- end }}
