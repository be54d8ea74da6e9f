{{/*
Names, labels and the few values computed from several settings (Redis address, key names,
termination grace). Every template takes them from here so they cannot drift apart.
*/}}

{{- define "agentq.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "agentq.fullname" -}}
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

{{- define "agentq.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "agentq.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "agentq.labels" -}}
helm.sh/chart: {{ include "agentq.chart" . }}
app.kubernetes.io/name: {{ include "agentq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: agentq
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: call with (dict "ctx" $ "component" "api"). */}}
{{- define "agentq.selectorLabels" -}}
app.kubernetes.io/name: {{ include "agentq.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "agentq.componentLabels" -}}
{{ include "agentq.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "agentq.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "agentq.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The agentq image: repository:tag, or repository@digest when a digest is given. */}}
{{- define "agentq.image" -}}
{{- $img := .Values.image }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) }}
{{- end }}
{{- end }}

{{- define "agentq.redisImage" -}}
{{- $img := .Values.redis.image }}
{{- if $img.digest }}
{{- printf "%s:%s@%s" $img.repository $img.tag $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository $img.tag }}
{{- end }}
{{- end }}

{{/*
Redis key names, exactly as common builds them: <prefix>:{<queue>}:<name>, for config.queue
or the "queue" given. The braces are a Redis Cluster hash tag, so every key of one queue lives in one
slot.
*/}}
{{- define "agentq.key" -}}
{{- printf "%s:{%s}:%s" .ctx.Values.config.keyPrefix (default .ctx.Values.config.queue (get . "queue")) .name }}
{{- end }}

{{/* ---------------------------------------------------------------- Redis connection ---- */}}

{{- define "agentq.redis.fullname" -}}
{{- printf "%s-redis" (include "agentq.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
"true" in cluster mode (externalRedis.cluster.enabled): api and worker get REDIS_CLUSTER_NODES
instead of REDIS_URL, and KEDA's triggers are of type redis-cluster. Empty otherwise. Cluster mode
is for an external Redis Cluster only: with the in-chart single Redis (redis.enabled) it fails.
*/}}
{{- define "agentq.redis.cluster" -}}
{{- $c := (.Values.externalRedis.cluster | default dict) }}
{{- if $c.enabled }}
{{- if .Values.redis.enabled }}
{{- fail "externalRedis.cluster.enabled=true and redis.enabled=true are mutually exclusive: the in-chart Redis is one server, not a cluster. For an external Redis Cluster set redis.enabled=false (and externalRedis.cluster.nodes); for the in-chart Redis set externalRedis.cluster.enabled=false" }}
{{- end }}
{{- if .Values.externalRedis.url }}
{{- fail "externalRedis.cluster.enabled=true: leave externalRedis.url empty (cluster mode reaches Redis through externalRedis.cluster.nodes; the pods would ignore REDIS_URL)" }}
{{- end }}
{{- $nodes := $c.nodes | default list }}
{{- if not $nodes }}
{{- fail "externalRedis.cluster.enabled=true needs externalRedis.cluster.nodes: the seed nodes as host:port (1 to 64)" }}
{{- end }}
{{- if gt (len $nodes) 64 }}
{{- fail (printf "externalRedis.cluster.nodes lists %d seeds; agentq takes at most 64 (it learns the other nodes from the cluster)" (len $nodes)) }}
{{- end }}
{{- if ne (len (uniq $nodes)) (len $nodes) }}
{{- fail "externalRedis.cluster.nodes lists a seed twice" }}
{{- end }}
{{- range $nodes }}
{{- if not (regexMatch "^[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?:[0-9]{1,5}$" .) }}
{{- fail (printf "externalRedis.cluster.nodes: %q is not host:port (no scheme, user, password or database: those come from externalRedis.cluster.tls / .username and externalRedis.existingSecret)" .) }}
{{- end }}
{{- end }}
{{- print "true" }}
{{- end }}
{{- end }}

{{/* The seed nodes of the external Redis Cluster as host:port, comma-separated (KEDA's "addresses"). */}}
{{- define "agentq.redis.clusterAddresses" -}}
{{- join "," .Values.externalRedis.cluster.nodes }}
{{- end }}

{{/* Parsed external Redis URL (a dict from urlParse); fails on a URL that carries a password. */}}
{{- define "agentq.externalRedis.check" -}}
{{- if include "agentq.redis.cluster" . }}
{{- fail "internal: agentq.redis.address used in cluster mode (use agentq.redis.clusterAddresses)" }}
{{- end }}
{{- if not .Values.externalRedis.url }}
{{- fail "redis.enabled=false needs externalRedis.url (redis://host:6379/0 or rediss://host:6380/0)" }}
{{- end }}
{{- $u := urlParse .Values.externalRedis.url }}
{{- if not (has $u.scheme (list "redis" "rediss")) }}
{{- fail (printf "externalRedis.url must start with redis:// or rediss://, got %q" .Values.externalRedis.url) }}
{{- end }}
{{- if contains ":" (default "" $u.userinfo) }}
{{- fail "externalRedis.url must not contain a password: put it in the secret named by externalRedis.existingSecret" }}
{{- end }}
{{- end }}

{{/* host:port of Redis, reachable from any namespace (KEDA polls it from its own). */}}
{{- define "agentq.redis.address" -}}
{{- if .Values.redis.enabled }}
{{- printf "%s.%s.svc.%s:%d" (include "agentq.redis.fullname" .) (include "agentq.namespace" .) .Values.clusterDomain (int .Values.redis.port) }}
{{- else }}
{{- include "agentq.externalRedis.check" . }}
{{- $u := urlParse .Values.externalRedis.url }}
{{- if contains ":" $u.host }}
{{- $u.host }}
{{- else }}
{{- printf "%s:6379" $u.host }}
{{- end }}
{{- end }}
{{- end }}

{{/* "true" when the pods reach Redis over TLS (rediss://): the in-cluster one with redis.tls, an external rediss:// url, or externalRedis.cluster.tls. */}}
{{- define "agentq.redis.tls" -}}
{{- if .Values.redis.enabled }}{{ ternary "true" "false" (and .Values.redis.tls.enabled true) }}
{{- else if include "agentq.redis.cluster" . }}{{ ternary "true" "false" (and .Values.externalRedis.cluster.tls true) }}
{{- else if hasPrefix "rediss://" .Values.externalRedis.url }}true{{ else }}false{{ end }}
{{- end }}

{{/*
Secret and key of the CA bundle the pods (AGENTQ_REDIS_CA_FILE) and KEDA verify Redis' certificate
against: the in-cluster Redis' TLS Secret (ca.crt), or externalRedis.tls.caSecret. Empty name = the
system roots (or no TLS).
*/}}
{{- define "agentq.redis.caSecret" -}}
{{- if eq (include "agentq.redis.tls" .) "true" }}
{{- if .Values.redis.enabled }}{{ .Values.redis.tls.existingSecret }}{{ else }}{{ .Values.externalRedis.tls.caSecret }}{{ end }}
{{- end }}
{{- end }}

{{- define "agentq.redis.caKey" -}}
{{- if .Values.redis.enabled }}ca.crt{{ else }}{{ .Values.externalRedis.tls.caKey }}{{ end }}
{{- end }}

{{/* Where api and worker find the CA bundle (a Secret volume). */}}
{{- define "agentq.redis.caDir" -}}
/etc/agentq/redis-ca
{{- end }}

{{/* The CA bundle's volumeMount and volume for api and worker: call with (dict "ctx" $ "part" "mount"|"volume"). */}}
{{- define "agentq.redis.caVolume" -}}
{{- $ctx := .ctx }}
{{- with include "agentq.redis.caSecret" $ctx }}
{{- if eq $.part "mount" }}
- name: redis-ca
  mountPath: {{ include "agentq.redis.caDir" $ctx }}
  readOnly: true
{{- else }}
- name: redis-ca
  secret:
    secretName: {{ . }}
    defaultMode: 0444
    items:
      - key: {{ include "agentq.redis.caKey" $ctx }}
        path: ca.crt
{{- end }}
{{- end }}
{{- end }}

{{- define "agentq.redis.database" -}}
{{- if or .Values.redis.enabled (include "agentq.redis.cluster" .) }}0{{ else }}{{ $u := urlParse .Values.externalRedis.url }}{{ default "0" (trimPrefix "/" $u.path) }}{{ end }}
{{- end }}

{{/* The user of externalRedis.url or externalRedis.cluster.username (empty for the in-cluster Redis: its default user). */}}
{{- define "agentq.redis.username" -}}
{{- if include "agentq.redis.cluster" . }}{{ .Values.externalRedis.cluster.username }}
{{- else if not .Values.redis.enabled }}{{ $u := urlParse .Values.externalRedis.url }}{{ default "" $u.userinfo }}{{ end }}
{{- end }}

{{/* ---------------------------------------------------------------- Redis ACL users ---- */}}

{{- define "agentq.redisAcl.name" -}}
{{- printf "%s-redis-acl" (include "agentq.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Secret with the ACL users' passwords (keys api-password, worker-password, keda-password). */}}
{{- define "agentq.redisAcl.secretName" -}}
{{- default (include "agentq.redisAcl.name" .) .Values.redisAcl.existingSecret }}
{{- end }}

{{/* The ACL user of a component: call with (dict "ctx" $ "component" "api"|"worker"|"keda"). */}}
{{- define "agentq.redisAcl.user" -}}
{{- get .ctx.Values.redisAcl.users .component }}
{{- end }}

{{/*
What values.schema.json cannot say about the ACL users: the key prefix goes into glob patterns, so
it must not hold a glob character; the three names must differ.
*/}}
{{- define "agentq.redisAcl.check" -}}
{{- if .Values.redisAcl.enabled }}
{{- if regexMatch "[*?\\[\\]\\\\]" .Values.config.keyPrefix }}
{{- fail (printf "redisAcl.enabled: config.keyPrefix %q holds a glob character (* ? [ ] \\); the ACL key patterns are globs over it" .Values.config.keyPrefix) }}
{{- end }}
{{- $u := .Values.redisAcl.users }}
{{- if ne (len (uniq (list $u.api $u.worker $u.keda))) 3 }}
{{- fail "redisAcl.users: api, worker and keda need three different user names" }}
{{- end }}
{{- if has "default" (list $u.api $u.worker $u.keda) }}
{{- fail "redisAcl.users: \"default\" is Redis' own user (the admin); name agentq's users differently" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The ACL users of files/redis-users.acl as Redis reads them: comment lines dropped, continuation
lines (starting with spaces) joined, ${PREFIX}, the user names and ${SELECT} substituted, and KEDA's
user only when keda.enabled. tests/tests/acl.rs renders the same file the same way. Call with
(dict "ctx" $ "hashes" <dict API/WORKER/KEDA -> SHA-256 hex of the password>); without "hashes" the
${*_PASSWORD_SHA256} placeholders stay, for the in-cluster Redis to fill in from the password
Secret when it starts (templates/redis-statefulset.yaml).
*/}}
{{- define "agentq.redisAcl.render" -}}
{{- $ctx := .ctx }}
{{- $v := $ctx.Values }}
{{- $joined := "" }}
{{- range splitList "\n" ($ctx.Files.Get "files/redis-users.acl") }}
{{- if or (hasPrefix "#" .) (eq (trim .) "") }}
{{- else if regexMatch "^[ \t]" . }}
{{- $joined = printf "%s %s" $joined (trim .) }}
{{- else }}
{{- $joined = printf "%s\n%s" $joined (trim .) }}
{{- end }}
{{- end }}
{{- $select := ternary "" "+select" (eq (include "agentq.redis.database" $ctx) "0") }}
{{- $out := $joined | replace "${PREFIX}" $v.config.keyPrefix | replace "${SELECT}" $select }}
{{- $out = $out | replace "${API_USER}" $v.redisAcl.users.api | replace "${WORKER_USER}" $v.redisAcl.users.worker | replace "${KEDA_USER}" $v.redisAcl.users.keda }}
{{- with .hashes }}
{{- $out = $out | replace "${API_PASSWORD_SHA256}" .API | replace "${WORKER_PASSWORD_SHA256}" .WORKER | replace "${KEDA_PASSWORD_SHA256}" .KEDA }}
{{- end }}
{{- range splitList "\n" (trim $out) }}
{{- if or $v.keda.enabled (not (hasPrefix (printf "user %s " $v.redisAcl.users.keda) .)) }}
{{ regexReplaceAll " +" . " " }}
{{- end }}
{{- end }}
{{- end }}

{{/* Name and key of the Secret that holds the Redis password; empty name = no password. */}}
{{- define "agentq.redis.secretName" -}}
{{- if .Values.redis.enabled }}
{{- default (printf "%s-redis" (include "agentq.fullname" .)) .Values.redis.auth.existingSecret }}
{{- else }}
{{- .Values.externalRedis.existingSecret }}
{{- end }}
{{- end }}

{{- define "agentq.redis.secretKey" -}}
{{- if .Values.redis.enabled }}
{{- .Values.redis.auth.existingSecretPasswordKey }}
{{- else }}
{{- .Values.externalRedis.existingSecretPasswordKey }}
{{- end }}
{{- end }}

{{/*
Key of the same Secret that holds the password percent-encoded for REDIS_URL. The chart's own Secret
carries it as <passwordKey>-urlencoded; an existing Secret names it with
existingSecretUrlEncodedPasswordKey, or falls back to the plain key (then the password must be URL-safe).
*/}}
{{- define "agentq.redis.urlSecretKey" -}}
{{- if and .Values.redis.enabled (not .Values.redis.auth.existingSecret) }}
{{- printf "%s-urlencoded" .Values.redis.auth.existingSecretPasswordKey }}
{{- else if .Values.redis.enabled }}
{{- default .Values.redis.auth.existingSecretPasswordKey .Values.redis.auth.existingSecretUrlEncodedPasswordKey }}
{{- else }}
{{- default .Values.externalRedis.existingSecretPasswordKey .Values.externalRedis.existingSecretUrlEncodedPasswordKey }}
{{- end }}
{{- end }}

{{/*
Percent-encoding of a string for the userinfo of a URL: every byte but A-Z a-z 0-9 - . _ ~ becomes
%XX. urlquery is Go's url.QueryEscape, which writes a space as "+"; a literal "+" comes out as %2B,
so every "+" left is a space.
*/}}
{{- define "agentq.urlencode" -}}
{{- urlquery . | replace "+" "%20" }}
{{- end }}

{{/*
REDIS_URL as the pod builds it: the kubelet substitutes $(REDIS_PASSWORD_URLENCODED), an env var
defined before it from the Secret's percent-encoded key, so the password never appears in a
ConfigMap or in the manifest, and characters such as @ : / % # ? in it cannot break the URL.
With redisAcl.enabled the user is the component's ACL user and the password its own (generated
passwords are URL-safe, an existing Secret's must be). Call with (dict "ctx" $ "component" "api"|"worker").
*/}}
{{- define "agentq.redis.url" -}}
{{- $ctx := .ctx }}
{{- printf "%s%s/%s" (include "agentq.redis.urlPrefix" .) (include "agentq.redis.address" $ctx) (include "agentq.redis.database" $ctx) }}
{{- end }}

{{/*
"scheme://[user[:$(REDIS_PASSWORD_URLENCODED)]@]" of REDIS_URL and of every REDIS_CLUSTER_NODES seed.
Call with (dict "ctx" $ "component" "api"|"worker").
*/}}
{{- define "agentq.redis.urlPrefix" -}}
{{- $ctx := .ctx }}
{{- $scheme := ternary "rediss" "redis" (eq (include "agentq.redis.tls" $ctx) "true") }}
{{- $user := include "agentq.redis.username" $ctx }}
{{- $auth := "" }}
{{- if $ctx.Values.redisAcl.enabled }}
{{- $auth = printf "%s:$(REDIS_PASSWORD_URLENCODED)@" (include "agentq.redisAcl.user" .) }}
{{- else if include "agentq.redis.secretName" $ctx }}
{{- $auth = printf "%s:$(REDIS_PASSWORD_URLENCODED)@" $user }}
{{- else if $user }}
{{- $auth = printf "%s@" $user }}
{{- end }}
{{- printf "%s://%s" $scheme $auth }}
{{- end }}

{{/*
REDIS_CLUSTER_NODES (cluster mode): one seed URL per externalRedis.cluster.nodes entry, each built
as REDIS_URL is (the same scheme, user and $(REDIS_PASSWORD_URLENCODED), which the kubelet
substitutes in every seed), without a database number: a cluster has only database 0.
*/}}
{{- define "agentq.redis.clusterNodes" -}}
{{- $prefix := include "agentq.redis.urlPrefix" . }}
{{- $seeds := list }}
{{- range .ctx.Values.externalRedis.cluster.nodes }}
{{- $seeds = append $seeds (printf "%s%s" $prefix .) }}
{{- end }}
{{- join "," $seeds }}
{{- end }}

{{/*
Env entries api and worker need: the percent-encoded Redis password, then REDIS_URL (in cluster
mode REDIS_CLUSTER_NODES instead), and the CA bundle's path when there is one. Call with
(dict "ctx" $ "component" "api"|"worker").
*/}}
{{- define "agentq.redis.env" -}}
{{- $ctx := .ctx }}
{{- if $ctx.Values.redisAcl.enabled }}
- name: REDIS_PASSWORD_URLENCODED
  valueFrom:
    secretKeyRef:
      name: {{ include "agentq.redisAcl.secretName" $ctx }}
      key: {{ printf "%s-password" .component }}
{{- else if include "agentq.redis.secretName" $ctx }}
- name: REDIS_PASSWORD_URLENCODED
  valueFrom:
    secretKeyRef:
      name: {{ include "agentq.redis.secretName" $ctx }}
      key: {{ include "agentq.redis.urlSecretKey" $ctx }}
{{- end }}
{{- if include "agentq.redis.cluster" $ctx }}
# Cluster mode: the seeds of the external Redis Cluster (REDIS_URL is not set; the pods would ignore it).
- name: REDIS_CLUSTER_NODES
  value: {{ include "agentq.redis.clusterNodes" . | quote }}
{{- else }}
- name: REDIS_URL
  value: {{ include "agentq.redis.url" . | quote }}
{{- end }}
{{- if include "agentq.redis.caSecret" $ctx }}
- name: AGENTQ_REDIS_CA_FILE
  value: {{ printf "%s/ca.crt" (include "agentq.redis.caDir" $ctx) | quote }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- tokens ---- */}}

{{/*
The api's AGENTQ_AUTH and, with auth on, AGENTQ_ADMIN_TOKEN from auth.existingSecret (never a
value, never in the worker). Fails the render when auth is on without that Secret.
*/}}
{{- define "agentq.auth.env" -}}
{{- if .Values.auth.enabled }}
{{- if not .Values.auth.existingSecret }}
{{- fail "auth.enabled (the default) needs auth.existingSecret: a Secret holding the admin token (key auth.adminTokenKey, 16+ characters), e.g. kubectl create secret generic agentq-admin --from-literal=admin-token=$(openssl rand -hex 32); or set auth.enabled=false for an open api on a trusted network" }}
{{- end }}
- name: AGENTQ_AUTH
  value: "on"
- name: AGENTQ_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.auth.existingSecret }}
      key: {{ .Values.auth.adminTokenKey }}
{{- else }}
- name: AGENTQ_AUTH
  value: "off"
{{- end }}
{{- end }}

{{/*
Settings of security the chart sets itself (auth.*, redisAcl.*, redis.tls / externalRedis.tls):
no extraEnv may set them behind its back, and the admin token never reaches the worker or a
ConfigMap. Also: redis.tls needs its Secret.
*/}}
{{- define "agentq.security.check" -}}
{{- $owned := list "AGENTQ_AUTH" "AGENTQ_ADMIN_TOKEN" "AGENTQ_METRICS_TOKEN" "AGENTQ_REDIS_CA_FILE" }}
{{- range $name := $owned }}
{{- if hasKey $.Values.config.extraEnv $name }}
{{- fail (printf "config.extraEnv: %s is not a ConfigMap setting (it would reach the worker too); the chart sets the api's from auth.* and the CA from redis.tls / externalRedis.tls" $name) }}
{{- end }}
{{- end }}
{{- range $.Values.api.extraEnv }}
{{- if has .name (list "AGENTQ_AUTH" "AGENTQ_ADMIN_TOKEN" "AGENTQ_REDIS_CA_FILE") }}
{{- fail (printf "api.extraEnv: %s is set by the chart (auth.*, redis.tls / externalRedis.tls)" .name) }}
{{- end }}
{{- end }}
{{- range $.Values.worker.extraEnv }}
{{- if has .name (list "AGENTQ_ADMIN_TOKEN" "AGENTQ_METRICS_TOKEN") }}
{{- fail (printf "worker.extraEnv: %s is the api's secret; the worker never gets it" .name) }}
{{- end }}
{{- if eq .name "AGENTQ_REDIS_CA_FILE" }}
{{- fail "worker.extraEnv: AGENTQ_REDIS_CA_FILE is set by the chart (redis.tls / externalRedis.tls)" }}
{{- end }}
{{- end }}
{{- if and .Values.redis.enabled .Values.redis.tls.enabled (not .Values.redis.tls.existingSecret) }}
{{- fail "redis.tls.enabled needs redis.tls.existingSecret: a kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt for the Redis service's name" }}
{{- end }}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.tls.caSecret (ne (include "agentq.redis.tls" .) "true") }}
{{- fail (ternary "externalRedis.tls.caSecret is set, but externalRedis.cluster.tls is false (the seeds are redis://, not rediss://)" "externalRedis.tls.caSecret is set, but externalRedis.url is not rediss://" (not (not (include "agentq.redis.cluster" .)))) }}
{{- end }}
{{- include "agentq.redisAcl.check" . }}
{{- $_ := include "agentq.redis.cluster" . }}
{{- end }}

{{- define "agentq.llm.secretName" -}}
{{- default (printf "%s-llm" (include "agentq.fullname" .)) .Values.llm.existingSecret }}
{{- end }}

{{/* ---------------------------------------------------------------- upstreams ---- */}}

{{/* "true" when upstreams.config lists upstreams (AGENTQ_UPSTREAMS is set), else empty. */}}
{{- define "agentq.upstreams.enabled" -}}
{{- if (.Values.upstreams.config).upstreams }}true{{ end }}
{{- end }}

{{- define "agentq.upstreams.configMapName" -}}
{{- printf "%s-upstreams" (include "agentq.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The path AGENTQ_UPSTREAMS points at: the ConfigMap key mounted into api and worker. */}}
{{- define "agentq.upstreams.path" -}}
{{- printf "%s/upstreams.yaml" .Values.upstreams.mountPath }}
{{- end }}

{{/* "true" when an upstream reads its key from OPENAI_API_KEY (then the api gets that variable too). */}}
{{- define "agentq.upstreams.usesOpenaiKey" -}}
{{- range (.Values.upstreams.config).upstreams }}{{ if eq (default "" .api_key) "env:OPENAI_API_KEY" }}true{{ end }}{{ end }}
{{- end }}

{{/*
What values.schema.json cannot say: upstream names unique, a model served by one upstream only,
model_limits only for a model that upstream serves, AGENTQ_MODEL (llm.model) served, every
"api_key: env:VAR" variable given to the pods, and upstreams.secretEnv names unique and not
shadowing a setting the chart sets itself.
*/}}
{{- define "agentq.upstreams.check" -}}
{{- $reserved := list "OPENAI_API_KEY" "OPENAI_BASE_URL" "REDIS_URL" "REDIS_CLUSTER_NODES" "REDIS_PASSWORD_URLENCODED" "WORKER_CONCURRENCY" }}
{{- $provided := dict "OPENAI_API_KEY" "llm.apiKey / llm.existingSecret" }}
{{- range .Values.upstreams.secretEnv }}
{{- if or (has .name $reserved) (hasPrefix "AGENTQ_" .name) }}
{{- fail (printf "upstreams.secretEnv: %s is set by the chart itself; name the key's variable differently (and use it as api_key: env:<name>)" .name) }}
{{- end }}
{{- if hasKey $provided .name }}
{{- fail (printf "upstreams.secretEnv: %s is listed twice" .name) }}
{{- end }}
{{- $_ := set $provided .name (printf "upstreams.secretEnv (Secret %s, key %s)" .secretName .key) }}
{{- end }}
{{- $extra := dict }}
{{- range .Values.api.extraEnv }}{{ $_ := set $extra .name "api" }}{{ end }}
{{- $names := dict }}
{{- $models := dict }}
{{- range $u := (.Values.upstreams.config).upstreams }}
{{- if hasKey $names $u.name }}
{{- fail (printf "upstreams.config: the upstream name %q is used twice" $u.name) }}
{{- end }}
{{- $_ := set $names $u.name true }}
{{- range $m := $u.models }}
{{- if hasKey $models $m }}
{{- fail (printf "upstreams.config: model %q is served by both %q and %q; a model belongs to exactly one upstream" $m (get $models $m) $u.name) }}
{{- end }}
{{- $_ := set $models $m $u.name }}
{{- end }}
{{- range $m, $_ := $u.model_limits }}
{{- if not (has $m $u.models) }}
{{- fail (printf "upstreams.config: upstream %q has model_limits for %q, which is not in its models %v" $u.name $m $u.models) }}
{{- end }}
{{- end }}
{{- with $u.api_key }}
{{- $var := trimPrefix "env:" . }}
{{- $inExtra := false }}
{{- range $.Values.worker.extraEnv }}{{ if and (eq .name $var) (hasKey $extra $var) }}{{ $inExtra = true }}{{ end }}{{ end }}
{{- if not (or (hasKey $provided $var) $inExtra $.Values.upstreams.existingSecret) }}
{{- fail (printf "upstreams.config: upstream %q reads its key from env %s, which no pod gets: add {name: %s, secretName: <secret>, key: <key>} to upstreams.secretEnv, or set upstreams.existingSecret to a Secret with a key %s" $u.name $var $var $var) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and $models (not (hasKey $models .Values.llm.model)) }}
{{- fail (printf "llm.model %q (AGENTQ_MODEL, the model of tasks that name none) is not served by any upstream in upstreams.config; set it to one of %v" .Values.llm.model (keys $models | sortAlpha)) }}
{{- end }}
{{- end }}

{{/* envFrom entry of upstreams.existingSecret (every key an env variable), for api and worker. */}}
{{- define "agentq.upstreams.envFrom" -}}
{{- with .Values.upstreams.existingSecret }}
- secretRef:
    name: {{ . }}
{{- end }}
{{- end }}

{{/*
Env entries of the upstreams' API keys: upstreams.secretEnv, for api and worker, and for the api
OPENAI_API_KEY when an upstream names it (the worker always has it). Call with
(dict "ctx" $ "component" "api"|"worker").
*/}}
{{- define "agentq.upstreams.env" -}}
{{- $ctx := .ctx }}
{{- if and (eq .component "api") (include "agentq.upstreams.usesOpenaiKey" $ctx) }}
- name: OPENAI_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "agentq.llm.secretName" $ctx }}
      key: {{ $ctx.Values.llm.existingSecretKey }}
{{- end }}
{{- range $ctx.Values.upstreams.secretEnv }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ .key }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- worker timing ---- */}}

{{/*
The worker's pod grace: its drain timeout plus a margin, so the kubelet never SIGKILLs a worker that
is still inside its drain window (the worker gives back unfinished tasks when the drain times out).
*/}}
{{- define "agentq.worker.terminationGracePeriodSeconds" -}}
{{- add (int .Values.worker.drainTimeoutSeconds) (int .Values.worker.terminationGraceMarginSeconds) }}
{{- end }}

{{/* Tasks per worker replica that KEDA aims for: keda.listLength, or the worker concurrency. */}}
{{- define "agentq.keda.listLength" -}}
{{- include "agentq.keda.listLengthFor" (dict "ctx" . "concurrency" .Values.worker.concurrency) }}
{{- end }}

{{/* The same for one worker Deployment: call with (dict "ctx" $ "concurrency" <its WORKER_CONCURRENCY>). */}}
{{- define "agentq.keda.listLengthFor" -}}
{{- if .ctx.Values.keda.listLength }}{{ int .ctx.Values.keda.listLength }}{{ else }}{{ int .concurrency }}{{ end }}
{{- end }}

{{/* ---------------------------------------------------------------- checkov skips ---- */}}

{{/*
Annotations that tell checkov which findings are accepted and why. Call with
(dict "ctx" $ "digest" <digest> "digestValue" <its values path> "secretEnv" true|false).
*/}}
{{- define "agentq.checkovSkips" -}}
{{- $n := 0 }}
{{- if not .digest }}
{{- $n = add1 $n }}
checkov.io/skip{{ $n }}: "CKV_K8S_43=image is pinned by tag; its digest is only known at release time: set {{ .digestValue }} to pin by digest"
{{- end }}
{{- if .secretEnv }}
{{- $n = add1 $n }}
checkov.io/skip{{ $n }}: "CKV_K8S_35=agentq reads its settings only from environment variables (REDIS_URL, or each seed of REDIS_CLUSTER_NODES, embeds the password via $(REDIS_PASSWORD_URLENCODED); the api's admin token); each secret is referenced with secretKeyRef, never inlined"
{{- end }}
{{- end }}

{{/* HTTP probes of one component: call with (dict "probes" .Values.api.probes "port" "http"). */}}
{{- define "agentq.httpProbes" -}}
{{- $port := .port }}
{{- range $kind := list "startup" "liveness" "readiness" }}
{{- $p := index $.probes $kind }}
{{ $kind }}Probe:
  httpGet:
    path: {{ $p.path }}
    port: {{ $port }}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: {{ $p.failureThreshold }}
{{- end }}
{{- end }}

{{/* Pod-level scheduling settings: call with a component's values. */}}
{{- define "agentq.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- Batch API ---- */}}

{{/* "true" when batch.queue names a queue other than config.queue (it gets its own workers), else empty. */}}
{{- define "agentq.batch.enabled" -}}
{{- if and .Values.batch.queue (ne .Values.batch.queue .Values.config.queue) }}true{{ end }}
{{- end }}

{{/*
The worker Deployments, as a JSON list for fromJsonArray: the main one (config.queue, worker.*,
keda.*) and, with agentq.batch.enabled, the batch queue's (batch.workers.*). Every per-Deployment
object (Deployment, ScaledObject, PDB, Service, ServiceMonitor, NetworkPolicy, alert) ranges over it.
  name       object name (<fullname>-worker, <fullname>-worker-batch)
  component  app.kubernetes.io/component of its pods, so no selector picks the other's pods
  queue      the AGENTQ_QUEUE it serves; main=false means it is set in the container env, not
             taken from the ConfigMap, and so is WORKER_CONCURRENCY
*/}}
{{- define "agentq.workers" -}}
{{- $full := include "agentq.fullname" . }}
{{- $w := .Values.worker }}
{{- $workers := list (dict "name" (printf "%s-worker" $full) "component" "worker" "main" true "queue" .Values.config.queue
  "concurrency" $w.concurrency "replicas" $w.replicas "resources" $w.resources
  "minReplicaCount" .Values.keda.minReplicaCount "maxReplicaCount" .Values.keda.maxReplicaCount
  "minValue" "keda.minReplicaCount" "maxValue" "keda.maxReplicaCount") }}
{{- if include "agentq.batch.enabled" . }}
{{- $b := .Values.batch.workers }}
{{- $workers = append $workers (dict "name" (printf "%s-worker-batch" $full | trunc 63 | trimSuffix "-") "component" "worker-batch" "main" false "queue" .Values.batch.queue
  "concurrency" $b.concurrency "replicas" $b.replicas "resources" $b.resources
  "minReplicaCount" $b.minReplicaCount "maxReplicaCount" $b.maxReplicaCount
  "minValue" "batch.workers.minReplicaCount" "maxValue" "batch.workers.maxReplicaCount") }}
{{- end }}
{{- toJson $workers }}
{{- end }}

{{/* The api's AGENTQ_QUEUES with a batch queue: config.queue, any queues config.extraEnv declares, the batch queue. */}}
{{- define "agentq.batch.apiQueues" -}}
{{- $queues := list .Values.config.queue }}
{{- range splitList "," (toString (default "" (get .Values.config.extraEnv "AGENTQ_QUEUES"))) }}
{{- with trim . }}{{ $queues = append $queues . }}{{ end }}
{{- end }}
{{- $queues = append $queues .Values.batch.queue }}
{{- join "," (uniq $queues) }}
{{- end }}

{{/*
redis.maxmemory of the in-cluster Redis in bytes, as redis-server reads it (k/m/g = 1000^n, kb/mb/gb =
1024^n, no unit = bytes); empty with an external Redis, or for 0 (no limit).
*/}}
{{- define "agentq.redis.maxmemoryBytes" -}}
{{- if .Values.redis.enabled }}
{{- $m := lower (toString .Values.redis.maxmemory) }}
{{- $n := int64 (regexFind "^[0-9]+" $m) }}
{{- $unit := trimPrefix (regexFind "^[0-9]+" $m) $m }}
{{- $mult := get (dict "" 1 "b" 1 "k" 1000 "kb" 1024 "m" 1000000 "mb" 1048576 "g" 1000000000 "gb" 1073741824) $unit }}
{{- if and $n $mult }}{{ mul $n $mult }}{{ end }}
{{- end }}
{{- end }}

{{/*
Batch settings the chart sets itself, so no extraEnv may set them behind its back (the api's env
entries would silently win over config.extraEnv, and a second api.extraEnv entry over them).
*/}}
{{- define "agentq.batch.check" -}}
{{- $owned := list "AGENTQ_BATCH_QUEUE" "AGENTQ_FILE_MAX_BYTES" "AGENTQ_BATCH_MAX_REQUESTS" "AGENTQ_FILE_TTL_SECS" "AGENTQ_FILES_MAX_TOTAL_BYTES" "AGENTQ_BATCHES_MAX" }}
{{- range $name := $owned }}
{{- if hasKey $.Values.config.extraEnv $name }}
{{- fail (printf "config.extraEnv: %s is set by the chart from batch.* (see values.yaml, batch)" $name) }}
{{- end }}
{{- end }}
{{- $batchQueue := include "agentq.batch.enabled" $ }}
{{- range $.Values.api.extraEnv }}
{{- if or (has .name $owned) (and $batchQueue (eq .name "AGENTQ_QUEUES")) }}
{{- fail (printf "api.extraEnv: %s is set by the chart (batch.*; with batch.queue, extra queues go in config.extraEnv.AGENTQ_QUEUES)" .name) }}
{{- end }}
{{- end }}
{{- end }}
