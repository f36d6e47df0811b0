{{- define "lifl.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "lifl.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "lifl.labels" -}}
{{ include "lifl.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "lifl.image" -}}
{{- $tag := .Values.image.tag | default (ternary (printf "%s-ray" .Chart.AppVersion) .Chart.AppVersion (eq .Values.runtime "ray")) -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{/* /dev/shm of a pod: LIFL's slots + accumulators and results (+ Ray's object store), MiB */}}
{{- define "lifl.shmMb" -}}
{{- add .root.Values.shm.budgetMb .root.Values.shm.resultsMb (.objectStoreMb | default 0) -}}
{{- end -}}

{{- define "lifl.authSecret" -}}
{{- if .Values.auth.existingSecret -}}
{{- .Values.auth.existingSecret -}}
{{- else if or .Values.auth.tokens .Values.auth.adminToken -}}
{{- printf "%s-auth" (include "lifl.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The TOML file `lifl serve --config config/lifl.toml` reads (keys: lifl.config.ServerConfig).
     Containers see the node's cores in os.cpu_count(), not their limit, so the functions are
     sized here from the pods' CPUs unless .Values.config says otherwise. */}}
{{- define "lifl.configToml" -}}
{{- $cpus := int .Values.resources.cpu -}}
{{- if eq .Values.runtime "ray" -}}
{{- $cpus = int .Values.ray.head.rayCpus -}}
{{- range .Values.ray.workerGroups }}{{ $cpus = add $cpus (mul .replicas .rayCpus) }}{{ end -}}
{{- end -}}
{{- $derived := dict "workers" $cpus "leaves" (max 1 (sub $cpus 1)) -}}
{{- if eq .Values.runtime "local" }}{{ $_ := set $derived "fold_cores" (max 1 (sub $cpus 1)) }}{{ end -}}
{{- if not .Values.tls.enabled }}{{ $_ := set $derived "insecure" true }}{{ end -}}{{/* plaintext off loopback: say so */}}
{{- $cfg := merge (deepCopy .Values.config) $derived -}}
[server]
host = "0.0.0.0"
port = 50051
metrics_port = {{ ternary .Values.metrics.port -1 .Values.metrics.enabled }}
shm_budget_mb = {{ .Values.shm.budgetMb }}
runtime = {{ .Values.runtime | quote }}
{{- if eq .Values.runtime "ray" }}
ray_address = "auto"
node_gateway_port = {{ .Values.ray.nodeGatewayPort }}
{{- end }}
{{- if .Values.tls.enabled }}
tls_cert = "/srv/lifl/tls/tls.crt"
tls_key = "/srv/lifl/tls/tls.key"
{{- end }}
{{- if .Values.tls.clientCASecret }}
tls_client_ca = "/srv/lifl/client-ca/ca.crt"
tls_operators = [{{ range $i, $o := .Values.tls.operators }}{{ if $i }}, {{ end }}{{ $o | quote }}{{ end }}]
{{- end }}
{{- if .Values.auth.tokenKeySecret }}
token_key = "/srv/lifl/token-key/lifl.pub"
{{- end }}
{{- if .Values.auth.revokedConfigMap }}
token_revoked = "/srv/lifl/revoked/revoked.txt"
{{- end }}
{{- range $k, $v := $cfg }}
{{ $k }} = {{ if kindIs "string" $v }}{{ $v | quote }}{{ else }}{{ $v }}{{ end }}
{{- end }}
{{- end -}}

{{/* Probes of the serving container: gRPC health (grpc.health.v1); with TLS a TCP check, since
     the kubelet's gRPC probe speaks plaintext only. */}}
{{- define "lifl.probes" -}}
{{- $check := ternary (dict "tcpSocket" (dict "port" "grpc")) (dict "grpc" (dict "port" 50051)) .root.Values.tls.enabled -}}
startupProbe:
  {{- toYaml $check | nindent 2 }}
  periodSeconds: {{ .startPeriod }}
  failureThreshold: {{ .startFailures }}
readinessProbe:
  {{- toYaml $check | nindent 2 }}
  periodSeconds: 5
livenessProbe:
  {{- toYaml $check | nindent 2 }}
  periodSeconds: 10
  failureThreshold: 6
{{- end -}}

{{- define "lifl.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "lifl.containerSecurityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end -}}

{{- define "lifl.scheduling" -}}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* envFrom + volumeMounts/volumes shared by the serving container */}}
{{- define "lifl.envFrom" -}}
{{- with include "lifl.authSecret" . }}
envFrom:
  - secretRef:
      name: {{ . }}
{{- end }}
{{- end -}}

{{/* key material at absolute paths: the head and, on Ray, every worker's node gateway read the
     same settings (revoked.txt is a ConfigMap directory, not a subPath, so edits reach the pod) */}}
{{- define "lifl.keyMounts" -}}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /srv/lifl/tls
  readOnly: true
{{- end }}
{{- if .Values.tls.clientCASecret }}
- name: client-ca
  mountPath: /srv/lifl/client-ca
  readOnly: true
{{- end }}
{{- if .Values.auth.tokenKeySecret }}
- name: token-key
  mountPath: /srv/lifl/token-key
  readOnly: true
{{- end }}
{{- if .Values.auth.revokedConfigMap }}
- name: revoked
  mountPath: /srv/lifl/revoked
  readOnly: true
{{- end }}
{{- end -}}

{{- define "lifl.keyVolumes" -}}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName }}
{{- end }}
{{- if .Values.tls.clientCASecret }}
- name: client-ca
  secret:
    secretName: {{ .Values.tls.clientCASecret }}
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- if .Values.auth.tokenKeySecret }}
- name: token-key
  secret:
    secretName: {{ .Values.auth.tokenKeySecret }}
    items:
      - key: lifl.pub
        path: lifl.pub
{{- end }}
{{- if .Values.auth.revokedConfigMap }}
- name: revoked
  configMap:
    name: {{ .Values.auth.revokedConfigMap }}
    items:
      - key: revoked.txt
        path: revoked.txt
{{- end }}
{{- end -}}

{{- define "lifl.servingMounts" -}}
- name: config
  mountPath: /srv/lifl/config
  readOnly: true
{{- include "lifl.keyMounts" . | nindent 0 }}
- name: dshm
  mountPath: /dev/shm
- name: tmp
  mountPath: /tmp
{{- end -}}

{{- define "lifl.servingVolumes" -}}
- name: config
  configMap:
    name: {{ include "lifl.fullname" .root }}-config
{{- include "lifl.keyVolumes" .root | nindent 0 }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmMb }}Mi
- name: tmp
  emptyDir:
    sizeLimit: {{ .tmp }}
{{- end -}}

{{- define "lifl.ports" -}}
- name: grpc
  containerPort: 50051
{{- if .Values.metrics.enabled }}
- name: metrics
  containerPort: {{ .Values.metrics.port }}
{{- end }}
{{- end -}}
