{{/* Chart name, truncated to a label's 63 characters. */}}
{{- define "protonmf.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object names: the release name when it contains the chart name, else <release>-<chart>. */}}
{{- define "protonmf.fullname" -}}
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

{{/* What selects this release's pods (Deployment, Service, PDB, NetworkPolicy, spread). */}}
{{- define "protonmf.selectorLabels" -}}
app.kubernetes.io/name: {{ include "protonmf.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Every object's labels: the Kustomize base's four, plus Helm's. */}}
{{- define "protonmf.labels" -}}
{{ include "protonmf.selectorLabels" . }}
app.kubernetes.io/component: server
app.kubernetes.io/part-of: protonmf
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "protonmf.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "protonmf.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding the API keys (key api-keys). */}}
{{- define "protonmf.authSecretName" -}}
{{- default (printf "%s-auth" (include "protonmf.fullname" .)) .Values.auth.existingSecret }}
{{- end }}
