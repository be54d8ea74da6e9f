{{/*
One worker Deployment and its ScaledObject, for the main queue and for the batch queue alike. Call
with (dict "ctx" $ "w" <an entry of agentq.workers>). Everything but the name, pod labels, queue,
concurrency, replicas and resources comes from worker.* / keda.*, so both fleets run the same image,
config, secrets, probes, security context and drain.
*/}}
{{- define "agentq.worker.deployment" -}}
{{- $ctx := .ctx }}
{{- $w := .w }}
{{- $component := $w.component }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $w.name }}
  namespace: {{ include "agentq.namespace" $ctx }}
  labels:
    {{- include "agentq.componentLabels" (dict "ctx" $ctx "component" $component) | nindent 4 }}
  {{- with include "agentq.checkovSkips" (dict "ctx" $ctx "digest" $ctx.Values.image.digest "digestValue" "image.digest" "secretEnv" true) | trim }}
  annotations:
    {{- . | nindent 4 }}
  {{- end }}
spec:
  {{- if not $ctx.Values.keda.enabled }}
  replicas: {{ $w.replicas }}
  {{- end }}
  {{- /* With KEDA on, replicas is left out so `helm upgrade` never fights the HPA. */}}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "agentq.selectorLabels" (dict "ctx" $ctx "component" $component) | nindent 6 }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 25%
      maxUnavailable: 0
  template:
    metadata:
      labels:
        {{- include "agentq.selectorLabels" (dict "ctx" $ctx "component" $component) | nindent 8 }}
        {{- with $ctx.Values.worker.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        checksum/config: {{ include (print $ctx.Template.BasePath "/configmap.yaml") $ctx | sha256sum }}
        {{- if include "agentq.upstreams.enabled" $ctx }}
        checksum/upstreams: {{ include (print $ctx.Template.BasePath "/upstreams-configmap.yaml") $ctx | sha256sum }}
        {{- end }}
        {{- with $ctx.Values.worker.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "agentq.serviceAccountName" $ctx }}
      automountServiceAccountToken: false
      enableServiceLinks: false
      # = worker.drainTimeoutSeconds ({{ $ctx.Values.worker.drainTimeoutSeconds }}) + worker.terminationGraceMarginSeconds ({{ $ctx.Values.worker.terminationGraceMarginSeconds }}):
      # SIGTERM starts the drain; SIGKILL must come only after the drain has given unfinished tasks back.
      terminationGracePeriodSeconds: {{ include "agentq.worker.terminationGracePeriodSeconds" $ctx }}
      securityContext:
        {{- toYaml $ctx.Values.podSecurityContext | nindent 8 }}
      {{- with $ctx.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- include "agentq.scheduling" $ctx.Values.worker | trim | nindent 6 }}
      containers:
        - name: worker
          image: {{ include "agentq.image" $ctx }}
          imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
          command: ["/usr/local/bin/agentq-worker"]
          ports:
            - name: metrics
              containerPort: {{ $ctx.Values.worker.metricsPort }}
              protocol: TCP
          envFrom:
            - configMapRef:
                name: {{ include "agentq.fullname" $ctx }}
            {{- with include "agentq.upstreams.envFrom" $ctx | trim }}
            {{- . | nindent 12 }}
            {{- end }}
          env:
            - name: AGENTQ_LISTEN
              value: "0.0.0.0:{{ $ctx.Values.worker.metricsPort }}"
            {{- if not $w.main }}
            # This Deployment serves the batch queue: these two override the ConfigMap's.
            - name: AGENTQ_QUEUE
              value: {{ $w.queue | quote }}
            - name: WORKER_CONCURRENCY
              value: {{ int $w.concurrency | quote }}
            {{- end }}
            {{- include "agentq.redis.env" (dict "ctx" $ctx "component" "worker") | trim | nindent 12 }}
            - name: OPENAI_API_KEY
              valueFrom:
                secretKeyRef:
                  name: {{ include "agentq.llm.secretName" $ctx }}
                  key: {{ $ctx.Values.llm.existingSecretKey }}
            {{- with include "agentq.upstreams.env" (dict "ctx" $ctx "component" "worker") | trim }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- with $ctx.Values.worker.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- include "agentq.httpProbes" (dict "probes" $ctx.Values.worker.probes "port" "metrics") | trim | nindent 10 }}
          resources:
            {{- toYaml $w.resources | nindent 12 }}
          securityContext:
            {{- toYaml $ctx.Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            {{- with include "agentq.redis.caVolume" (dict "ctx" $ctx "part" "mount") | trim }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- if include "agentq.upstreams.enabled" $ctx }}
            - name: upstreams
              mountPath: {{ $ctx.Values.upstreams.mountPath }}
              readOnly: true
            {{- end }}
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: 64Mi
        {{- with include "agentq.redis.caVolume" (dict "ctx" $ctx "part" "volume") | trim }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- if include "agentq.upstreams.enabled" $ctx }}
        - name: upstreams
          configMap:
            name: {{ include "agentq.upstreams.configMapName" $ctx }}
            defaultMode: 0444
            items:
              - key: upstreams.yaml
                path: upstreams.yaml
        {{- end }}
{{- end }}

{{/*
The ScaledObject of one worker Deployment: call with (dict "ctx" $ "w" <an entry of agentq.workers>
"auth" <TriggerAuthentication name, or "">).
*/}}
{{- define "agentq.worker.scaledObject" -}}
{{- $ctx := .ctx }}
{{- $w := .w }}
{{- $k := $ctx.Values.keda }}
{{- $name := $w.name }}
{{- $ns := include "agentq.namespace" $ctx }}
{{- $listLength := include "agentq.keda.listLengthFor" (dict "ctx" $ctx "concurrency" $w.concurrency) }}
{{- if gt (int $w.minReplicaCount) (int $w.maxReplicaCount) }}
{{- fail (printf "%s (%d) must not exceed %s (%d)" $w.minValue (int $w.minReplicaCount) $w.maxValue (int $w.maxReplicaCount)) }}
{{- end }}
{{- $cluster := include "agentq.redis.cluster" $ctx }}
# Worker replicas follow ceil((pending + in-flight) / {{ $listLength }}): the redis scaler alone sees only
# the pending LIST, so a busy fleet with an empty list would be scaled down mid-task. The in-flight
# ZSET (ZCARD) closes that gap; scalingModifiers sums both into one composite metric.
{{- if $cluster }}
# Cluster mode: KEDA's redis-cluster scaler, seeded with every node of externalRedis.cluster.nodes;
# both keys carry the queue's {hash tag}, so they live in one slot, on one master.
{{- end }}
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: {{ $name }}
  namespace: {{ $ns }}
  labels:
    {{- include "agentq.componentLabels" (dict "ctx" $ctx "component" $w.component) | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ $name }}
  pollingInterval: {{ $k.pollingInterval }}
  cooldownPeriod: {{ $k.cooldownPeriod }}
  minReplicaCount: {{ $w.minReplicaCount }}
  maxReplicaCount: {{ $w.maxReplicaCount }}
  {{- if $k.fallback.enabled }}
  fallback:
    failureThreshold: {{ $k.fallback.failureThreshold }}
    replicas: {{ $k.fallback.replicas }}
  {{- end }}
  advanced:
    {{- with $k.behavior }}
    horizontalPodAutoscalerConfig:
      behavior:
        {{- toYaml . | nindent 8 }}
    {{- end }}
    scalingModifiers:
      {{- if $k.latencyTrigger.enabled }}
      formula: "(pending + inflight) * (latency > {{ $k.latencyTrigger.thresholdSeconds }} ? {{ $k.latencyTrigger.boost }} : 1)"
      {{- else }}
      formula: "pending + inflight"
      {{- end }}
      target: {{ $listLength | quote }}
      activationTarget: {{ $k.activationTarget | quote }}
      metricType: AverageValue
  triggers:
    {{- range $trigger := list (dict "name" "pending" "key" "pending") (dict "name" "inflight" "key" "active") }}
    - type: {{ ternary "redis-cluster" "redis" (not (not $cluster)) }}
      name: {{ $trigger.name }}
      metadata:
        {{- if $cluster }}
        addresses: {{ include "agentq.redis.clusterAddresses" $ctx | quote }}
        {{- else }}
        address: {{ include "agentq.redis.address" $ctx | quote }}
        {{- end }}
        listName: {{ include "agentq.key" (dict "ctx" $ctx "queue" $w.queue "name" $trigger.key) | quote }}
        listLength: {{ $listLength | quote }}
        activationListLength: "0"
        {{- if not $cluster }}
        databaseIndex: {{ include "agentq.redis.database" $ctx | quote }}
        {{- end }}
        enableTLS: {{ include "agentq.redis.tls" $ctx | quote }}
        {{- $user := ternary (include "agentq.redisAcl.user" (dict "ctx" $ctx "component" "keda")) (include "agentq.redis.username" $ctx) $ctx.Values.redisAcl.enabled }}
        {{- with $user }}
        username: {{ . | quote }}
        {{- end }}
      {{- with $.auth }}
      authenticationRef:
        name: {{ . }}
      {{- end }}
    {{- end }}
    {{- if $k.latencyTrigger.enabled }}
    - type: prometheus
      name: latency
      metadata:
        serverAddress: {{ $k.latencyTrigger.serverAddress | quote }}
        {{- $q := printf "(histogram_quantile(0.95, sum by (le) (rate(agentq_task_duration_seconds_bucket{namespace=%q,queue=%q}[5m]))) > 0) or vector(0)" $ns $w.queue }}
        query: {{ default $q $k.latencyTrigger.query | quote }}
        threshold: {{ $k.latencyTrigger.thresholdSeconds | quote }}
        # No samples yet (fresh install): count as 0 s rather than failing the composite metric.
        ignoreNullValues: "true"
    {{- end }}
{{- end }}
