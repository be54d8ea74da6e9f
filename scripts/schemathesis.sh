#!/usr/bin/env bash
# Fuzzes the HTTP API against its own OpenAPI document (api/openapi.json, served at /openapi.json)
# with Schemathesis: every response must conform to the documented status codes, headers, content
# types and schemas, and no request may produce a 5xx.
#
# Starts a private redis-server and the debug agentq-api on free ports, tears both down on exit.
# Uses the gitignored .venv at the repo root (created if missing). That venv is shared with
# deploy/check.sh, whose checkov pins packaging<24, hence the pytest/packaging pins below.
#
# Usage: scripts/schemathesis.sh [extra schemathesis args]   (exit 0 = no failures)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
ST_VERSION="4.32.5"
# Hypothesis is pinned with it: schemathesis accepts any recent one, and a fresh venv picking up a
# newer release changed the run under us once already.
HYPOTHESIS_VERSION="6.170.27"
MAX_EXAMPLES="${ST_MAX_EXAMPLES:-50}"
SEED="${ST_SEED:-20240601}"

log() { printf '==> %s\n' "$*" >&2; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

WORK="$(mktemp -d)"
REDIS_PID=""
API_PID=""
cleanup() {
    local rc=$?
    [ -n "$API_PID" ] && kill "$API_PID" 2>/dev/null && wait "$API_PID" 2>/dev/null
    [ -n "$REDIS_PID" ] && kill "$REDIS_PID" 2>/dev/null && wait "$REDIS_PID" 2>/dev/null
    if [ "$rc" -ne 0 ] && [ -f "$WORK/api.log" ]; then
        log "api log (last 30 lines):"
        tail -n 30 "$WORK/api.log" >&2 || true
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT INT TERM

# ---- tools ----
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
fi
if [ "$("$VENV/bin/schemathesis" --version 2>/dev/null || true)" != "schemathesis, version $ST_VERSION" ] ||
    ! "$VENV/bin/python" -c "import hypothesis, sys; sys.exit(hypothesis.__version__ != '$HYPOTHESIS_VERSION')" 2>/dev/null; then
    log "installing schemathesis $ST_VERSION into $VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        "schemathesis==$ST_VERSION" "hypothesis==$HYPOTHESIS_VERSION" "pytest>=8,<9" "packaging>=23,<24"
fi
command -v redis-server >/dev/null || { log "redis-server not found (apt-get install redis-server)"; exit 1; }

log "building binaries"
(cd "$ROOT" && cargo build --bins)
API_BIN="$ROOT/target/debug/agentq-api"

# ---- services ----
REDIS_PORT="$(free_port)"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK" --save '' --appendonly no \
    >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
for _ in $(seq 1 100); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
    sleep 0.1
done
redis-cli -p "$REDIS_PORT" ping >/dev/null || { log "redis-server did not start"; exit 1; }

API_PORT="$(free_port)"
# Auth on, as deployed: the fuzzer holds the admin token (every route, the admin ones included);
# a fresh one per run, never printed. The fuzzer checks that every route refuses a request
# without the header (401) thousands of times from one address: the failed-attempt limit (429
# past it) is raised for this run, tests/tests/tenancy.rs checks it.
ADMIN_TOKEN="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
env -i PATH="$PATH" \
    REDIS_URL="redis://127.0.0.1:$REDIS_PORT" \
    AGENTQ_LISTEN="127.0.0.1:$API_PORT" \
    AGENTQ_LOG_FORMAT=pretty RUST_LOG=warn \
    AGENTQ_CHAT_WAIT_SECS=1 \
    AGENTQ_AUTH=on AGENTQ_ADMIN_TOKEN="$ADMIN_TOKEN" \
    AGENTQ_AUTH_FAIL_LIMIT=1000000 \
    "$API_BIN" >"$WORK/api.log" 2>&1 &
API_PID=$!
BASE="http://127.0.0.1:$API_PORT"
for _ in $(seq 1 100); do
    curl -fsS "$BASE/healthz" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -fsS "$BASE/healthz" >/dev/null || { log "agentq-api did not start"; exit 1; }

# ---- fuzz ----
# --checks all: not_a_server_error, status/content-type/header/schema conformance, negative data
# rejection, positive data acceptance, unsupported methods, ... except use_after_free: DELETE
# /v1/tasks/{id} *cancels* a task, whose record stays readable (status "cancelled") until the result
# TTL expires, by design (core::cancelled_task_is_never_run relies on it); the check expects a 404.
# --workers 1: with two worker threads, Hypothesis describing filter lambdas (ast.parse of their
# source, a shared cache) races in CPython 3.11 — "AST constructor recursion depth mismatch" or a
# KeyError as a Runtime Error, one run in two. One thread takes ~11 s here, no slower in practice.
cd "$WORK" # schemathesis keeps a cache in ./.schemathesis; keep it out of the repo
log "schemathesis $ST_VERSION against $BASE/openapi.json (max $MAX_EXAMPLES examples per operation)"
"$VENV/bin/schemathesis" --config-file "$ROOT/scripts/schemathesis.toml" run "$BASE/openapi.json" \
    --checks all \
    --exclude-checks use_after_free \
    --max-examples "$MAX_EXAMPLES" \
    --seed "$SEED" \
    --workers 1 \
    --request-timeout 10 \
    --max-response-time 5 \
    --wait-for-schema 10 \
    --warnings off \
    --header "Authorization: Bearer $ADMIN_TOKEN" \
    "$@"
log "schemathesis: no failures"

if grep -q "panicked" "$WORK/api.log"; then
    log "agentq-api panicked during the run"
    exit 1
fi
