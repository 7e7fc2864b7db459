{{- define "broadcastd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "broadcastd.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "broadcastd.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "broadcastd.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "broadcastd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "broadcastd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "broadcastd.labels" -}}
{{ include "broadcastd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "broadcastd.controlSecret" -}}
{{- default (printf "%s-control" (include "broadcastd.fullname" .)) .Values.controlToken.existingSecret -}}
{{- end -}}

{{/* Refuse values that would deploy something broken, saying why. */}}
{{- define "broadcastd.validate" -}}
{{- $v := .Values -}}
{{- if not (has $v.engine (list "memory" "redis")) -}}
{{- fail (printf "engine must be memory or redis, not %q" $v.engine) -}}
{{- end -}}
{{- if and (eq $v.engine "memory") (or (gt (int $v.replicaCount) 1) (gt (int $v.processesPerPod) 1)) -}}
{{- fail "engine: memory keeps channels inside one process, so replicaCount and processesPerPod must be 1 (a publish would reach only one process's subscribers); set engine: redis to run more" -}}
{{- end -}}
{{- if lt (int $v.processesPerPod) 1 -}}
{{- fail "processesPerPod must be at least 1" -}}
{{- end -}}
{{- if and (eq $v.engine "redis") (not (or $v.redis.url $v.redis.existingSecret $v.redis.shards)) -}}
{{- fail "engine: redis needs redis.url, redis.existingSecret or redis.shards" -}}
{{- end -}}
{{- if le (int $v.terminationGracePeriodSeconds) (add $v.preStopSeconds $v.drainTimeout | int) -}}
{{- fail "terminationGracePeriodSeconds must exceed preStopSeconds + drainTimeout, or the kubelet kills a draining pod" -}}
{{- end -}}
{{- end -}}

{{/* The environment of one broadcastd process: (dict "ctx" $ "index" N). */}}
{{- define "broadcastd.env" -}}
{{- $ := .ctx -}}
{{- $v := $.Values -}}
{{- $index := .index -}}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: BROADCASTD_WS__PORT
  value: {{ $v.ports.ws | quote }}
- name: BROADCASTD_CONTROL__HOST
  value: $(POD_IP)
- name: BROADCASTD_CONTROL__PORT
  value: {{ $v.ports.control | quote }}
- name: BROADCASTD_CONTROL__TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "broadcastd.controlSecret" $ }}
      key: {{ $v.controlToken.existingSecretKey }}
- name: BROADCASTD_METRICS__PORT
  value: {{ add $v.ports.metrics $index | quote }}
- name: BROADCASTD_LOG__FORMAT
  value: json
- name: BROADCASTD_DRAIN_TIMEOUT
  value: {{ $v.drainTimeout | quote }}
{{- if gt (int $v.processesPerPod) 1 }}
- name: BROADCASTD_WS__REUSE_PORT
  value: "true"
- name: BROADCASTD_CONTROL__UNIX_PATH
  value: {{ printf "/run/broadcastd/control-%d.sock" (int $index) }}
{{- end }}
- name: BROADCASTD_BROKER__TYPE
  value: {{ $v.engine }}
{{- if eq $v.engine "redis" }}
{{- if $v.redis.existingSecret }}
- name: BROADCASTD_BROKER__REDIS__URL
  valueFrom:
    secretKeyRef:
      name: {{ $v.redis.existingSecret }}
      key: {{ $v.redis.existingSecretKey }}
{{- else if $v.redis.url }}
- name: BROADCASTD_BROKER__REDIS__URL
  value: {{ $v.redis.url | quote }}
{{- end }}
{{- if $v.redis.shards }}
- name: BROADCASTD_BROKER__REDIS__SHARDS
  value: {{ toJson $v.redis.shards | quote }}
{{- end }}
{{- end }}
{{- with $v.auth }}
{{- if .existingSecret }}
{{- if .hmacSecretKey }}
- name: BROADCASTD_AUTH__HMAC_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .hmacSecretKey }}
      optional: true
{{- end }}
{{- if .hmacPreviousSecretKey }}
- name: BROADCASTD_AUTH__HMAC_PREVIOUS_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .hmacPreviousSecretKey }}
      optional: true
{{- end }}
{{- if .publicKeyKey }}
- name: BROADCASTD_AUTH__PUBLIC_KEY_FILE
  value: /etc/broadcastd/auth/public-key.pem
{{- end }}
{{- end }}
{{- if .jwksUrl }}
- name: BROADCASTD_AUTH__JWKS_URL
  value: {{ .jwksUrl | quote }}
{{- end }}
{{- if .audience }}
- name: BROADCASTD_AUTH__AUDIENCE
  value: {{ .audience | quote }}
{{- end }}
{{- if .issuer }}
- name: BROADCASTD_AUTH__ISSUER
  value: {{ .issuer | quote }}
{{- end }}
{{- end }}
{{- if $v.namespaces }}
- name: BROADCASTD_NAMESPACES
  value: {{ toJson $v.namespaces | quote }}
{{- end }}
{{- range $name, $value := $v.config }}
- name: {{ printf "BROADCASTD_%s" ($name | replace "." "__" | upper) }}
  value: {{ if kindIs "string" $value }}{{ $value | quote }}{{ else }}{{ toJson $value | quote }}{{ end }}
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}
