{{/* Chart name. */}}
{{- define "cm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: <release>-<chart> unless the release already contains it. */}}
{{- define "cm.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "cm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of one component: dict "root" $ "component" "api". */}}
{{- define "cm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cm.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Standard labels of one component. */}}
{{- define "cm.labels" -}}
helm.sh/chart: {{ include "cm.chart" .root }}
{{ include "cm.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: collapse-monitor
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "cm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "cm.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The slim core image of the exporter and the API (slimImage), else the main one. */}}
{{- define "cm.slimImage" -}}
{{- if .Values.slimImage.repository -}}
{{- printf "%s:%s" .Values.slimImage.repository (default (default .Chart.AppVersion .Values.image.tag) .Values.slimImage.tag) -}}
{{- else -}}
{{- include "cm.image" . -}}
{{- end -}}
{{- end -}}

{{- define "cm.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "cm.gpuImage" -}}
{{- if .Values.gpuWorker.image.repository -}}
{{- printf "%s:%s" .Values.gpuWorker.image.repository (default (default .Chart.AppVersion .Values.image.tag) .Values.gpuWorker.image.tag) -}}
{{- else -}}
{{- include "cm.image" . -}}
{{- end -}}
{{- end -}}

{{- define "cm.secretName" -}}
{{- default (printf "%s-auth" (include "cm.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "cm.redisHost" -}}
{{- printf "%s-redis" (include "cm.fullname" .) -}}
{{- end -}}

{{/*
The external store's ACL user, as JSON: {"plain": user} (in the url or redis.external.username),
{"key": key} (in redis.external.existingSecret) or {} (none; always none for the chart's Redis).
*/}}
{{- define "cm.redisUser" -}}
{{- $ext := .Values.redis.external -}}
{{- if .Values.redis.enabled -}}
{{- toJson dict -}}
{{- else -}}
{{- $inUrl := (urlParse (required "redis.external.url is required when redis.enabled is false" $ext.url)).userinfo -}}
{{- if and $inUrl (or $ext.username $ext.usernameKey) -}}
{{- fail "the ACL user of the external Redis is given twice: in redis.external.url and in redis.external.username or usernameKey; keep one" -}}
{{- end -}}
{{- if $ext.usernameKey -}}
{{- if not $ext.existingSecret -}}
{{- fail "redis.external.usernameKey names a key of redis.external.existingSecret: set that too" -}}
{{- end -}}
{{- toJson (dict "key" $ext.usernameKey) -}}
{{- else if or $ext.username $inUrl -}}
{{- toJson (dict "plain" (default $inUrl $ext.username)) -}}
{{- else -}}
{{- toJson dict -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The Redis URL, without password. An ACL user kept in a Secret goes in as $(REDIS_USERNAME),
which Kubernetes expands from the variable of that name set before COLLAPSE_REDIS_URL.
*/}}
{{- define "cm.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s:%d/%d" (include "cm.redisHost" .) (int .Values.redis.port) (int .Values.redis.database) -}}
{{- else -}}
{{- $url := required "redis.external.url is required when redis.enabled is false" .Values.redis.external.url -}}
{{- $user := include "cm.redisUser" . | fromJson -}}
{{- $parsed := urlParse $url -}}
{{- if or $parsed.userinfo (not (or $user.plain $user.key)) -}}
{{- $url -}}
{{- else -}}
{{- $name := $user.plain -}}
{{- if $user.key }}{{ $name = "$(REDIS_USERNAME)" }}{{ end -}}
{{- printf "%s://%s@%s" $parsed.scheme $name (trimPrefix (printf "%s://" $parsed.scheme) $url) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The ACL user in broker.url (of its first part for sentinel://), or empty. */}}
{{- define "cm.brokerUser" -}}
{{- with .Values.broker.url -}}
{{- (urlParse (first (splitList ";" .))).userinfo -}}
{{- end -}}
{{- end -}}

{{/* Secret and key of the Redis password; empty secret name: no password. */}}
{{- define "cm.redisPasswordSecret" -}}
{{- if .Values.redis.enabled -}}
{{- include "cm.secretName" . -}}
{{- else if .Values.redis.external.existingSecret -}}
{{- .Values.redis.external.existingSecret -}}
{{- else if or .Values.auth.existingSecret .Values.auth.redisPassword -}}
{{- include "cm.secretName" . -}}
{{- end -}}
{{- end -}}

{{- define "cm.redisPasswordKey" -}}
{{- if and (not .Values.redis.enabled) .Values.redis.external.existingSecret -}}
{{- .Values.redis.external.passwordKey -}}
{{- else -}}
redis-password
{{- end -}}
{{- end -}}

{{/* Store topology: standalone (one server, the chart's or external), cluster or sentinel. */}}
{{- define "cm.storeMode" -}}
{{- $ext := .Values.redis.external -}}
{{- if .Values.redis.enabled -}}
standalone
{{- else if $ext.cluster -}}
cluster
{{- else if $ext.sentinel.addresses -}}
sentinel
{{- else -}}
standalone
{{- end -}}
{{- end -}}

{{/* Contradictions in the redis and broker values fail the render, with the fix in the message. */}}
{{- define "cm.checkRedis" -}}
{{- $ext := .Values.redis.external -}}
{{- if and .Values.redis.enabled (or $ext.cluster $ext.sentinel.addresses) -}}
{{- fail "redis.external.cluster and redis.external.sentinel apply to an external Redis: set redis.enabled=false" -}}
{{- end -}}
{{- if and $ext.cluster $ext.sentinel.addresses -}}
{{- fail "redis.external.cluster and redis.external.sentinel.addresses exclude each other" -}}
{{- end -}}
{{- if and $ext.sentinel.addresses (not $ext.sentinel.masterName) -}}
{{- fail "redis.external.sentinel.masterName is required with redis.external.sentinel.addresses" -}}
{{- end -}}
{{- if and (eq (include "cm.storeMode" .) "cluster") (not .Values.broker.url) -}}
{{- fail "the Celery broker cannot be a Redis Cluster (Celery's Redis transport does not support cluster mode): set broker.url to a standalone or Sentinel-managed Redis" -}}
{{- end -}}
{{- if ne (hasPrefix "sentinel://" .Values.broker.url) (not (empty .Values.broker.sentinelMaster)) -}}
{{- fail "broker.sentinelMaster goes with a sentinel:// broker.url, and only with one" -}}
{{- end -}}
{{- end -}}

{{/* Secret and key of the sentinels' own password; empty secret name: none. */}}
{{- define "cm.sentinelPasswordSecret" -}}
{{- .Values.redis.external.sentinel.existingSecret -}}
{{- end -}}

{{/*
Where the Celery queues live, for KEDA: dict with mode (standalone | sentinel), url (parsed:
scheme, host, path), addresses (sentinels, comma-separated), master, secret and key of the
password (empty secret: none), userEnv (the container variable holding the ACL user, or empty).
*/}}
{{- define "cm.brokerTarget" -}}
{{- $broker := .Values.broker -}}
{{- $ext := .Values.redis.external -}}
{{- $brokerUser := ternary "BROKER_USERNAME" "" (not (empty (include "cm.brokerUser" .))) -}}
{{- $storeUser := include "cm.redisUser" . | fromJson -}}
{{- $storeUserEnv := ternary "REDIS_USERNAME" "" (not (empty $storeUser)) -}}
{{- if hasPrefix "sentinel://" $broker.url -}}
{{- $hosts := list -}}
{{- range (splitList ";" $broker.url) }}{{ if . }}{{ $hosts = append $hosts (urlParse .).host }}{{ end }}{{ end -}}
{{- $first := urlParse (first (splitList ";" $broker.url)) -}}
{{- toJson (dict "mode" "sentinel" "url" (dict "scheme" "redis" "host" "" "path" $first.path) "addresses" (join "," $hosts) "master" $broker.sentinelMaster "secret" $broker.existingSecret "key" $broker.passwordKey "userEnv" $brokerUser) -}}
{{- else if $broker.url -}}
{{- toJson (dict "mode" "standalone" "url" (urlParse $broker.url) "secret" $broker.existingSecret "key" $broker.passwordKey "userEnv" $brokerUser) -}}
{{- else if eq (include "cm.storeMode" .) "sentinel" -}}
{{- toJson (dict "mode" "sentinel" "url" (urlParse (include "cm.redisUrl" .)) "addresses" (join "," $ext.sentinel.addresses) "master" $ext.sentinel.masterName "secret" (include "cm.redisPasswordSecret" .) "key" (include "cm.redisPasswordKey" .) "userEnv" $storeUserEnv) -}}
{{- else -}}
{{- toJson (dict "mode" "standalone" "url" (urlParse (include "cm.redisUrl" .)) "secret" (include "cm.redisPasswordSecret" .) "key" (include "cm.redisPasswordKey" .) "userEnv" $storeUserEnv) -}}
{{- end -}}
{{- end -}}

{{/* A setting value as env text: maps and lists as JSON. */}}
{{- define "cm.settingValue" -}}
{{- if or (kindIs "map" .) (kindIs "slice" .) -}}
{{- toJson . -}}
{{- else if kindIs "float64" . -}}
{{- if eq (floor .) . -}}{{- int64 . -}}{{- else -}}{{- . -}}{{- end -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{/* Pod checksum annotations: restart pods when settings or secrets change. */}}
{{- define "cm.podAnnotations" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Environment of a collapse-monitor container: dict "root" $ "apiToken" bool "alertmanager" bool.
Least privilege: every component gets the Redis store's and broker's credentials (all of them
talk to Redis); only the API gets the API token, and only a worker that consumes the
maintenance queue (where the evaluator sends its verdicts to Alertmanager) gets the
Alertmanager credentials, and only when settings.alertmanager_url is set.
*/}}
{{- define "cm.env" -}}
{{- $root := .root -}}
{{- $user := include "cm.redisUser" $root | fromJson }}
{{- if $user.key }}
- name: REDIS_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.redis.external.existingSecret }}
      key: {{ $user.key }}
{{- else if $user.plain }}
- name: REDIS_USERNAME
  value: {{ $user.plain | quote }}
{{- end }}
- name: COLLAPSE_REDIS_URL
  value: {{ include "cm.redisUrl" $root | quote }}
{{- $pw := include "cm.redisPasswordSecret" $root }}
{{- if $pw }}
- name: COLLAPSE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $pw }}
      key: {{ include "cm.redisPasswordKey" $root }}
{{- end }}
{{- $ext := $root.Values.redis.external }}
{{- if eq (include "cm.storeMode" $root) "cluster" }}
- name: COLLAPSE_REDIS_CLUSTER
  value: "true"
{{- else if eq (include "cm.storeMode" $root) "sentinel" }}
- name: COLLAPSE_REDIS_SENTINELS
  value: {{ join "," $ext.sentinel.addresses | quote }}
- name: COLLAPSE_REDIS_SENTINEL_MASTER
  value: {{ $ext.sentinel.masterName | quote }}
{{- end }}
{{- with include "cm.sentinelPasswordSecret" $root }}
- name: COLLAPSE_REDIS_SENTINEL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $ext.sentinel.passwordKey }}
{{- end }}
{{- with $root.Values.broker.url }}
- name: COLLAPSE_BROKER_URL
  value: {{ . | quote }}
{{- end }}
{{- with include "cm.brokerUser" $root }}
- name: BROKER_USERNAME
  value: {{ . | quote }}
{{- end }}
{{- with $root.Values.broker.sentinelMaster }}
- name: COLLAPSE_BROKER_SENTINEL_MASTER
  value: {{ . | quote }}
{{- end }}
{{- if and $root.Values.broker.url $root.Values.broker.existingSecret }}
- name: COLLAPSE_BROKER_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.broker.existingSecret }}
      key: {{ $root.Values.broker.passwordKey }}
{{- end }}
{{- if .apiToken }}
- name: COLLAPSE_API_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "cm.secretName" $root }}
      key: api-token
{{- end }}
{{- if .alertmanager }}
- name: COLLAPSE_ALERT_LABELS
  value: {{ include "cm.alertLabels" $root | quote }}
- name: COLLAPSE_ALERTMANAGER_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "cm.secretName" $root }}
      key: alertmanager-password
      optional: true
- name: COLLAPSE_ALERTMANAGER_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "cm.secretName" $root }}
      key: alertmanager-token
      optional: true
{{- end }}
- name: HOME
  value: /home/app
