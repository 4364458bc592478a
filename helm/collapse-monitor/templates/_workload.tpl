{{/*
One collapse-monitor Deployment. dict:
  root: $, component: name, values: the component's values, args: container args,
  ports: [{name, port}] (http probes on the first), models: mount modelVolume,
  gpu: GPU worker, slim: the slim core image (slimImage), replicas: int or nil (autoscaled), recreate: Recreate strategy,
  readyPath: readiness probe path (default /readyz), liveness: the component's liveness values
  (processes without ports: the heartbeat file, see cm.heartbeatArgs).
*/}}
{{- define "cm.deployment" -}}
{{- $root := .root -}}
{{- $v := .values -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "cm.fullname" $root }}-{{ .component }}
  labels:
    {{- include "cm.labels" (dict "root" $root "component" .component) | nindent 4 }}
spec:
  {{- if not (kindIs "invalid" .replicas) }}
  replicas: {{ .replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  {{- if .recreate }}
  strategy:
    type: Recreate
  {{- end }}
  selector:
    matchLabels:
      {{- include "cm.selectorLabels" (dict "root" $root "component" .component) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "cm.selectorLabels" (dict "root" $root "component" .component) | nindent 8 }}
        {{- with $root.Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        {{- include "cm.podAnnotations" $root | nindent 8 }}
    spec:
      {{- include "cm.podCommon" $root | nindent 6 }}
      {{- with (include "cm.scheduling" $v) }}{{ . | nindent 6 }}{{ end }}
      {{- with $v.terminationGracePeriodSeconds }}
      terminationGracePeriodSeconds: {{ . }}
      {{- end }}
      {{- if and .gpu $v.runtimeClassName }}
      runtimeClassName: {{ $v.runtimeClassName }}
      {{- end }}
      {{- if and .gpu $v.initContainers }}
      initContainers:
        {{- range $v.initContainers }}
        {{- /* Init containers run under the chart's security context, whatever they ask for. */}}
        - {{- toYaml (set (deepCopy .) "securityContext" (deepCopy $root.Values.securityContext)) | nindent 10 }}
        {{- end }}
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ if .gpu }}{{ include "cm.gpuImage" $root }}{{ else if .slim }}{{ include "cm.slimImage" $root }}{{ else }}{{ include "cm.image" $root }}{{ end }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["collapse-monitor"]
          args:
            {{- toYaml .args | nindent 12 }}
          {{- if .ports }}
          ports:
            {{- range .ports }}
            - name: {{ .name }}
              containerPort: {{ .port }}
              protocol: TCP
            {{- end }}
          livenessProbe:
            httpGet:
              path: /healthz
              port: {{ (first .ports).name }}
            initialDelaySeconds: 10
            periodSeconds: 20
            timeoutSeconds: 5
            failureThreshold: 3
          readinessProbe:
            httpGet:
              path: {{ .readyPath | default "/readyz" }}
              port: {{ (first .ports).name }}
            periodSeconds: 10
            timeoutSeconds: 5
            failureThreshold: 3
          {{- else if and .liveness .liveness.enabled }}
          {{- $check := include "cm.heartbeatCheck" .liveness }}
          # The process touches the heartbeat file from its own loop (cm.heartbeatArgs).
          startupProbe:
            exec:
              command: ["sh", "-c", {{ $check | quote }}]
            periodSeconds: 10
            timeoutSeconds: 10
            failureThreshold: {{ div (add (int .liveness.startupSeconds) 9) 10 }}
          livenessProbe:
            exec:
              command: ["sh", "-c", {{ $check | quote }}]
            periodSeconds: 30
            timeoutSeconds: 10
            failureThreshold: 2
          {{- end }}
          envFrom:
            - configMapRef:
                name: {{ include "cm.fullname" $root }}-settings
          env:
            {{- $alerts := include "cm.sendsAlerts" (dict "root" $root "queues" $v.queues) }}
            {{- include "cm.env" (dict "root" $root "apiToken" (eq .component "api") "alertmanager" (eq $alerts "true")) | nindent 12 }}
            {{- with $v.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          resources:
            {{- $res := deepCopy ($v.resources | default dict) }}
            {{- if .gpu }}
            {{- $limits := merge (dict "nvidia.com/gpu" (int $v.gpus)) ($res.limits | default dict) }}
            {{- $_ := set $res "limits" $limits }}
            {{- end }}
            {{- toYaml $res | nindent 12 }}
          volumeMounts:
            {{- include "cm.volumeMounts" (dict "root" $root "models" .models) | nindent 12 }}
      volumes:
        {{- include "cm.volumes" (dict "root" $root "models" .models) | nindent 8 }}
{{- end -}}

{{/* Replicas of an autoscalable component: nil when HPA or KEDA owns them. */}}
{{- define "cm.checkScaling" -}}
{{- if and .values.hpa.enabled .values.keda.enabled -}}
{{- fail (printf "%s: enable hpa or keda, not both (KEDA creates its own HPA)" .component) -}}
{{- end -}}
{{- end -}}


{{/*
Liveness of the Celery processes (worker, beat): they touch a heartbeat file from their own
loop (`--heartbeat-file`, every 10 s), and the probe compares its age with sh, date and stat:
no Python start (seconds with torch) and no broker round trip, unlike `celery inspect ping`.
*/}}
{{- define "cm.heartbeatFile" -}}/tmp/heartbeat{{- end -}}

{{/* Args that turn the heartbeat on: the component's liveness values. */}}
{{- define "cm.heartbeatArgs" -}}
{{- if .enabled -}}
{{- toJson (list (printf "--heartbeat-file=%s" (include "cm.heartbeatFile" .))) -}}
{{- else -}}
[]
{{- end -}}
{{- end -}}

{{/* The probe's shell check: the heartbeat exists and is younger than maxAgeSeconds. */}}
{{- define "cm.heartbeatCheck" -}}
f={{ include "cm.heartbeatFile" . }}; [ -f "$f" ] && [ $(( $(date +%s) - $(stat -c %Y "$f") )) -lt {{ int .maxAgeSeconds }} ]
{{- end -}}
