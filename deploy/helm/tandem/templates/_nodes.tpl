{{/*
A StatefulSet of prefill stages or decode groups, with its headless Service
and disruption budget. Pass (dict "root" $ "component" "prefill"|"decode"
"group" G "replicas" N "nodes" NAMES "port" QUIC-PORT "threads" T
"resources" R "gpus" GPUS-PER-POD).
*/}}
{{- define "tandem.nodeSet" -}}
{{- $root := .root -}}
{{- $fn := include "tandem.fullname" $root -}}
{{- $name := printf "%s-%s" $fn .group -}}
{{- $sel := dict "root" $root "component" .component "group" .group -}}
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: {{ $name }}
  labels: {{- include "tandem.labels" (dict "root" $root "component" .component) | nindent 4 }}
spec:
  serviceName: {{ $name }}
  replicas: {{ .replicas }}
  podManagementPolicy: Parallel
  selector:
    matchLabels: {{- include "tandem.selector" $sel | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "tandem.labels" (dict "root" $root "component" .component) | nindent 8 }}
        tandem.dev/group: {{ .group }}
      annotations:
        checksum/cluster: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
    spec:
      terminationGracePeriodSeconds: 30
      {{- include "tandem.podCommon" $root | nindent 6 }}
      {{- include "tandem.fetchModel" $root | nindent 6 }}
      containers:
        - name: {{ .component }}
          image: {{ include "tandem.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          # The node's name is the pod's host name.
          command: ["/usr/local/lib/tandem/tandem-{{ .component }}"]
          env:
            {{- include "tandem.env" $root | nindent 12 }}
            - { name: TANDEM_HEALTH_ADDR, value: "0.0.0.0:9100" }
            - { name: TANDEM_THREADS, value: {{ .threads | quote }} }
          ports:
            - { name: quic, containerPort: {{ .port }}, protocol: UDP }
            - { name: health, containerPort: 9100, protocol: TCP }
          {{- include "tandem.probes" (dict "root" $root "port" "health") | nindent 10 }}
          resources:
            {{- $res := deepCopy .resources }}
            {{- if $root.Values.gpu.enabled }}
            {{- $_ := set $res "limits" (merge (dict $root.Values.gpu.resource .gpus) ($res.limits | default dict)) }}
            {{- end }}
            {{- toYaml $res | nindent 12 }}
          securityContext: {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts: {{- include "tandem.mounts" $root | nindent 12 }}
      volumes:
        {{- include "tandem.volumes" (dict "root" $root "certs" (include "tandem.certs" (dict "root" $root "group" .group "nodes" .nodes))) | nindent 8 }}
---
# Headless: gives each pod the DNS name POD.{{ $name }} the cluster file uses.
apiVersion: v1
kind: Service
metadata:
  name: {{ $name }}
  labels: {{- include "tandem.labels" (dict "root" $root "component" .component) | nindent 4 }}
spec:
  clusterIP: None
  publishNotReadyAddresses: true
  selector: {{- include "tandem.selector" $sel | nindent 4 }}
  ports:
    - { name: quic, port: {{ .port }}, protocol: UDP }
    - { name: health, port: 9100, protocol: TCP }
{{- if $root.Values.podDisruptionBudget.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ $name }}
  labels: {{- include "tandem.labels" (dict "root" $root "component" .component) | nindent 4 }}
spec:
  maxUnavailable: {{ $root.Values.podDisruptionBudget.maxUnavailable }}
  selector:
    matchLabels: {{- include "tandem.selector" $sel | nindent 6 }}
{{- end }}
{{- end -}}
