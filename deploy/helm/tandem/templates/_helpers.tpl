{{/* The release's base name. */}}
{{- define "tandem.fullname" -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object; pass (dict "root" $ "component" "decode"). */}}
{{- define "tandem.labels" -}}
app.kubernetes.io/name: tandem
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: tandem
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end -}}

{{/* What selects a group's pods; pass (dict "root" $ "component" C "group" G). */}}
{{- define "tandem.selector" -}}
app.kubernetes.io/name: tandem
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
tandem.dev/group: {{ .group }}
{{- end -}}

{{- define "tandem.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Whether the model volume is filled by an init container. */}}
{{- define "tandem.fetch" -}}
{{- if and (not .Values.model.path) (not .Values.model.volume.readOnly) }}true{{ end -}}
{{- end -}}

{{/* The model volume (mounted at /var/lib/tandem, TANDEM_HOME). */}}
{{- define "tandem.modelVolume" -}}
- name: model
{{- if .Values.model.volume.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.volume.existingClaim }}
    readOnly: {{ .Values.model.volume.readOnly }}
{{- else if .Values.model.volume.hostPath }}
  hostPath:
    path: {{ .Values.model.volume.hostPath }}
    type: Directory
{{- else if .Values.model.volume.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "tandem.fullname" . }}-model
{{- else }}
  emptyDir: {}
{{- end }}
{{- end -}}

{{/* Volumes every pod mounts; pass (dict "root" $ "certs" VOLUME-SOURCE-YAML). */}}
{{- define "tandem.volumes" -}}
{{- $root := .root -}}
- name: config
  configMap:
    name: {{ include "tandem.fullname" $root }}-cluster
- name: tmp
  emptyDir: {}
{{ include "tandem.modelVolume" $root }}
- name: certs
{{ .certs | indent 2 }}
{{- end -}}

{{- define "tandem.mounts" -}}
- { name: config, mountPath: /etc/tandem/cluster.toml, subPath: cluster.toml, readOnly: true }
- { name: certs, mountPath: /etc/tandem/certs, readOnly: true }
- { name: model, mountPath: /var/lib/tandem, readOnly: {{ .Values.model.volume.readOnly }} }
- { name: tmp, mountPath: /tmp }
{{- end -}}

{{/* The certificate volume of a group's nodes; pass (dict "root" $ "group" G "nodes" LIST). */}}
{{- define "tandem.certs" -}}
{{- $root := .root -}}
{{- if $root.Values.certs.certManager.enabled -}}
projected:
  defaultMode: 0400
  sources:
{{- range $i, $n := .nodes }}
    - secret:
        name: {{ include "tandem.fullname" $root }}-cert-{{ $n }}
        items:
          - { key: tls.crt, path: {{ $n }}.pem }
          - { key: tls.key, path: {{ $n }}.key }
{{- if eq $i 0 }}
          - { key: ca.crt, path: ca.pem }
{{- end }}
{{- end }}
{{- else -}}
secret:
  secretName: {{ $root.Values.certs.secretPrefix }}-{{ .group }}
  defaultMode: 0400
{{- end -}}
{{- end -}}

{{/* Environment every process gets. */}}
{{- define "tandem.env" -}}
- { name: TANDEM_CONFIG, value: /etc/tandem/cluster.toml }
- { name: TANDEM_HOME, value: /var/lib/tandem }
- { name: RUST_LOG, value: {{ .Values.logs.level | quote }} }
- { name: TANDEM_LOG, value: {{ .Values.logs.level | quote }} }
- { name: TANDEM_LOG_FORMAT, value: {{ .Values.logs.format | quote }} }
{{- with .Values.otlp.endpoint }}
- { name: OTEL_EXPORTER_OTLP_ENDPOINT, value: {{ . | quote }} }
{{- end }}
{{- end -}}

{{/* The init container that fetches the default model when it is missing. */}}
{{- define "tandem.fetchModel" -}}
{{- if include "tandem.fetch" . }}
initContainers:
  - name: fetch-model
    image: {{ include "tandem.image" . }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: ["tandem", "fetch-model"]
    env:
      - { name: TANDEM_HOME, value: /var/lib/tandem }
      - { name: HOME, value: /tmp }
    securityContext: {{- toYaml .Values.securityContext | nindent 6 }}
    volumeMounts:
      - { name: model, mountPath: /var/lib/tandem }
      - { name: tmp, mountPath: /tmp }
{{- end }}
{{- end -}}

{{/* Scheduling and security shared by every pod spec. */}}
{{- define "tandem.podCommon" -}}
securityContext: {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Startup, readiness and liveness probes on a named port. */}}
{{- define "tandem.probes" -}}
{{- $port := .port -}}
startupProbe:   # the model loads before the port answers
  httpGet: { path: /live, port: {{ $port }} }
  periodSeconds: {{ .root.Values.startupProbe.periodSeconds }}
  failureThreshold: {{ .root.Values.startupProbe.failureThreshold }}
readinessProbe:   # linked: the gateway to a decode group with a pipeline, a node to the gateway
  httpGet: { path: /health, port: {{ $port }} }
  periodSeconds: 2
livenessProbe:    # the process serves (a lost peer is not a reason to restart)
  httpGet: { path: /live, port: {{ $port }} }
  periodSeconds: 10
  failureThreshold: 3
{{- end -}}
