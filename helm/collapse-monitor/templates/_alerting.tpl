{{/*
Labels the evaluator's direct Alertmanager client adds to its alerts (COLLAPSE_ALERT_LABELS, a
JSON object), so that they equal the labels Prometheus gives the same rule's alert and
Alertmanager deduplicates the two: the exporter series' namespace and job (a ServiceMonitor's
job is the Service's name), prometheusRule.externalLabels (what Prometheus adds when it sends),
and prometheusRule.additionalRuleLabels. Precedence as in Prometheus: rule labels over series
labels over external labels; settings.alert_labels over all, for relabelled setups.
*/}}
{{- define "cm.alertLabels" -}}
{{- $scope := dict "namespace" .Release.Namespace "job" (printf "%s-exporter" (include "cm.fullname" .)) -}}
{{- $labels := merge (dict) (.Values.settings.alert_labels | default dict) (.Values.prometheusRule.additionalRuleLabels | default dict) $scope (.Values.prometheusRule.externalLabels | default dict) -}}
{{- toJson $labels -}}
{{- end -}}
