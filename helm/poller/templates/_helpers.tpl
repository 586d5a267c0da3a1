{{/*
Names, labels and the checks that the values schema cannot express. Every name is prefixed with
the chart's name, so that the charts of the registration bridge can also sit side by side in an
umbrella chart.
*/}}

{{- define "poller.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: the release name alone when it already contains the chart's name. */}}
{{- define "poller.fullname" -}}
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

{{- define "poller.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The image tag, and the version label made of it (a label value allows fewer characters). */}}
{{- define "poller.tag" -}}
{{- .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "poller.version" -}}
{{- regexReplaceAll "[^A-Za-z0-9._-]" (include "poller.tag" .) "_" | trunc 63 | trimAll "._-" }}
{{- end }}

{{- define "poller.selectorLabels" -}}
app.kubernetes.io/name: {{ include "poller.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The standard labels, on every object of the chart and on its pods. */}}
{{- define "poller.labels" -}}
helm.sh/chart: {{ include "poller.chart" . }}
{{ include "poller.selectorLabels" . }}
app.kubernetes.io/version: {{ include "poller.version" . | quote }}
app.kubernetes.io/component: poller
app.kubernetes.io/part-of: registration-bridge
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "poller.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "poller.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret that holds RABBITMQ_URL and MONGODB_URI, and the keys to read in it. */}}
{{- define "poller.secretName" -}}
{{- if .Values.secret.create }}
{{- include "poller.fullname" . }}
{{- else }}
{{- required "secret.existingSecret: name the Secret holding RABBITMQ_URL and MONGODB_URI, or set secret.create=true" .Values.secret.existingSecret }}
{{- end }}
{{- end }}

{{- define "poller.rabbitmqUrlKey" -}}
{{- if .Values.secret.create }}RABBITMQ_URL{{ else }}{{ .Values.secret.rabbitmqUrlKey }}{{ end }}
{{- end }}

{{- /* The Secret key KEDA reads the broker's address from: the AMQP URL, or the management API's. */}}
{{- define "poller.kedaHostKey" -}}
{{- if eq .Values.autoscaling.keda.protocol "amqp" }}
{{- include "poller.rabbitmqUrlKey" . }}
{{- else if .Values.secret.create }}
{{- if not .Values.secret.rabbitmqManagementUrl }}
{{- fail "secret.rabbitmqManagementUrl is required for KEDA with autoscaling.keda.protocol http (or set protocol amqp)" }}
{{- end }}RABBITMQ_MANAGEMENT_URL
{{- else }}
{{- .Values.secret.rabbitmqManagementUrlKey }}
{{- end }}
{{- end }}

{{- define "poller.mongodbUriKey" -}}
{{- if .Values.secret.create }}MONGODB_URI{{ else }}{{ .Values.secret.mongodbUriKey }}{{ end }}
{{- end }}

{{/* PREFETCH: eight times WORKERS unless set, as the service itself defaults it. */}}
{{- define "poller.prefetch" -}}
{{- if .Values.config.prefetch }}
{{- .Values.config.prefetch | int }}
{{- else }}
{{- mul 8 (.Values.config.workers | int) }}
{{- end }}
{{- end }}

{{/* Rules across values, which values.schema.json cannot express. Included by the Deployment. */}}
{{- define "poller.validate" -}}
{{- if le (.Values.terminationGracePeriodSeconds | float64) (.Values.config.shutdownTimeoutS | float64) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed config.shutdownTimeoutS (%v): the pod would be killed before it finished its work in hand" .Values.terminationGracePeriodSeconds .Values.config.shutdownTimeoutS) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (not .Values.autoscaling.keda.enabled) (lt (.Values.autoscaling.minReplicas | int) 1) }}
{{- fail "autoscaling.minReplicas must be at least 1 for an HPA (only KEDA scales to zero)" }}
{{- end }}
{{- if and .Values.autoscaling.enabled .Values.autoscaling.keda.enabled (eq .Values.autoscaling.keda.protocol "amqp") (lt (.Values.autoscaling.minReplicas | int) 1) (not .Values.autoscaling.keda.acceptScaleToZeroDelay) }}
{{- fail "autoscaling.minReplicas 0 with autoscaling.keda.protocol amqp: KEDA sees only ready messages on the pending queue, not the ids in the wait queues or held by a poller, so it would scale the poller away mid-flight (15-45 s added per poll). Use protocol http, minReplicas 1, or set autoscaling.keda.acceptScaleToZeroDelay=true" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (.Values.autoscaling.minReplicas | int) (.Values.autoscaling.maxReplicas | int)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- /* Checked here rather than by a schema pattern, whose error would print the URL. */}}
{{- if not (regexMatch "^https?://[^/?#@]+" .Values.config.legacyApiUrl) }}
{{- fail "config.legacyApiUrl must be an http:// or https:// URL" }}
{{- end }}
{{- if regexMatch "^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@" .Values.config.legacyApiUrl }}
{{- fail "config.legacyApiUrl must not carry credentials: it is rendered into a ConfigMap" }}
{{- end }}
{{- if gt (.Values.config.pollFirstDelayS | float64) (.Values.config.pollDeadlineS | float64) }}
{{- fail "config.pollFirstDelayS must not exceed config.pollDeadlineS: every registration would time out" }}
{{- end }}
{{- end }}

{{/* The fewest pods the Deployment runs: replicaCount, or the autoscaler's floor. Never below one,
since a budget matters from the first pod on (KEDA may scale to zero and back). */}}
{{- define "poller.fewestPods" -}}
{{- $pods := .Values.replicaCount | int }}
{{- if .Values.autoscaling.enabled }}
{{- $pods = .Values.autoscaling.minReplicas | int }}
{{- end }}
{{- max $pods 1 }}
{{- end }}

{{/* A budget that allows no eviction at the fewest pods blocks every node drain; refused unless
podDisruptionBudget.blockAllEvictions says that is intended. Kubernetes rounds a percentage of
minAvailable up. */}}
{{- define "poller.validateBudget" -}}
{{- $budget := .Values.podDisruptionBudget }}
{{- $pods := include "poller.fewestPods" . | int }}
{{- $blocks := false }}
{{- $rule := "" }}
{{- if not (kindIs "invalid" $budget.minAvailable) }}
{{- $rule = printf "minAvailable %v" $budget.minAvailable }}
{{- $min := toString $budget.minAvailable }}
{{- if hasSuffix "%" $min }}
{{- $blocks = ge (div (add (mul (trimSuffix "%" $min | int) $pods) 99) 100) $pods }}
{{- else }}
{{- $blocks = ge ($min | int) $pods }}
{{- end }}
{{- else if not (kindIs "invalid" $budget.maxUnavailable) }}
{{- $rule = printf "maxUnavailable %v" $budget.maxUnavailable }}
{{- $blocks = eq (trimSuffix "%" (toString $budget.maxUnavailable)) "0" }}
{{- end }}
{{- if and $blocks (not $budget.blockAllEvictions) }}
{{- fail (printf "podDisruptionBudget: %s allows no eviction with %d pod(s) (replicaCount, or autoscaling.minReplicas when autoscaling): every node drain would hang. Allow at least one pod to go, or set podDisruptionBudget.blockAllEvictions=true if that is intended" $rule $pods) }}
{{- end }}
{{- end }}

{{/* Where the private CA is, when tls.caBundle names one: "secret", "configMap", or nothing. */}}
{{- define "poller.caSource" -}}
{{- $ca := .Values.tls.caBundle }}
{{- if and $ca.secretName $ca.configMapName }}
{{- fail "tls.caBundle: set secretName or configMapName, not both" }}
{{- else if $ca.secretName }}secret
{{- else if $ca.configMapName }}configMap
{{- end }}
{{- end }}
