{{/*
Names, labels and small values every template shares.
*/}}

{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name, at most 52 characters so that "-metrics", "-trainer" etc. still fit 63. */}}
{{- define "kubetune.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kubetune.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- end }}

{{/* The operator pod's identity. The component label keeps trainer pods (which also carry
app.kubernetes.io/name: kubetune) out of the Deployment's selector. */}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The gateway pods' identity (`kubetune api`, templates/gateway.yaml). */}}
{{- define "kubetune.gatewaySelectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{/* Labels the operator puts on every trainer and validation pod (kubetune.operator.builders.labels). */}}
{{- define "kubetune.trainerPodLabels" -}}
app.kubernetes.io/managed-by: kubetune-operator
{{- end }}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository@digest when a digest is set, else repository:tag (tag defaults to appVersion).
Call with (list .Values.image $). */}}
{{- define "kubetune.image" -}}
{{- $image := index . 0 }}
{{- $root := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/* The uid of both images (USER in operator/Dockerfile and trainer/Dockerfile, builders.UID). */}}
{{- define "kubetune.uid" -}}
1000
{{- end }}

{{- define "kubetune.namespaced" -}}
{{- if eq .Values.watch.scope "Namespaced" }}true{{ end }}
{{- end }}

{{/* Namespaces that get the trainer ServiceAccount (and trainer NetworkPolicy), as JSON. */}}
{{- define "kubetune.trainerNamespaces" -}}
{{- $namespaces := .Values.trainer.serviceAccount.namespaces }}
{{- if not $namespaces }}
{{- if include "kubetune.namespaced" . }}
{{- $namespaces = .Values.watch.namespaces }}
{{- else }}
{{- $namespaces = list .Release.Namespace }}
{{- end }}
{{- end }}
{{- toJson $namespaces }}
{{- end }}

{{/* The operator's RBAC rules (files/operator-rbac.yaml, generated from the measured API usage),
with the peering rules of the watch scope when peering is on and the serving rules when
serving.enabled; as YAML. */}}
{{- define "kubetune.operatorRules" -}}
{{- $file := .Files.Get "files/operator-rbac.yaml" | fromYaml }}
{{- $rules := $file.always }}
{{- if .Values.peering.enabled }}
{{- $rules = concat $rules (ternary $file.peeringNamespaced $file.peeringCluster (eq .Values.watch.scope "Namespaced")) }}
{{- end }}
{{- if (.Values.serving).enabled }}
{{- $rules = concat $rules $file.serving }}
{{- end }}
{{- toYaml $rules }}
{{- end }}

{{/* A NetworkPolicy peer for cluster DNS. */}}
{{- define "kubetune.dnsEgress" -}}
- to:
    - namespaceSelector:
        matchLabels: {{- toYaml .Values.networkPolicy.dns.namespaceLabels | nindent 10 }}
      podSelector:
        matchLabels: {{- toYaml .Values.networkPolicy.dns.podLabels | nindent 10 }}
  ports:
    - {protocol: UDP, port: 53}
    - {protocol: TCP, port: 53}
{{- end }}
