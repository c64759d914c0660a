{{/* Chart name, truncated to the 63 characters of a label value. */}}
{{- define "mio.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object name prefix: the release name, plus the chart name unless the release name holds it. */}}
{{- define "mio.fullname" -}}
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

{{/* Labels that select the operator's pods (immutable in a Deployment: never add to them). */}}
{{- define "mio.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mio.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of every object. The kustomize base in deploy/ carries the same ones minus the Helm pair. */}}
{{- define "mio.labels" -}}
{{ include "mio.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: mail-integration-operator
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of the `helm test` Pod: the chart's, but never the operator pods' selector labels (the
Services, the PodDisruptionBudget and the NetworkPolicy must not select it). */}}
{{- define "mio.testLabels" -}}
app.kubernetes.io/name: {{ include "mio.name" . }}-test
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: test
app.kubernetes.io/part-of: mail-integration-operator
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* imagePullSecrets: global.imagePullSecrets (names or {name: ...}, as umbrella charts pass them)
and imagePullSecrets, each name once. */}}
{{- define "mio.imagePullSecrets" -}}
{{- $names := list }}
{{- range concat ((.Values.global).imagePullSecrets | default list) (.Values.imagePullSecrets | default list) }}
{{- if kindIs "string" . }}
{{- $names = append $names . }}
{{- else }}
{{- $names = append $names .name }}
{{- end }}
{{- end }}
{{- range $names | uniq }}
- name: {{ . }}
{{- end }}
{{- end }}

{{- define "mio.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mio.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mio.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "mio.keySecretName" -}}
{{- default (printf "%s-sign-in-key" (include "mio.fullname" .)) .Values.signIn.keySecretName }}
{{- end }}

{{- define "mio.leaseName" -}}
{{- default (printf "%s-leader" (include "mio.fullname" .)) .Values.leaderElection.leaseName }}
{{- end }}

{{/* Leader election: asked for, or needed because more than one pod runs. */}}
{{- define "mio.leaderElection" -}}
{{- if or .Values.leaderElection.enabled (gt (int .Values.replicaCount) 1) }}true{{- end }}
{{- end }}

{{/* The external base URL of the sign-in server, without a trailing slash; empty when unknown. */}}
{{- define "mio.publicURL" -}}
{{- if .Values.publicURL }}
{{- .Values.publicURL | trimSuffix "/" }}
{{- else if and .Values.ingress.enabled .Values.ingress.host }}
{{- printf "%s://%s" (ternary "https" "http" (ne .Values.ingress.tlsSecretName "")) .Values.ingress.host }}
{{- else if and .Values.httpRoute.enabled .Values.httpRoute.hostnames }}
{{- printf "https://%s" (first .Values.httpRoute.hostnames) }}
{{- end }}
{{- end }}

{{/* The rules the operator needs wherever it watches MailIntegrations (ClusterRole or per-namespace Role). */}}
{{- define "mio.watchRules" -}}
# Watch MailIntegrations (the controller's list/watch) and read one before acting on it.
- apiGroups: ["mailintegration.dev"]
  resources: ["mailintegrations"]
  verbs: ["get", "list", "watch"]
# Write status (server-side apply: PATCH). The operator never writes spec.
- apiGroups: ["mailintegration.dev"]
  resources: ["mailintegrations/status"]
  verbs: ["patch"]
# spec.revokeOnDelete: add and remove the mailintegration.dev/revoke-grant finalizer, a merge patch
# of metadata.finalizers only (with the resourceVersion, so another finalizer is never overwritten).
# The status subresource above cannot carry it: writes to /status ignore everything but status.
# RBAC cannot narrow a verb to a field, so this also lets the ServiceAccount patch spec; the
# operator never does (spec is the user's). No update, create or delete.
- apiGroups: ["mailintegration.dev"]
  resources: ["mailintegrations"]
  verbs: ["patch"]
# Secrets: label-selected watches (list/watch): metadata-only of the Secrets users marked
# mailintegration.dev/oauth-client=true (their data is read by GET, once per version, when an
# integration names them), and of the operator's grant and token Secrets (label
# mailintegration.dev/integration) with their data, at most 64 KiB kept per Secret (docs/security.md);
# GETs of a Secret a spec names that the watches do not hold, and writes of the grant Secret
# (create/update) and the token Secret (server-side apply: patch). No delete: owned Secrets go with their
# MailIntegration through garbage collection. RBAC cannot narrow these verbs by label or name (the
# names come from each MailIntegration), and its list is not metadata-only: the ServiceAccount may
# read and overwrite any Secret where this rule applies. The operator reads only the Secrets a user
# labelled mailintegration.dev/oauth-client or mailintegration.dev/integration, and those it owns.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "update", "patch"]
# Events on MailIntegrations (kube-rs publishes events.k8s.io/v1 and patches a repeated one).
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/* The mail gateway's selector labels. Its app.kubernetes.io/name differs from the operator's, so
that the operator's Services, PodDisruptionBudget and NetworkPolicy (which select name + instance)
never select a gateway pod. */}}
{{- define "mio.gatewaySelectorLabels" -}}
app.kubernetes.io/name: {{ include "mio.name" . }}-gateway
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of the gateway's objects. */}}
{{- define "mio.gatewayLabels" -}}
{{ include "mio.gatewaySelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: gateway
app.kubernetes.io/part-of: mail-integration-operator
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The gateway's TLS Secret: cert-manager's (named by the chart) or the one the user names. */}}
{{- define "mio.gatewayTLSSecret" -}}
{{- if .Values.gateway.tls.certManager.enabled }}
{{- if not .Values.gateway.tls.certManager.issuerRef.name }}
{{- fail "gateway.tls.certManager.enabled needs gateway.tls.certManager.issuerRef.name (an Issuer or ClusterIssuer of cert-manager)" }}
{{- end }}
{{- printf "%s-gateway-tls" (include "mio.fullname" .) }}
{{- else }}
{{- .Values.gateway.tls.secretName }}
{{- end }}
{{- end }}

{{/* What the gateway does in the cluster. */}}
{{- define "mio.gatewayRules" -}}
# The gateway Secrets (label mailintegration.dev/gateway=true), label-selected by the gateway.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["list", "watch"]
# status.gateway.apps[].lastUsedTime / lastError (server-side apply under its own field manager,
# at most once an hour per app).
- apiGroups: ["mailintegration.dev"]
  resources: ["mailintegrations/status"]
  verbs: ["patch"]
# Read the MailIntegration before recording an app's use (its stored lastUsedTime: at most one
# write an hour per app).
- apiGroups: ["mailintegration.dev"]
  resources: ["mailintegrations"]
  verbs: ["get"]
# Events on the MailIntegration (e.g. the provider refusing SMTP AUTH for the mailbox).
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