- name: HF_HOME
  value: /home/app/.cache/huggingface
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: PYTHONUNBUFFERED
  value: "1"
{{- end -}}

{{/* Whether a component with these queues sends alerts itself: dict "root" $ "queues" str. */}}
{{- define "cm.sendsAlerts" -}}
{{- if and .root.Values.settings.alertmanager_url (has "maintenance" (splitList "," (toString (.queues | default "")))) -}}
true
{{- end -}}
{{- end -}}

{{/* Volumes of every collapse-monitor pod: dict "root" $ "models" bool. */}}
{{- define "cm.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .root.Values.scratch.tmpSizeLimit }}
- name: home
  emptyDir:
    sizeLimit: {{ .root.Values.scratch.homeSizeLimit }}
{{- $mv := .root.Values.modelVolume }}
{{- if and .models (ne $mv.type "none") }}
- name: models
{{- if eq $mv.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ required "modelVolume.claimName is required for type pvc" $mv.claimName }}
    readOnly: true
{{- else if eq $mv.type "hostPath" }}
  hostPath:
    path: {{ required "modelVolume.hostPath is required for type hostPath" $mv.hostPath }}
    type: Directory
{{- else if eq $mv.type "emptyDir" }}
  emptyDir:
    sizeLimit: {{ $mv.sizeLimit }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "cm.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/app
{{- if and .models (ne .root.Values.modelVolume.type "none") }}
- name: models
  mountPath: {{ .root.Values.modelVolume.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Common pod spec fields. */}}
{{- define "cm.podCommon" -}}
serviceAccountName: {{ include "cm.serviceAccountName" . }}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end -}}

{{/* Scheduling fields of a component's values. */}}
{{- define "cm.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
Bytes in a Kubernetes memory quantity ("2Gi", "512Mi", "2G", "1500000000"), as an integer.
*/}}
{{- define "cm.quantityBytes" -}}
{{- $q := toString . -}}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $q -}}
{{- $suffix := trimPrefix $number $q -}}
{{- $factors := dict "" 1.0 "m" 0.001 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 -}}
{{- if or (not $number) (not (hasKey $factors $suffix)) -}}
{{- fail (printf "not a memory quantity: %q" $q) -}}
{{- end -}}
{{- mulf (float64 $number) (get $factors $suffix) | floor | int64 -}}
{{- end -}}

{{/*
maxmemory of the chart's Redis: redis.maxmemory when set, else redis.maxmemoryPercent of the
container's memory limit. Without it Redis grows until the kernel's OOM killer ends it at the
limit (losing whatever the AOF had not yet written); with it Redis refuses writes instead
(noeviction) and the pipeline retries them. The margin covers the fork of AOF rewrites and
RDB saves, and the replication and client buffers that maxmemory does not count.
*/}}
{{- define "cm.redisMaxmemory" -}}
{{- $r := .Values.redis -}}
{{- if $r.maxmemory -}}
{{- $r.maxmemory -}}
{{- else -}}
{{- $limit := (($r.resources | default dict).limits | default dict).memory -}}
{{- if not $limit -}}
{{- fail "redis.resources.limits.memory is required to derive Redis's maxmemory (or set redis.maxmemory): without a bound Redis is killed by the kernel instead of refusing writes" -}}
{{- end -}}
{{- $bytes := include "cm.quantityBytes" $limit | float64 -}}
{{- divf (mulf $bytes (float64 $r.maxmemoryPercent)) 100.0 | floor | int64 -}}
{{- end -}}
{{- end -}}
