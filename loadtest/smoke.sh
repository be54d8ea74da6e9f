#!/usr/bin/env bash
# CI smoke of the load-test kit: enqueue.js, e2e.js, then chat.js (POST /v1/chat/completions,
# waited and streamed calls), each against a fresh private stack (redis-server, mock LLM with
# 100 ms latency and 2 % injected 500s, agentq-api, 2 workers). Low rates, about 50 s in all.
# Exits non-zero when a k6 threshold is crossed (99; chat.js allows no failed call) or a task was
# lost or failed (1).
#
# Binaries: target/debug when present (CI has just built it with `cargo build --bins`; a release
# build would cost minutes), else target/release, else it builds debug. AGENTQ_BIN_DIR overrides.
# Knobs: SMOKE_DURATION (10s), SMOKE_ENQUEUE_RATE (20), SMOKE_E2E_RATE (10), SMOKE_CHAT_VUS (4),
# SMOKE_CHAT_DURATION (5s), SMOKE_CHAT_STREAM_SHARE (0.5).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
start=$SECONDS
dur="${SMOKE_DURATION:-10s}"

export PROFILE="${PROFILE:-debug}" WORKERS="${WORKERS:-2}" WORKER_CONCURRENCY="${WORKER_CONCURRENCY:-16}"
export MOCK_LATENCY_MS="${MOCK_LATENCY_MS:-100}" MOCK_ERROR_RATE="${MOCK_ERROR_RATE:-0.02}"
export MAX_FAILED=0 DRAIN_TIMEOUT="${DRAIN_TIMEOUT:-60}"
# Debug builds on a shared 2-core CI runner: generous latency thresholds, strict correctness ones.
export ENQUEUE_P95_MS="${ENQUEUE_P95_MS:-500}" ENQUEUE_P99_MS="${ENQUEUE_P99_MS:-2000}"
export E2E_P95_MS="${E2E_P95_MS:-5000}" POLL_MS="${POLL_MS:-100}"

results=()
rc=0
bash "$here/run.sh" enqueue -e RATE="${SMOKE_ENQUEUE_RATE:-20}" -e DURATION="$dur"
r=$?
results+=("enqueue.js exit $r")
((r == 0)) || rc=$r
bash "$here/run.sh" e2e -e RATE="${SMOKE_E2E_RATE:-10}" -e DURATION="$dur"
r=$?
results+=("e2e.js exit $r")
((r == 0)) || rc=$r
# chat.js: closed loop, each VU waits for its call's answer (run.sh's workers run the tasks)
bash "$here/run.sh" "$here/k6/chat.js" -e VUS="${SMOKE_CHAT_VUS:-4}" -e DURATION="${SMOKE_CHAT_DURATION:-5s}" \
  -e STREAM_SHARE="${SMOKE_CHAT_STREAM_SHARE:-0.5}" -e MAX_FAILED_RATE=0
r=$?
results+=("chat.js exit $r")
((r == 0)) || rc=$r

echo
echo "== smoke: ${results[0]}, ${results[1]}, ${results[2]}; $((SECONDS - start))s in all: $([[ $rc -eq 0 ]] && echo PASSED || echo FAILED) =="
exit "$rc"
