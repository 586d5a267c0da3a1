{{/*
Names, labels and the checks that the values schema cannot express. Every name is prefixed with
the chart's name, so that the charts of the registration bridge can also sit side by side in an
umbrella chart.
*/}}

{{- define "legacy-sim.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: the release name alone when it already contains the chart's name. */}}
{{- define "legacy-sim.fullname" -}}
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

{{- define "legacy-sim.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The image tag, and the version label made of it (a label value allows fewer characters). */}}
{{- define "legacy-sim.tag" -}}
{{- .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "legacy-sim.version" -}}
{{- regexReplaceAll "[^A-Za-z0-9._-]" (include "legacy-sim.tag" .) "_" | trunc 63 | trimAll "._-" }}
{{- end }}

{{- define "legacy-sim.selectorLabels" -}}
app.kubernetes.io/name: {{ include "legacy-sim.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The standard labels, on every object of the chart and on its pods. */}}
{{- define "legacy-sim.labels" -}}
helm.sh/chart: {{ include "legacy-sim.chart" . }}
{{ include "legacy-sim.selectorLabels" . }}
app.kubernetes.io/version: {{ include "legacy-sim.version" . | quote }}
app.kubernetes.io/component: legacy-api
app.kubernetes.io/part-of: registration-bridge
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "legacy-sim.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "legacy-sim.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Rules across values, which values.schema.json cannot express. Included by the Deployment. */}}
{{- define "legacy-sim.validate" -}}
{{- if and (not .Values.config.latencyProfile) (gt (.Values.config.latencyMinS | float64) (.Values.config.latencyMaxS | float64)) }}
{{- fail (printf "config.latencyMinS (%v) must not exceed config.latencyMaxS (%v)" .Values.config.latencyMinS .Values.config.latencyMaxS) }}
{{- end }}
{{- end }}

{{/* A budget that allows no eviction of the one pod blocks every node drain; refused unless
podDisruptionBudget.blockAllEvictions says that is intended. Kubernetes rounds a percentage of
minAvailable up, so any minAvailable above 0 keeps the one pod. */}}
{{- define "legacy-sim.validateBudget" -}}
{{- $budget := .Values.podDisruptionBudget }}
{{- $blocks := false }}
{{- $rule := "" }}
{{- if not (kindIs "invalid" $budget.minAvailable) }}
{{- $rule = printf "minAvailable %v" $budget.minAvailable }}
{{- $blocks = ne (trimSuffix "%" (toString $budget.minAvailable)) "0" }}
{{- else if not (kindIs "invalid" $budget.maxUnavailable) }}
{{- $rule = printf "maxUnavailable %v" $budget.maxUnavailable }}
{{- $blocks = eq (trimSuffix "%" (toString $budget.maxUnavailable)) "0" }}
{{- end }}
{{- if and $blocks (not $budget.blockAllEvictions) }}
{{- fail (printf "podDisruptionBudget: %s allows no eviction of legacy-sim's one pod: every node drain would hang. Allow the pod to go, or set podDisruptionBudget.blockAllEvictions=true if that is intended" $rule) }}
{{- end }}
{{- end }}
