{{/* Names, labels and shared pieces of the apimgmt chart. */}}

{{- define "apimgmt.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "apimgmt.fullname" -}}
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

{{- define "apimgmt.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select this release's pods (every component). */}}
{{- define "apimgmt.selectorLabels" -}}
app.kubernetes.io/name: {{ include "apimgmt.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "apimgmt.labels" -}}
helm.sh/chart: {{ include "apimgmt.chart" . }}
{{ include "apimgmt.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: apimgmt
{{- end }}

{{- define "apimgmt.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "apimgmt.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "apimgmt.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "apimgmt.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else }}
{{- include "apimgmt.fullname" . }}
{{- end }}
{{- end }}

{{- define "apimgmt.databaseUrl" -}}
{{- $pg := .Values.postgresql }}
{{- if $pg.url }}
{{- $pg.url }}
{{- else }}
{{- $auth := $pg.user | urlquery }}
{{- if $pg.password }}{{ $auth = printf "%s:%s" $auth ($pg.password | urlquery) }}{{ end }}
{{- printf "postgres://%s@%s:%v/%s?sslmode=%s" $auth $pg.host $pg.port $pg.database $pg.sslmode }}
{{- end }}
{{- end }}

{{- define "apimgmt.redisUrl" -}}
{{- $r := .Values.redis }}
{{- if $r.url }}
{{- $r.url }}
{{- else }}
{{- $auth := "" }}
{{- if $r.password }}{{ $auth = printf ":%s@" ($r.password | urlquery) }}{{ end }}
{{- printf "%s://%s%s:%v/%v" (ternary "rediss" "redis" $r.tls) $auth $r.host $r.port $r.db }}
{{- end }}
{{- end }}

{{/*
The generated secrets, computed once per render and shared by the Secret and the
migration hook's Secret: explicit values win, then the values already stored in
the cluster (so upgrades never rotate KEY_HASH_PEPPER), then fresh random ones.
*/}}
{{- define "apimgmt.generatedSecrets" -}}
{{- if not (hasKey .Values "_generatedSecrets") }}
{{- $existing := (lookup "v1" "Secret" .Release.Namespace (include "apimgmt.fullname" .)) | default dict }}
{{- $data := (get $existing "data") | default dict }}
{{- $secretKey := .Values.secrets.secretKey | default ((get $data "SECRET_KEY") | default "" | b64dec) | default (randAlphaNum 64) }}
{{- $pepper := .Values.secrets.keyHashPepper | default ((get $data "KEY_HASH_PEPPER") | default "" | b64dec) | default (randAlphaNum 48) }}
{{- $_ := set .Values "_generatedSecrets" (dict "SECRET_KEY" $secretKey "KEY_HASH_PEPPER" $pepper) }}
{{- end }}
{{- toYaml .Values._generatedSecrets }}
{{- end }}

{{/* Secret data (base64) for the chart-managed Secret. */}}
{{- define "apimgmt.secretData" -}}
{{- $gen := include "apimgmt.generatedSecrets" . | fromYaml -}}
SECRET_KEY: {{ $gen.SECRET_KEY | b64enc | quote }}
KEY_HASH_PEPPER: {{ $gen.KEY_HASH_PEPPER | b64enc | quote }}
DATABASE_URL: {{ include "apimgmt.databaseUrl" . | b64enc | quote }}
REDIS_URL: {{ include "apimgmt.redisUrl" . | b64enc | quote }}
{{- end }}

{{/* Non-secret settings shared by every component (ConfigMap data, and the hook Job's env). */}}
{{- define "apimgmt.configData" -}}
DEBUG: "0"
LOG_LEVEL: {{ .Values.config.logLevel | quote }}
CSRF_TRUSTED_ORIGINS: {{ join "," .Values.config.csrfTrustedOrigins | quote }}
UPSTREAM_ALLOW_PRIVATE: {{ ternary "1" "0" .Values.config.upstreamAllowPrivate | quote }}
SECURE_SSL_REDIRECT: {{ ternary "1" "0" .Values.config.secureSslRedirect | quote }}
SECURE_HSTS_SECONDS: {{ .Values.config.secureHstsSeconds | quote }}
USE_X_FORWARDED_PROTO: {{ ternary "1" "0" .Values.config.useXForwardedProto | quote }}
TRUSTED_PROXIES: {{ join "," .Values.config.trustedProxies | quote }}
DB_POOL_SIZE: {{ .Values.config.dbPoolSize | quote }}
REDIS_SOCKET_TIMEOUT: {{ .Values.config.redisSocketTimeout | quote }}
PROMETHEUS_MULTIPROC_DIR: /var/run/apimgmt/prometheus
USAGE_SPOOL_DIR: /var/lib/apimgmt/spool
{{- if .Values.config.toml }}
APIMGMT_CONFIG: /etc/apimgmt/apimgmt.toml
{{- end }}
{{- range $name, $value := .Values.config.extraEnv }}
{{ $name }}: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/*
ALLOWED_HOSTS: configured hosts, the ingress hosts of the component's own role (the control plane
never accepts a gateway host name, and the other way round), localhost (probes send Host: localhost)
and the pod's own IP (Prometheus scrapes pods by IP). Kubernetes expands $(POD_IP). Call with (list $ role).
*/}}
{{- define "apimgmt.allowedHosts" -}}
{{- $root := index . 0 }}
{{- $role := index . 1 }}
{{- $ingress := $root.Values.ingress }}
{{- $roleHosts := ternary $ingress.gatewayHosts $ingress.controlHosts (eq $role "gateway") }}
{{- $hosts := concat $root.Values.config.allowedHosts (ternary $roleHosts (list) $ingress.enabled) (list "localhost" "127.0.0.1" "$(POD_IP)") }}
{{- join "," (uniq $hosts) }}
{{- end }}

{{/*
Refuses values that would serve the gateway and the control plane on one origin: a tenant's upstream,
reached through the gateway, could then serve HTML or Set-Cookie on the admin's origin.
*/}}
{{- define "apimgmt.validateIngress" -}}
{{- $ingress := .Values.ingress }}
{{- if or (hasKey $ingress "hosts") (hasKey $ingress "controlPaths") }}
{{- fail "ingress.hosts and ingress.controlPaths are gone: set ingress.gatewayHosts and ingress.controlHosts (different host names; see docs/deployment.md)" }}
{{- end }}
{{- if $ingress.enabled }}
{{- if not (and $ingress.gatewayHosts $ingress.controlHosts) }}
{{- fail "ingress.enabled needs both ingress.gatewayHosts and ingress.controlHosts" }}
{{- end }}
{{- range $ingress.gatewayHosts }}
{{- if has . $ingress.controlHosts }}
{{- fail (printf "ingress: %s is both a gateway and a control host; the gateway and the control plane need different host names (see docs/deployment.md)" .) }}
{{- end }}
{{- end }}
{{- range $origin := $.Values.config.csrfTrustedOrigins }}
{{- $host := regexReplaceAll "^[a-z]+://([^/:]+).*$" $origin "${1}" }}
{{- if has $host $ingress.gatewayHosts }}
{{- fail (printf "config.csrfTrustedOrigins must not list the gateway host %s: pages served there come from tenants' upstreams" $host) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* env entries every app container has: the pod IP, ALLOWED_HOSTS and the role. Call with (list $ role). */}}
{{- define "apimgmt.env" -}}
{{- $root := index . 0 }}
{{- $role := index . 1 -}}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: ALLOWED_HOSTS
  value: {{ include "apimgmt.allowedHosts" (list $root $role) | quote }}
- name: APIMGMT_ROLE
  value: {{ $role | quote }}
{{- end }}

{{/* envFrom: the ConfigMap and the Secret. */}}
{{- define "apimgmt.envFrom" -}}
- configMapRef:
    name: {{ include "apimgmt.fullname" . }}
- secretRef:
    name: {{ include "apimgmt.secretName" . }}
{{- end }}

{{/* Writable paths under a read-only root filesystem. */}}
{{- define "apimgmt.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: prometheus-multiproc
  mountPath: /var/run/apimgmt/prometheus
- name: usage-spool
  mountPath: /var/lib/apimgmt/spool
{{- if .Values.config.toml }}
- name: config
  mountPath: /etc/apimgmt
  readOnly: true
{{- end }}
{{- end }}

{{- define "apimgmt.volumes" -}}
- name: tmp
  emptyDir: {}
- name: prometheus-multiproc
  emptyDir:
    medium: Memory
    sizeLimit: 64Mi
# Usage events spooled while Redis is down. emptyDir: it survives container restarts but not the
# pod's deletion (docs/deployment.md). A pod whose spool outgrows sizeLimit is evicted.
- name: usage-spool
  emptyDir:
    sizeLimit: {{ .Values.usageSpool.sizeLimit }}
{{- if .Values.config.toml }}
- name: config
  configMap:
    name: {{ include "apimgmt.fullname" . }}
    items:
      - key: apimgmt.toml
        path: apimgmt.toml
{{- end }}
{{- end }}

{{/* Rolls the pods when the configuration or the chart-managed secret changes. */}}
{{- define "apimgmt.checksums" -}}
checksum/config: {{ include "apimgmt.configData" . | sha256sum }}
{{- if not .Values.secrets.existingSecret }}
checksum/secret: {{ include "apimgmt.secretData" . | sha256sum }}
{{- end }}
{{- end }}

{{/* HTTP probes; Host: localhost so ALLOWED_HOSTS accepts them. Call with (dict "probe" ... "path" ... ["port" ...]). */}}
{{- define "apimgmt.httpProbe" -}}
httpGet:
  path: {{ .path }}
  port: {{ .port | default "http" }}
  httpHeaders:
    - name: Host
      value: localhost
initialDelaySeconds: {{ .probe.initialDelaySeconds }}
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
{{- end }}
